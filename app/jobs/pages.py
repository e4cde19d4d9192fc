"""Jobs in the browser: a project's job list, launch forms generated from each kind's params
schema, and a job's live page (status, progress, log, metric plots; htmx polling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core import plots
from app.core.config import get_settings
from app.core.db import SessionDep, utcnow
from app.core.deps import PageUser, get_project_for
from app.core.errors import DomainError, http_status
from app.core.web import is_htmx, render
from app.dashboard.forms import PostedForm, errors_by_field, fields_for, parse_form
from app.generators.models import ModelVersion
from app.generators.service import list_models
from app.jobs import service
from app.jobs.kinds import KINDS, JobKind
from app.jobs.models import TERMINAL, Job
from app.jobs.routes import job_for
from app.projects.lifecycle import refuse_archived
from app.projects.models import Project
from app.users.models import User

router = APIRouter(include_in_schema=False)

LIST_LIMIT = 100
LOG_LINES = 30


def project_kinds() -> list[JobKind]:
    """The job kinds a lead can launch in a project, in registration order."""
    return [kind for kind in KINDS.values() if kind.needs_project]


def _describe(kind: JobKind) -> str:
    doc = (kind.params.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


# The rating refreshes queued by the platform itself (no one launched them): many, and routine.
AUTOMATIC = Job.created_by_id.is_(None) & (Job.kind == "fit_ratings")


def _jobs(
    session: Session, project_id: int, *, automatic: bool
) -> tuple[list[tuple[Job, str | None]], int]:
    """The latest jobs (the automatic refreshes only if asked) and how many refreshes are hidden."""
    query = (
        select(Job, User.email)
        .outerjoin(User, User.id == Job.created_by_id)
        .where(Job.project_id == project_id)
    )
    hidden = 0
    if not automatic:
        query = query.where(~AUTOMATIC)
        hidden = (
            session.scalar(
                select(func.count()).select_from(Job).where(Job.project_id == project_id, AUTOMATIC)
            )
            or 0
        )
    rows = session.execute(query.order_by(Job.id.desc()).limit(LIST_LIMIT))
    return [(job, email) for job, email in rows], hidden


@router.get("/projects/{project_id}/jobs", response_class=HTMLResponse)
def jobs_page(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    automatic: bool = False,
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    jobs, hidden = _jobs(session, project.id, automatic=automatic)
    ctx = {
        "project": project,
        "tab": "jobs",
        "jobs": jobs,
        "active": any(job.status not in TERMINAL for job, _ in jobs),
        "kinds": [(k.name, _describe(k)) for k in project_kinds()],
        "limit": LIST_LIMIT,
        "show_automatic": automatic,
        "hidden_automatic": hidden,
    }
    template = "partials/dash_jobs_table.html" if is_htmx(request) else "pages/jobs.html"
    return render(request, template, ctx)


def _kind_or_404(name: str) -> JobKind:
    kind = KINDS.get(name)
    if kind is None or not kind.needs_project:
        raise HTTPException(404, f"no job kind {name!r} can be launched in a project")
    return kind


def _model_choices(
    session: Session, project_id: int, *, usable_only: bool = True
) -> list[tuple[int, str]]:
    """The models a new job may pick: failed and archived ones are left out (pending ones are
    marked, they may still fail their check)."""
    return [
        (m.id, m.name if m.check_status == "ready" else f"{m.name} (check {m.check_status})")
        for m in list_models(session, project_id, usable_only=usable_only)
    ]


def _form_page(
    request: Request,
    session: Session,
    project: Project,
    kind: JobKind,
    *,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    # A check may be run again on any model: that is how a fixed one comes back.
    choices = _model_choices(session, project.id, usable_only=kind.name != "check_model")
    if values is None:
        # Sensible starting points: every model for multi-model kinds, the newest for one.
        values = {}
        if "model_ids" in kind.params.model_fields:
            values["model_ids"] = [mid for mid, _ in choices]
        if "model_id" in kind.params.model_fields and choices:
            values["model_id"] = choices[-1][0]
    errors = errors or {}
    ctx = {
        "project": project,
        "tab": "jobs",
        "kind": kind.name,
        "description": _describe(kind),
        "queue": kind.queue,
        "fields": fields_for(kind.params, values, errors, models=choices),
        "general_error": errors.get(""),
        "has_errors": bool(errors),
    }
    return render(request, "pages/jobs_new.html", ctx, status_code=status_code)


@router.get("/projects/{project_id}/jobs/new", response_class=HTMLResponse)
def new_job_form(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    kind: str,
    model_id: int | None = None,
) -> HTMLResponse:
    """The launch form; `model_id` preselects the model of a one-model kind."""
    project = get_project_for(session, user, project_id, lead=True)
    spec = _kind_or_404(kind)
    values = None
    if model_id is not None and "model_id" in spec.params.model_fields:
        values = {"model_id": model_id}
    return _form_page(request, session, project, spec, values=values)


@router.post("/projects/{project_id}/jobs/new", response_class=HTMLResponse)
def launch_job(
    project_id: int, request: Request, session: SessionDep, user: PageUser, form: PostedForm
) -> Response:
    """Validate with the kind's schema (and its database checks); 422 shows errors inline."""
    project = get_project_for(session, user, project_id, lead=True)
    kind = _kind_or_404(str(form.get("kind", "")))
    params, problems = parse_form(kind.params, form)
    if problems:
        return _form_page(
            request, session, project, kind, values=params, errors=problems, status_code=422
        )
    try:
        refuse_archived(project)
        job = service.create_job(
            session,
            kind=kind.name,
            params=params,
            project_id=project.id,
            created_by_id=user.id,
            max_attempts=get_settings().job_max_attempts,
        )
    except DomainError as exc:
        return _form_page(
            request, session, project, kind, values=params, errors={"": exc.detail},
            status_code=http_status(exc),
        )  # fmt: skip
    except service.JobParamsError as exc:
        errors = errors_by_field(
            [e for e in exc.errors if list(e.get("loc", []))[:1] == ["params"]], skip_head=1
        )
        for other in exc.errors:
            if list(other.get("loc", []))[:1] != ["params"]:
                errors[""] = str(other.get("msg"))
        return _form_page(
            request, session, project, kind, values=params, errors=errors, status_code=422
        )
    record(session, actor=user, action="job.launch", target=f"job:{job.id}",
           project_id=project.id, details={"kind": job.kind})  # fmt: skip
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


