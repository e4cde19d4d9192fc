"""JSON API for projects, prompts and annotators."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import CurrentUser, LeadUser, get_project_for
from app.projects import service
from app.projects.schemas import AnnotatorCreate, ProjectCreate, ProjectPublic, PromptsCreate
from app.users.service import UserError

router = APIRouter(prefix="/api/v1", tags=["projects"])


def _public(project: Any) -> ProjectPublic:
    return ProjectPublic(
        id=project.id,
        name=project.name,
        description=project.description,
        settings=service.project_settings(project),
    )


@router.post("/projects", status_code=201, response_model=ProjectPublic)
def create_project(body: ProjectCreate, session: SessionDep, user: LeadUser) -> ProjectPublic:
    project = service.create_project(session, data=body, creator=user)
    record(session, actor=user, action="project.create", target=f"project:{project.id}")
    return _public(project)


@router.get("/projects", response_model=list[ProjectPublic])
def list_projects(session: SessionDep, user: CurrentUser) -> list[ProjectPublic]:
    if user.role == "annotator":
        raise HTTPException(403, "annotators cannot list projects")
    return [_public(p) for p in service.projects_for(session, user)]


@router.get("/projects/{project_id}", response_model=ProjectPublic)
def get_project(project_id: int, session: SessionDep, user: CurrentUser) -> ProjectPublic:
    return _public(get_project_for(session, user, project_id, lead=True))


@router.post("/projects/{project_id}/prompts", status_code=201)
def add_prompts(
    project_id: int, body: PromptsCreate, session: SessionDep, user: CurrentUser
) -> dict[str, int]:
    project = get_project_for(session, user, project_id, lead=True)
    return {"created": service.add_prompts(session, project=project, prompts=body.prompts)}


@router.post("/projects/{project_id}/annotators", status_code=201)
def add_annotator(
    project_id: int, body: AnnotatorCreate, session: SessionDep, user: CurrentUser
) -> dict[str, Any]:
    project = get_project_for(session, user, project_id, lead=True)
    try:
        added = service.add_annotator(session, project=project, email=body.email, actor=user)
    except UserError as exc:
        raise HTTPException(422, str(exc)) from None
    record(
        session,
        actor=user,
        action="member.add",
        target=f"user:{added.user.id}",
        details={"project_id": project.id, "role": "annotator", "existing": added.existing},
    )
    # `token` stays in the answer (null for an existing account) so clients need not branch.
    return {"user_id": added.user.id, "token": added.token, "existing": added.existing}
