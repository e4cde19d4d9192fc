"""JSON API for model versions."""

from __future__ import annotations

from fastapi import APIRouter

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for
from app.generators import service
from app.generators.schemas import ModelCreate, ModelPublic

router = APIRouter(prefix="/api/v1", tags=["models"])


@router.post("/projects/{project_id}/models", status_code=201, response_model=ModelPublic)
def register_model(
    project_id: int, body: ModelCreate, session: SessionDep, user: CurrentUser
) -> ModelPublic:
    project = get_project_for(session, user, project_id, lead=True)
    model = service.register_model(session, project=project, data=body)
    record(session, actor=user, action="model.create", target=f"model:{model.id}",
           project_id=project.id, details={"name": model.name})  # fmt: skip
    return service.to_public(model)


@router.get("/projects/{project_id}/models", response_model=list[ModelPublic])
def list_models(project_id: int, session: SessionDep, user: CurrentUser) -> list[ModelPublic]:
    get_project_for(session, user, project_id, lead=True)
    return [service.to_public(m) for m in service.list_models(session, project_id)]