def eta_seconds(progress: float, elapsed_seconds: float) -> float | None:
    """Seconds left at the rate measured so far, elapsed · (1 − p) / p; None before progress."""
    if not 0 < progress < 1 or elapsed_seconds <= 0:
        return None
    return elapsed_seconds * (1 - progress) / progress


def eta_text(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, round(seconds))} s left"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60:02d} min left"


def _related(session: Session, job: Job) -> list[tuple[str, str]]:
    """(label, href) for what a job made or started: the DPO child model, follow-up jobs."""
    result = job.result or {}
    links: list[tuple[str, str]] = []
    if job.kind == "train_dpo" and job.project_id is not None:
        for key, label in (("model_id", "Trained model"), ("parent_id", "Parent model")):
            model = session.get(ModelVersion, result.get(key) or 0)
            if model is not None:
                href = f"/projects/{job.project_id}/models#model-{model.id}"
                links.append((f"{label}: {model.name}", href))
    for key, value in result.items():
        if key.endswith("_job_id") and isinstance(value, int):
            what = key.removesuffix("_job_id").replace("_", " ")
            links.append((f"{what.capitalize()} job {value}", f"/jobs/{value}"))
    return links


# Result keys naming a model version or a user, shown with the name or email beside them.
MODEL_KEYS = frozenset({"model_id", "parent_id", "model_version_id"})
MODEL_LIST_KEYS = frozenset({"model_ids"})
USER_KEYS = frozenset({"annotator_id", "user_id", "created_by_id"})
# Maps keyed by user id (the reliability record of fits and snapshots): the key gains the email.
USER_KEYED_MAPS = frozenset({"excluded", "votes_by_annotator"})


