"""JSON API for projects, prompts and annotators."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import CurrentUser, LeadUser, get_project_for, led_row
from app.projects import lifecycle, service
from app.projects.models import Prompt
from app.projects.schemas import (
    AnnotatorCreate,
    MemberCreate,
    MemberPublic,
    MemberUpdate,
    ProjectCreate,
    ProjectPublic,
    ProjectUpdate,
    PromptPublic,
    PromptsCreate,
    PromptUpdate,
)
from app.users.invites import invite_path, make_invite_token
from app.users.models import User
from app.users.service import UserError

router = APIRouter(prefix="/api/v1", tags=["projects"])


def _public(project: Any) -> ProjectPublic:
    return ProjectPublic(
        id=project.id,
        name=project.name,
        description=project.description,
        settings=service.project_settings(project),
        archived=project.archived_at is not None,
    )


@router.post("/projects", status_code=201, response_model=ProjectPublic)
def create_project(body: ProjectCreate, session: SessionDep, user: LeadUser) -> ProjectPublic:
    project = service.create_project(session, data=body, creator=user)
    record(
        session,
        actor=user,
        action="project.create",
        target=f"project:{project.id}",
        project_id=project.id,
    )
    return _public(project)


@router.get("/projects", response_model=list[ProjectPublic])
def list_projects(session: SessionDep, user: CurrentUser) -> list[ProjectPublic]:
    if user.role == "annotator":
        raise HTTPException(403, "annotators cannot list projects")
    return [_public(p) for p in service.projects_for(session, user)]


@router.get("/projects/{project_id}", response_model=ProjectPublic)
def get_project(project_id: int, session: SessionDep, user: CurrentUser) -> ProjectPublic:
    return _public(get_project_for(session, user, project_id, lead=True))


@router.patch("/projects/{project_id}", response_model=ProjectPublic)
def update_project(
    project_id: int, body: ProjectUpdate, session: SessionDep, user: CurrentUser
) -> ProjectPublic:
    """Rename, describe again, archive (`"archived": true`) or unarchive a project."""
    project = get_project_for(session, user, project_id, lead=True)
    changes = lifecycle.update_project(session, project=project, data=body)
    record(session, actor=user, action="project.update", target=f"project:{project.id}",
           project_id=project.id, details=changes)  # fmt: skip
    return _public(project)


@router.delete("/projects/{project_id}", status_code=204)
def delete_project(project_id: int, session: SessionDep, user: CurrentUser) -> Response:
    """Delete a project that holds no images, votes or jobs; 409 naming them otherwise."""
    project = get_project_for(session, user, project_id, lead=True)
    name = project.name
    lifecycle.delete_project(session, project=project)
    record(session, actor=user, action="project.delete", target=f"project:{project_id}",
           project_id=project_id, details={"name": name})  # fmt: skip
    return Response(status_code=204)


def prompt_for(session: Any, user: User, prompt_id: int) -> Prompt:
    """The prompt, if the user leads its project (404 for an unknown id)."""
    return led_row(session, user, Prompt, prompt_id, "prompt")


def prompt_public(prompt: Prompt) -> PromptPublic:
    return PromptPublic(
        id=prompt.id,
        project_id=prompt.project_id,
        text=prompt.text,
        split=prompt.split,
        tags=[str(t) for t in prompt.tags or []],
        archived=prompt.archived_at is not None,
    )


@router.get("/projects/{project_id}/prompts", response_model=list[PromptPublic])
def list_prompts(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    q: str = "",
    split: str | None = None,
    archived: bool = False,
    limit: int = 100,
) -> list[PromptPublic]:
    """Prompts whose text or tags contain `q`, newest first (archived ones with `archived=true`)."""
    get_project_for(session, user, project_id, lead=True)
    found = lifecycle.search_prompts(
        session, project_id=project_id, query=q, split=split, archived=archived,
        limit=max(1, min(limit, 1000)),
    )  # fmt: skip
    return [prompt_public(p) for p in found]


@router.patch("/prompts/{prompt_id}", response_model=PromptPublic)
def update_prompt(
    prompt_id: int, body: PromptUpdate, session: SessionDep, user: CurrentUser
) -> PromptPublic:
    """Edit a prompt's text (while nothing was made from it), split or tags; (un)archive it."""
    prompt = prompt_for(session, user, prompt_id)
    changes = lifecycle.update_prompt(session, prompt=prompt, data=body)
    record(session, actor=user, action="prompt.update", target=f"prompt:{prompt.id}",
           project_id=prompt.project_id, details=changes)  # fmt: skip
    return prompt_public(prompt)


