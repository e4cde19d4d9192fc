"""JSON API for model versions."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for, led_row
from app.generators import service
from app.generators.models import ModelVersion
from app.generators.schemas import ModelCreate, ModelPublic, ModelUpdate
from app.users.models import User

router = APIRouter(prefix="/api/v1", tags=["models"])


@router.post("/projects/{project_id}/models", status_code=201, response_model=ModelPublic)
def register_model(
    project_id: int, body: ModelCreate, session: SessionDep, user: CurrentUser
) -> ModelPublic:
    project = get_project_for(session, user, project_id, lead=True)
    model = service.register_model(session, project=project, data=body, created_by_id=user.id)
    record(session, actor=user, action="model.create", target=f"model:{model.id}",
           project_id=project.id, details={"name": model.name})  # fmt: skip
    return service.to_public(model)


@router.get("/projects/{project_id}/models", response_model=list[ModelPublic])
def list_models(project_id: int, session: SessionDep, user: CurrentUser) -> list[ModelPublic]:
    get_project_for(session, user, project_id, lead=True)
    return [service.to_public(m) for m in service.list_models(session, project_id)]


def model_for(session: Session, user: User, model_id: int) -> ModelVersion:
    """The model version, if the user leads its project (404 for an unknown id)."""
    return led_row(session, user, ModelVersion, model_id, "model")


@router.patch("/models/{model_id}", response_model=ModelPublic)
def update_model(
    model_id: int, body: ModelUpdate, session: SessionDep, user: CurrentUser
) -> ModelPublic:
    """Rename and/or archive (`"archived": true`) or unarchive a model version."""
    model = model_for(session, user, model_id)
    changes = service.update_model(session, model=model, data=body)
    record(session, actor=user, action="model.update", target=f"model:{model.id}",
           project_id=model.project_id, details=changes)  # fmt: skip
    return service.to_public(model)


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: int, session: SessionDep, user: CurrentUser) -> Response:
    """Delete a model version nothing refers to; 409 naming what still does."""
    model = model_for(session, user, model_id)
    name, project_id = model.name, model.project_id
    service.delete_model(session, model=model)
    record(session, actor=user, action="model.delete", target=f"model:{model_id}",
           project_id=project_id, details={"name": name})  # fmt: skip
    return Response(status_code=204)