def readable_result(session: Session, result: Any) -> Any:
    """The result with a `…_name` beside every model id and an `…_email` beside every user id."""
    model_ids: set[int] = set()
    user_ids: set[int] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in MODEL_KEYS and isinstance(value, int):
                    model_ids.add(value)
                elif key in MODEL_LIST_KEYS and isinstance(value, list):
                    model_ids.update(v for v in value if isinstance(v, int))
                elif key in USER_KEYS and isinstance(value, int):
                    user_ids.add(value)
                elif key in USER_KEYED_MAPS and isinstance(value, dict):
                    user_ids.update(int(k) for k in value if str(k).isdigit())
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(result)
    names: dict[int, str] = {}
    emails: dict[int, str] = {}
    if model_ids:
        rows = session.execute(
            select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(model_ids))
        )
        names = {model_id: name for model_id, name in rows}
    if user_ids:
        rows = session.execute(select(User.id, User.email).where(User.id.in_(user_ids)))
        emails = {user_id: email for user_id, email in rows}

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            out[key] = rewrite(value)
            if key in USER_KEYED_MAPS and isinstance(value, dict):
                out[key] = {
                    (f"{k} {emails[int(k)]}" if str(k).isdigit() and int(k) in emails else k): v
                    for k, v in out[key].items()
                }
            stem = key.removesuffix("_id").removesuffix("_ids")
            if key in MODEL_KEYS and value in names:
                out[f"{stem}_name"] = names[value]
            elif key in MODEL_LIST_KEYS and isinstance(value, list):
                out[f"{stem}_names"] = [names.get(v, f"#{v}") for v in value]
            elif key in USER_KEYS and value in emails:
                out[f"{stem}_email"] = emails[value]
        return out

    return rewrite(result)


def _job_context(session: Session, job: Job, *, error: str | None = None) -> dict[str, Any]:
    metrics = job.metrics or {}
    panels = plots.group_metric_series(metrics)
    eta = None
    if job.status == "running" and job.started_at is not None:
        elapsed = (utcnow() - job.started_at).total_seconds()
        seconds = eta_seconds(job.progress, elapsed)
        eta = eta_text(seconds) if seconds is not None else None
    return {
        "job": job,
        "finished": job.status in TERMINAL,
        "can_cancel": job.status not in TERMINAL,
        "can_retry": job.status in service.RETRYABLE,
        "log_lines": list(job.log or [])[-LOG_LINES:],
        "metrics_svg": plots.small_multiples(panels, columns=2) if panels else None,
        "action_error": error,
        "eta": eta,
        "related": _related(session, job),
        "result": readable_result(session, job.result) if job.result else None,
        "params": readable_result(session, job.params or {}),
    }


def _job_status(
    request: Request,
    session: Session,
    job: Job,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    project = session.get(Project, job.project_id) if job.project_id is not None else None
    ctx = {"project": project, **_job_context(session, job, error=error)}
    template = "partials/job_status.html" if is_htmx(request) else "pages/job.html"
    return render(request, template, ctx, status_code=status_code)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    return _job_status(request, session, job_for(session, user, job_id))


def _act(
    request: Request,
    session: Session,
    user: User,
    job_id: int,
    act: Callable[[Session, Job], object],
    action: str,
) -> Response:
    """Cancel or retry from the job page; a refusal shows on the page with its status."""
    job = job_for(session, user, job_id)
    try:
        act(session, job)
    except DomainError as exc:
        return _job_status(
            request, session, job, error=str(exc.detail), status_code=http_status(exc)
        )
    record(session, actor=user, action=action, target=f"job:{job.id}",
           project_id=job.project_id)  # fmt: skip
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.post("/jobs/{job_id}/cancel", response_class=HTMLResponse)
def cancel_job(job_id: int, request: Request, session: SessionDep, user: PageUser) -> Response:
    return _act(request, session, user, job_id, service.request_cancel, "job.cancel")


@router.post("/jobs/{job_id}/retry", response_class=HTMLResponse)
def retry_job(job_id: int, request: Request, session: SessionDep, user: PageUser) -> Response:
    return _act(request, session, user, job_id, service.retry_job, "job.retry")