@router.delete("/prompts/{prompt_id}", status_code=204)
def delete_prompt(prompt_id: int, session: SessionDep, user: CurrentUser) -> Response:
    """Delete a prompt nothing refers to; 409 naming what still does."""
    prompt = prompt_for(session, user, prompt_id)
    project_id = prompt.project_id
    lifecycle.delete_prompt(session, prompt=prompt)
    record(session, actor=user, action="prompt.delete", target=f"prompt:{prompt_id}",
           project_id=project_id)  # fmt: skip
    return Response(status_code=204)


@router.post("/projects/{project_id}/prompts", status_code=201)
def add_prompts(
    project_id: int, body: PromptsCreate, session: SessionDep, user: CurrentUser
) -> dict[str, int]:
    project = get_project_for(session, user, project_id, lead=True)
    created = service.add_prompts(session, project=project, prompts=body.prompts)
    record(session, actor=user, action="prompts.add", target=f"project:{project.id}",
           project_id=project.id, details={"created": created})  # fmt: skip
    return {"created": created}


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


def _member_public(membership: Any, member: Any) -> MemberPublic:
    return MemberPublic(
        user_id=member.id,
        email=member.email,
        role=membership.role,
        active=membership.is_active,
        account_active=member.is_active,
    )


@router.get("/projects/{project_id}/members", response_model=list[MemberPublic])
def list_members(project_id: int, session: SessionDep, user: CurrentUser) -> list[MemberPublic]:
    project = get_project_for(session, user, project_id, lead=True)
    return [_member_public(m, u) for m, u in service.members(session, project)]


@router.post("/projects/{project_id}/members", status_code=201)
def add_member(
    project_id: int, body: MemberCreate, request: Request, session: SessionDep, user: CurrentUser
) -> dict[str, Any]:
    """Add a co-lead or an annotator. A new account comes with a one-time invite link (for
    its owner, to set a password); an existing account gets nothing but the membership."""
    project = get_project_for(session, user, project_id, lead=True)
    try:
        added = service.add_project_member(
            session, project=project, email=body.email, role=body.role
        )
    except (UserError, service.MemberError) as exc:
        raise HTTPException(422, str(exc)) from None
    record(
        session,
        actor=user,
        action="member.add",
        target=f"user:{added.user.id}",
        project_id=project.id,
        details={"role": body.role, "existing": added.existing},
    )
    invite = None
    if not added.existing:
        invite = str(request.base_url).rstrip("/") + invite_path(make_invite_token(added.user))
    return {
        "user_id": added.user.id,
        "role": body.role,
        "existing": added.existing,
        "invite_url": invite,
    }


@router.patch("/projects/{project_id}/members/{user_id}", response_model=MemberPublic)
def update_member(
    project_id: int, user_id: int, body: MemberUpdate, session: SessionDep, user: CurrentUser
) -> MemberPublic:
    project = get_project_for(session, user, project_id, lead=True)
    try:
        membership = service.change_member(
            session, project=project, user_id=user_id, actor=user, role=body.role,
            active=body.active,
        )  # fmt: skip
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except service.MemberError as exc:
        raise HTTPException(409, str(exc)) from None
    record(
        session,
        actor=user,
        action="member.update",
        target=f"user:{user_id}",
        project_id=project.id,
        details=body.model_dump(exclude_none=True),
    )
    member = session.get(User, user_id)
    return _member_public(membership, member)


@router.delete("/projects/{project_id}/members/{user_id}", status_code=204)
def remove_member(
    project_id: int, user_id: int, session: SessionDep, user: CurrentUser
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    try:
        service.remove_member(session, project=project, user_id=user_id, actor=user)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except service.MemberError as exc:
        raise HTTPException(409, str(exc)) from None
    record(
        session, actor=user, action="member.remove", target=f"user:{user_id}", project_id=project.id
    )
    return Response(status_code=204)
