"""The home page and a lead's project setup pages: new project, prompts, models, settings,
annotators (invite links, deactivation). Forms post here and errors come back inline."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, get_args

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.deps import PageUser, Row, get_project_for, membership_role
from app.core.errors import DomainError, http_status
from app.core.storage import get_media_store
from app.core.web import render
from app.dashboard import service as dashboard
from app.dashboard.forms import PostedForm, errors_by_field, fields_for, parse_form
from app.generators import service as generators
from app.generators.models import ModelVersion
from app.generators.schemas import GenerationParams, ModelCreate, ModelUpdate
from app.pairs.gold import gold_count, top_up_gold
from app.projects import lifecycle, service, uploads
from app.projects.models import Membership, Project, Prompt
from app.projects.schemas import (
    ProjectCreate,
    ProjectSettings,
    ProjectUpdate,
    PromptIn,
    PromptUpdate,
)
from app.projects.settings import dump_settings
from app.users import service as users
from app.users.invites import invite_path, make_invite_token
from app.users.models import User

# The splits a prompt can be in, as PromptIn defines them.
PROMPT_SPLITS: tuple[str, ...] = get_args(PromptIn.model_fields["split"].annotation)

router = APIRouter(include_in_schema=False)

PARAMS_PREFIX = "p_"


def _require_lead_role(user: User) -> None:
    if user.role not in ("admin", "lead"):
        raise HTTPException(403, "this page needs the lead or admin role")


def _errors(exc: ValidationError) -> dict[str, str]:
    return errors_by_field([dict(e) for e in exc.errors()])


def _message(error: Mapping[str, Any]) -> str:
    return str(error["msg"]).removeprefix("Value error, ")


def _nested_errors(exc: ValidationError, nested: str, prefix: str = "") -> dict[str, str]:
    """Errors keyed by form field: a field of the `nested` model (settings, params) by its own
    name after `prefix`, as its form input is named."""
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        key = prefix + loc[1] if loc[0] == nested and len(loc) > 1 else loc[0]
        errors[key] = _message(error)
    return errors


# A tab's page renderer with its request, session and project already bound.
Page = Callable[..., HTMLResponse]


def _invalid(page: Page, exc: ValidationError, lead: str, *, locs: bool = True) -> HTMLResponse:
    """The tab again, saying why an edit was refused (its fields name themselves with `locs`)."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {_message(e)}" if locs else _message(e)
        for e in exc.errors()
    )
    return page(action_error=lead + problems, status_code=422)


def _refused(page: Page, exc: DomainError) -> HTMLResponse:
    return page(action_error=exc.detail, status_code=http_status(exc))


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    items: list[dict[str, Any]] = []
    for project in service.projects_for(session, user):
        role = membership_role(session, user, project.id)
        lead = role in ("admin", "lead") and user.role in ("admin", "lead")
        items.append({"project": project, "lead": lead, "annotator": role is not None})
    ctx = {
        "projects": [i for i in items if i["project"].archived_at is None],
        # Archived projects stay reachable for their leads (history, exports, unarchiving).
        "archived": [i for i in items if i["project"].archived_at is not None and i["lead"]],
    }
    return render(request, "pages/project_list.html", ctx)


# -- new project ------------------------------------------------------------------------------


def _new_project_page(
    request: Request, values: dict[str, Any], errors: dict[str, str], status_code: int = 200
) -> HTMLResponse:
    ctx = {
        "values": values,
        "errors": errors,
        "settings_fields": fields_for(ProjectSettings, values.get("settings"), errors),
    }
    return render(request, "pages/project_new.html", ctx, status_code=status_code)


@router.get("/projects/new", response_class=HTMLResponse)
def new_project_form(request: Request, user: PageUser) -> HTMLResponse:
    _require_lead_role(user)
    return _new_project_page(request, {"name": "", "description": ""}, {})


@router.post("/projects/new", response_class=HTMLResponse)
def create_project(
    request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    _require_lead_role(user)
    settings_raw, problems = parse_form(ProjectSettings, form)
    values = {
        "name": str(form.get("name", "")),
        "description": str(form.get("description", "")),
        "settings": settings_raw,
    }
    try:
        data = ProjectCreate.model_validate(values)
    except ValidationError as exc:
        errors = _nested_errors(exc, "settings")
        return _new_project_page(request, values, {**errors, **problems}, 422)
    if problems:
        return _new_project_page(request, values, problems, 422)
    project = service.create_project(session, data=data, creator=user)
    record(session, actor=user, action="project.create", target=f"project:{project.id}",
           project_id=project.id)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/prompts", status_code=303)


# -- prompts ----------------------------------------------------------------------------------


def _prompts_page(
    request: Request,
    session: Session,
    project: Project,
    *,
    upload_errors: list[str] | None = None,
    created: int | None = None,
    pasted: str = "",
    pasted_split: str = "train",
    query: str = "",
    show_archived: bool = False,
    action_error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    counts = dict(
        session.execute(
            select(Prompt.split, func.count())
            .where(Prompt.project_id == project.id, Prompt.archived_at.is_(None))
            .group_by(Prompt.split)
        ).all()
    )
    archived_count = session.scalar(
        select(func.count())
        .select_from(Prompt)
        .where(Prompt.project_id == project.id, Prompt.archived_at.is_not(None))
    )
    recent = lifecycle.search_prompts(
        session, project_id=project.id, query=query, archived=show_archived, limit=PROMPTS_SHOWN
    )
    ctx = {
        "query": query,
        "show_archived": show_archived,
        "archived_count": int(archived_count or 0),
        "action_error": action_error,
        "shown_limit": PROMPTS_SHOWN,
        "project": project,
        "tab": "prompts",
        "counts": {s: int(counts.get(s, 0)) for s in ("train", "val", "test")},
        "recent": recent,
        "upload_errors": upload_errors,
        "created": created,
        "pasted": pasted,
        "pasted_split": pasted_split,
        "splits": PROMPT_SPLITS,
        "max_bytes": get_settings().max_upload_bytes,
    }
    return render(request, "pages/project_prompts.html", ctx, status_code=status_code)


PROMPTS_SHOWN = 50


@router.get("/projects/{project_id}/prompts", response_class=HTMLResponse)
def prompts_page(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    created: int = 0,
    q: str = "",
    archived: bool = False,
) -> HTMLResponse:
    """The prompts, newest first; `q` searches text and tags, `archived` shows the archived."""
    project = get_project_for(session, user, project_id, lead=True)
    return _prompts_page(
        request, session, project, created=created or None, query=q[:200], show_archived=archived
    )


def _row_of(session: Session, project: Project, kind: type[Row], row_id: int, noun: str) -> Row:
    """A row of this project (the page's own), 404 otherwise."""
    row = session.get(kind, row_id)
    if row is None or row.project_id != project.id:
        raise HTTPException(404, f"{noun} {row_id} not found in this project")
    return row


def _form_flag(value: Any) -> bool | None:
    """A checkbox or hidden field's "true"/"false" (absent: no change)."""
    if value is None or value == "":
        return None
    return str(value).lower() in ("1", "true", "on", "yes")


def _edit_body(form: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """What an edit form sent of `keys` and of its archived flag; what it left out stays."""
    body: dict[str, Any] = {key: str(form.get(key)) for key in keys if form.get(key) is not None}
    archived = _form_flag(form.get("archived"))
    if archived is not None:
        body["archived"] = archived
    return body


@router.post("/projects/{project_id}/prompts/{prompt_id}/edit", response_class=HTMLResponse)
def edit_prompt_page(
    project_id: int,
    prompt_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    form: PostedForm,
) -> Response:
    """Edit a prompt's text, split and tags (comma-separated), or (un)archive it."""
    project = get_project_for(session, user, project_id, lead=True)
    prompt = _row_of(session, project, Prompt, prompt_id, "prompt")
    page = partial(_prompts_page, request, session, project)
    body = _edit_body(form, ("text", "split"))
    if form.get("tags") is not None:
        body["tags"] = str(form.get("tags")).split(",")
    try:
        data = PromptUpdate.model_validate(body)
        changes = lifecycle.update_prompt(session, prompt=prompt, data=data)
    except ValidationError as exc:
        return _invalid(page, exc, f"prompt {prompt_id} not changed: ")
    except DomainError as exc:
        return _refused(page, exc)
    record(session, actor=user, action="prompt.update", target=f"prompt:{prompt.id}",
           project_id=project.id, details=changes)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/prompts#prompt-{prompt.id}", status_code=303)


@router.post("/projects/{project_id}/prompts/{prompt_id}/delete", response_class=HTMLResponse)
def delete_prompt_page(
    project_id: int, prompt_id: int, request: Request, session: SessionDep, user: PageUser
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    prompt = _row_of(session, project, Prompt, prompt_id, "prompt")
    try:
        lifecycle.delete_prompt(session, prompt=prompt)
    except DomainError as exc:
        return _refused(partial(_prompts_page, request, session, project), exc)
    record(session, actor=user, action="prompt.delete", target=f"prompt:{prompt_id}",
           project_id=project.id)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/prompts", status_code=303)


@router.post("/projects/{project_id}/prompts", response_class=HTMLResponse)
def upload_prompts(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    file: UploadFile | None = File(default=None),
    format: str = Form(default=""),
    pasted: str = Form(default=""),
    split: str = Form(default="train"),
) -> Response:
    """The same all-or-nothing import as the JSON upload endpoint, with errors shown inline:
    a file, or prompts pasted one per line (all into the chosen split)."""
    project = get_project_for(session, user, project_id, lead=True)
    limit = get_settings().max_upload_bytes
    if pasted.strip():
        return _paste_prompts(request, session, user, project, pasted, split, limit)
    if file is None or not file.filename:
        errors = ["choose a file to upload, or paste prompts one per line"]
        return _prompts_page(request, session, project, upload_errors=errors, status_code=422)
    data = file.file.read(limit + 1)
    if len(data) > limit:
        errors = [f"the file is over the upload limit of {limit} bytes"]
        return _prompts_page(request, session, project, upload_errors=errors, status_code=413)
    try:
        created = uploads.import_prompt_file(
            session,
            project=project,
            data=data,
            filename=file.filename,
            content_type=file.content_type,
            file_format=format or None,
        )
    except uploads.PromptFileError as exc:
        return _prompts_page(request, session, project, upload_errors=exc.errors, status_code=422)
    record(session, actor=user, action="prompts.add", target=f"project:{project.id}",
           project_id=project.id, details={"created": created, "source": "file"})  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/prompts?created={created}", status_code=303)


def _paste_prompts(
    request: Request,
    session: Session,
    user: User,
    project: Project,
    pasted: str,
    split: str,
    limit: int,
) -> Response:
    def refused(errors: list[str], status_code: int = 422) -> HTMLResponse:
        # What was pasted stays in the box to be corrected.
        return _prompts_page(
            request, session, project, upload_errors=errors, pasted=pasted,
            pasted_split=split, status_code=status_code,
        )  # fmt: skip

    if split not in PROMPT_SPLITS:
        return refused([f"unknown split {split!r}; expected one of {', '.join(PROMPT_SPLITS)}"])
    data = pasted.encode("utf-8")
    if len(data) > limit:
        return refused([f"the pasted text is over the upload limit of {limit} bytes"], 413)
    try:
        prompts = uploads.parse_prompt_file(data, file_format="text")
    except uploads.PromptFileError as exc:
        return refused(exc.errors)
    prompts = [prompt.model_copy(update={"split": split}) for prompt in prompts]
    created = service.add_prompts(session, project=project, prompts=prompts)
    record(session, actor=user, action="prompts.add", target=f"project:{project.id}",
           project_id=project.id, details={"created": created, "source": "pasted"})  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/prompts?created={created}", status_code=303)


# -- models -----------------------------------------------------------------------------------


def _models_page(
    request: Request,
    session: Session,
    project: Project,
    *,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    action_error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    values = values or {}
    errors = errors or {}
    models = generators.list_models(session, project.id)
    choices = [(m.id, m.name) for m in models if m.archived_at is None]
    ctx = {
        "project": project,
        "tab": "models",
        "models": [m for m in models if m.archived_at is None],
        "archived_models": [m for m in models if m.archived_at is not None],
        "action_error": action_error,
        "values": {"name": "", "base": "toy", "adapter": "", "parent_id": "", **values},
        "errors": errors,
        "choices": choices,
        "params_fields": fields_for(
            GenerationParams,
            values.get("params"),
            {k.removeprefix(PARAMS_PREFIX): v for k, v in errors.items()},
            prefix=PARAMS_PREFIX,
        ),
    }
    return render(request, "pages/project_models.html", ctx, status_code=status_code)


@router.get("/projects/{project_id}/models", response_class=HTMLResponse)
def models_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    return _models_page(request, session, project)


@router.post("/projects/{project_id}/models", response_class=HTMLResponse)
def register_model(
    project_id: int, request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    params, problems = parse_form(GenerationParams, form, prefix=PARAMS_PREFIX)
    values: dict[str, Any] = {
        key: str(form.get(key, "")).strip() for key in ("name", "base", "adapter", "parent_id")
    }
    body: dict[str, Any] = {"name": values["name"], "base": values["base"], "params": params}
    if values["adapter"]:
        body["adapter"] = values["adapter"]
    if values["parent_id"]:
        body["parent_id"] = values["parent_id"]
    values["params"] = params
    errors = {PARAMS_PREFIX + k: v for k, v in problems.items()}
    try:
        data = ModelCreate.model_validate(body)
    except ValidationError as exc:
        errors.update(_nested_errors(exc, "params", PARAMS_PREFIX))
        return _models_page(
            request, session, project, values=values, errors=errors, status_code=422
        )
    if errors:
        return _models_page(
            request, session, project, values=values, errors=errors, status_code=422
        )
    try:
        model = generators.register_model(
            session, project=project, data=data, created_by_id=user.id
        )
    except DomainError as exc:
        errors = {"": exc.detail}
        return _models_page(
            request, session, project, values=values, errors=errors, status_code=http_status(exc)
        )
    record(session, actor=user, action="model.create", target=f"model:{model.id}",
           project_id=project.id, details={"name": model.name})  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/models?added={model.id}", status_code=303)


@router.post("/projects/{project_id}/models/{model_id}/edit", response_class=HTMLResponse)
def edit_model_page(
    project_id: int,
    model_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    form: PostedForm,
) -> Response:
    """Rename a model version, or archive / unarchive it."""
    project = get_project_for(session, user, project_id, lead=True)
    model = _row_of(session, project, ModelVersion, model_id, "model")
    page = partial(_models_page, request, session, project)
    body = _edit_body(form, ("name",))
    try:
        changes = generators.update_model(
            session, model=model, data=ModelUpdate.model_validate(body)
        )
    except ValidationError as exc:
        return _invalid(page, exc, f"model {model_id} not changed: ", locs=False)
    except DomainError as exc:
        return _refused(page, exc)
    record(session, actor=user, action="model.update", target=f"model:{model.id}",
           project_id=project.id, details=changes)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/models#model-{model.id}", status_code=303)


@router.post("/projects/{project_id}/models/{model_id}/delete", response_class=HTMLResponse)
def delete_model_page(
    project_id: int, model_id: int, request: Request, session: SessionDep, user: PageUser
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    model = _row_of(session, project, ModelVersion, model_id, "model")
    name = model.name
    try:
        generators.delete_model(session, model=model)
    except DomainError as exc:
        return _refused(partial(_models_page, request, session, project), exc)
    record(session, actor=user, action="model.delete", target=f"model:{model_id}",
           project_id=project.id, details={"name": name})  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/models", status_code=303)


# -- settings ---------------------------------------------------------------------------------


def _settings_page(
    request: Request,
    session: Session,
    project: Project,
    values: dict[str, Any] | None,
    errors: dict[str, str],
    *,
    saved: bool = False,
    gold_notice: str = "",
    action_error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    settings = service.project_settings(project)
    current = values if values is not None else settings.model_dump()
    ctx = {
        "action_error": action_error,
        "project": project,
        "tab": "settings",
        "fields": fields_for(ProjectSettings, current, errors),
        "errors": errors,
        "saved": saved,
        "gold_count": gold_count(session, project_id=project.id),
        "gold_rate": settings.gold_rate,
        "gold_notice": gold_notice,
    }
    return render(request, "pages/project_settings.html", ctx, status_code=status_code)


@router.get("/projects/{project_id}/settings", response_class=HTMLResponse)
def settings_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser, saved: int = 0
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    return _settings_page(request, session, project, None, {}, saved=bool(saved))


@router.post("/projects/{project_id}/settings/gold", response_class=HTMLResponse)
def create_gold_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    made = top_up_gold(session, get_media_store(), project=project)
    total = gold_count(session, project_id=project.id)
    record(session, actor=user, action="gold.create", target=f"project:{project.id}",
           project_id=project.id, details={"created": len(made), "gold_pairs": total})  # fmt: skip
    notice = f"{len(made)} new gold pairs" if made else "Gold pairs are already at the gold rate."
    return _settings_page(request, session, project, None, {}, gold_notice=notice)


@router.post("/projects/{project_id}/settings", response_class=HTMLResponse)
def save_settings(
    project_id: int, request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    raw, problems = parse_form(ProjectSettings, form)
    try:
        clean = ProjectSettings.model_validate(raw)
    except ValidationError as exc:
        errors = {**_errors(exc), **problems}
        return _settings_page(request, session, project, raw, errors, status_code=422)
    if problems:
        return _settings_page(request, session, project, raw, problems, status_code=422)
    project.settings = dump_settings(clean)
    session.flush()
    record(session, actor=user, action="project.settings", target=f"project:{project.id}",
           project_id=project.id)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/settings?saved=1", status_code=303)


@router.post("/projects/{project_id}/edit", response_class=HTMLResponse)
def edit_project_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    """Rename the project, change its description, or archive / unarchive it."""
    project = get_project_for(session, user, project_id, lead=True)
    body = _edit_body(form, ("name", "description"))
    try:
        changes = lifecycle.update_project(
            session, project=project, data=ProjectUpdate.model_validate(body)
        )
    except ValidationError as exc:
        return _invalid(partial(_settings_page, request, session, project, None, {}), exc,
                        "not changed: ")  # fmt: skip
    record(session, actor=user, action="project.update", target=f"project:{project.id}",
           project_id=project.id, details=changes)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}/settings#project", status_code=303)


@router.post("/projects/{project_id}/delete", response_class=HTMLResponse)
def delete_project_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    name = project.name
    try:
        lifecycle.delete_project(session, project=project)
    except DomainError as exc:
        return _refused(partial(_settings_page, request, session, project, None, {}), exc)
    record(session, actor=user, action="project.delete", target=f"project:{project_id}",
           project_id=project_id, details={"name": name})  # fmt: skip
    return RedirectResponse("/", status_code=303)


# -- annotators -------------------------------------------------------------------------------


def _annotator_member(session: Session, project: Project, user_id: int) -> User:
    membership = session.get(Membership, (project.id, user_id))
    user = session.get(User, user_id)
    if membership is None or membership.role != "annotator" or user is None:
        raise HTTPException(404, "no such annotator in this project")
    return user


def _annotators_page(
    request: Request,
    session: Session,
    project: Project,
    *,
    invite: dict[str, str] | None = None,
    notice: str | None = None,
    error: str | None = None,
    email: str = "",
    status_code: int = 200,
) -> HTMLResponse:
    rows = [r for r in dashboard.votes_per_annotator(session, project.id) if r.member]
    has_password = dict(
        session.execute(
            select(User.id, User.password_hash.is_not(None)).where(
                User.id.in_([r.user_id for r in rows])
            )
        ).all()
    )
    roles = dict(
        session.execute(
            select(User.id, User.role).where(User.id.in_([r.user_id for r in rows]))
        ).all()
    )
    # Members of other projects too get no link from here (see may_invite).
    elsewhere = set(
        session.scalars(
            select(Membership.user_id).where(
                Membership.user_id.in_([r.user_id for r in rows]),
                Membership.project_id != project.id,
            )
        )
    )
    invitable = {
        uid: not has and uid not in elsewhere for uid, has in has_password.items()
    }
    ctx = {
        "project": project,
        "tab": "annotators",
        "members": service.members(session, project),
        "rows": rows,
        "has_password": has_password,
        "invitable": invitable,
        "roles": roles,
        "invite": invite,
        "notice": notice,
        "error": error,
        "email": email,
    }
    return render(request, "pages/project_annotators.html", ctx, status_code=status_code)


@router.get("/projects/{project_id}/annotators", response_class=HTMLResponse)
def annotators_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    return _annotators_page(request, session, project)


def _invite_for(request: Request, user: User) -> dict[str, str]:
    path = invite_path(make_invite_token(user))
    return {"email": user.email, "url": str(request.base_url).rstrip("/") + path}


@router.post("/projects/{project_id}/annotators", response_class=HTMLResponse)
def invite_annotator(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    email: str = Form(max_length=320),
) -> HTMLResponse:
    """Add an annotator: a new account comes with an invite link; an existing account only
    becomes a member (its password is its owner's business)."""
    project = get_project_for(session, user, project_id, lead=True)
    try:
        address = users.normalise_email(email)
    except users.UserError as exc:
        return _annotators_page(
            request, session, project, error=str(exc), email=email, status_code=422
        )
    invitee = users.get_by_email(session, address)
    existing = invitee is not None
    if invitee is None:
        invitee = users.create_user(session, email=address, role="annotator")
    service.add_member(session, project=project, user=invitee, role="annotator")
    record(
        session,
        actor=user,
        action="member.add",
        target=f"user:{invitee.id}",
        details={"project_id": project.id, "role": "annotator", "existing": existing},
    )
    invite = None if existing else _invite_for(request, invitee)
    notice = f"{address} already has an account and is now a member." if existing else None
    return _annotators_page(request, session, project, invite=invite, notice=notice)


def may_invite(session: Session, actor: User, invitee: User) -> bool:
    """Whether `actor` may get a set-your-password link for `invitee`.

    Only for an annotator account that has never had a password and belongs to no project
    the actor does not lead: otherwise the link would let a lead take over someone else's
    account. (Admins reset passwords from the Users page.)
    """
    if invitee.password_hash is not None or invitee.role != "annotator":
        return False
    if actor.role == "admin":
        return True
    projects = set(
        session.scalars(select(Membership.project_id).where(Membership.user_id == invitee.id))
    )
    led = set(
        session.scalars(
            select(Membership.project_id).where(
                Membership.user_id == actor.id,
                Membership.role == "lead",
                Membership.is_active.is_(True),
            )
        )
    )
    return projects <= led


@router.post("/projects/{project_id}/annotators/{user_id}/invite", response_class=HTMLResponse)
def new_invite_link(
    project_id: int, user_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    invitee = _annotator_member(session, project, user_id)
    if not may_invite(session, user, invitee):
        raise HTTPException(
            409, "no invite link for this account: it has a password or belongs to other projects"
        )
    if not invitee.is_active:
        raise HTTPException(409, "this account is deactivated")
    record(
        session,
        actor=user,
        action="member.invite",
        target=f"user:{invitee.id}",
        details={"project_id": project.id},
    )
    return _annotators_page(request, session, project, invite=_invite_for(request, invitee))


@router.post("/projects/{project_id}/annotators/{user_id}/active", response_class=HTMLResponse)
def set_active(
    project_id: int,
    user_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    active: bool = Form(),
) -> Response:
    """Deactivate (or reactivate) someone's membership of this project; their account, and
    their other projects, are untouched (only admins (de)activate accounts)."""
    project = get_project_for(session, user, project_id, lead=True)
    target = _annotator_member(session, project, user_id)
    membership = session.get(Membership, (project.id, target.id))
    assert membership is not None  # _annotator_member checked it
    membership.is_active = active
    session.flush()
    record(
        session,
        actor=user,
        action="member.activate" if active else "member.deactivate",
        target=f"user:{target.id}",
        details={"project_id": project.id},
    )
    return RedirectResponse(f"/projects/{project.id}/annotators", status_code=303)


@router.post("/projects/{project_id}/annotators/{user_id}/votes-used", response_class=HTMLResponse)
def set_votes_used(
    project_id: int,
    user_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    use: str = Form(pattern="^(exclude|include|auto)$"),
) -> Response:
    """A lead's decision on whether an annotator's votes count in ratings and training:
    exclude or include by hand, or "auto" (the project's reliability rule decides)."""
    project = get_project_for(session, user, project_id, lead=True)
    target = _annotator_member(session, project, user_id)
    settings = service.project_settings(project)
    excluded = [a for a in settings.excluded_annotators if a != target.id]
    included = [a for a in settings.included_annotators if a != target.id]
    if use == "exclude":
        excluded.append(target.id)
    elif use == "include":
        included.append(target.id)
    changed = settings.model_copy(
        update={"excluded_annotators": excluded, "included_annotators": included}
    )
    project.settings = dump_settings(changed)
    session.flush()
    record(session, actor=user, action=f"annotator.votes_{use}", target=f"user:{target.id}",
           project_id=project.id)  # fmt: skip
    return RedirectResponse(f"/projects/{project.id}#dash-quality", status_code=303)


# -- members: co-leads and annotators ----------------------------------------------------------


@router.post("/projects/{project_id}/members", response_class=HTMLResponse)
def add_member_page(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    email: str = Form(max_length=320),
    role: str = Form(default="annotator", max_length=16),
) -> HTMLResponse:
    """Add a co-lead or an annotator; only a new account comes with an invite link."""
    project = get_project_for(session, user, project_id, lead=True)
    try:
        added = service.add_project_member(session, project=project, email=email, role=role)
    except (users.UserError, service.MemberError) as exc:
        return _annotators_page(
            request, session, project, error=str(exc), email=email, status_code=422
        )
    record(
        session,
        actor=user,
        action="member.add",
        target=f"user:{added.user.id}",
        project_id=project.id,
        details={"role": role, "existing": added.existing},
    )
    if added.existing:
        notice = f"{added.user.email} already has an account and is now a member."
        return _annotators_page(request, session, project, notice=notice)
    return _annotators_page(request, session, project, invite=_invite_for(request, added.user))


def _change(
    request: Request,
    session: Session,
    user: User,
    project_id: int,
    member_id: int,
    *,
    action: str,
    role: str | None = None,
    active: bool | None = None,
    remove: bool = False,
) -> Response:
    project = get_project_for(session, user, project_id, lead=True)
    try:
        if remove:
            service.remove_member(session, project=project, user_id=member_id, actor=user)
        else:
            service.change_member(
                session, project=project, user_id=member_id, actor=user, role=role,
                active=active,
            )  # fmt: skip
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None
    except service.MemberError as exc:
        return _annotators_page(request, session, project, error=str(exc), status_code=409)
    details: dict[str, Any] = {"role": role} if role else {}
    record(
        session,
        actor=user,
        action=action,
        target=f"user:{member_id}",
        project_id=project.id,
        details=details,
    )
    return RedirectResponse(f"/projects/{project.id}/annotators", status_code=303)


@router.post("/projects/{project_id}/members/{user_id}/role", response_class=HTMLResponse)
def change_member_role(
    project_id: int,
    user_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    role: str = Form(max_length=16),
) -> Response:
    return _change(request, session, user, project_id, user_id, action="member.update", role=role)


@router.post("/projects/{project_id}/members/{user_id}/active", response_class=HTMLResponse)
def set_member_active(
    project_id: int,
    user_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    active: bool = Form(),
) -> Response:
    action = "member.activate" if active else "member.deactivate"
    return _change(request, session, user, project_id, user_id, action=action, active=active)


@router.post("/projects/{project_id}/members/{user_id}/remove", response_class=HTMLResponse)
def remove_member_page(
    project_id: int, user_id: int, request: Request, session: SessionDep, user: PageUser
) -> Response:
    return _change(
        request, session, user, project_id, user_id, action="member.remove", remove=True
    )
