"""Registering, checking, renaming, archiving, deleting and listing model versions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import set_archived
from app.core.errors import Conflict, Invalid
from app.generators.models import ModelVersion
from app.generators.schemas import ModelCreate, ModelPublic, ModelUpdate
from app.generators.sources import SourceError, resolve_sources
from app.pairs.hiding import refresh_hidden
from app.projects.models import Project
from app.ratings.models import RewardModel


class ModelNameTaken(Conflict):
    pass


class UnknownParent(Invalid):
    pass


class ModelUnusable(Conflict):
    """A job names a model that failed its check or is archived."""


class StillReferenced(Conflict):
    """A delete refused because something still refers to the thing (the detail says what)."""


def counted_references(session: Session, counts: Iterable[tuple[str, Any, Any]]) -> list[str]:
    """Each (label, table, condition) that rows match, as "N label"."""
    found = []
    for label, table, condition in counts:
        n = int(session.scalar(select(func.count()).select_from(table).where(condition)) or 0)
        if n:
            found.append(f"{n} {label}")
    return found


def naming_jobs(found: list[str], job_ids: Iterable[int]) -> list[str]:
    """`found` and, when there are any, the jobs (whose params name the thing) by id."""
    jobs = sorted(job_ids)
    return [*found, f"jobs {', '.join(map(str, jobs))}"] if jobs else found


def delete_unreferenced(session: Session, row: Any, refs: list[str], refusal: str) -> None:
    """Delete `row` unless `refs` names what still refers to it; `refusal` is the detail's
    opening, followed by those references."""
    if refs:
        raise StillReferenced(f"{refusal} {'; '.join(refs)}; archive it instead")
    session.delete(row)
    session.flush()


def _refuse_taken_name(session: Session, project_id: int, name: str, *, but: int = 0) -> None:
    taken = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.project_id == project_id, ModelVersion.name == name, ModelVersion.id != but
        )
    )
    if taken is not None:
        raise ModelNameTaken(f"a model named {name!r} already exists in this project")


def refuse_unusable(models: Iterable[ModelVersion]) -> None:
    """Raise `ModelUnusable` naming every failed or archived model among these.

    Pending models may be picked: a job that starts before the check has run isolates a model
    that will not load, like any other model failure.
    """
    problems = []
    for model in models:
        if model.archived_at is not None:
            problems.append(f"model {model.id} ({model.name}) is archived; unarchive it to use it")
        elif model.check_status == "failed":
            problems.append(
                f"model {model.id} ({model.name}) failed its check: {model.check_error}; "
                "fix it and check it again, or archive it"
            )
    if problems:
        raise ModelUnusable("; ".join(problems))


def register_model(
    session: Session, *, project: Project, data: ModelCreate, created_by_id: int | None = None
) -> ModelVersion:
    """A new model version, `pending` until the check job queued with it has run."""
    _refuse_taken_name(session, project.id, data.name)
    if data.parent_id is not None:
        parent = session.get(ModelVersion, data.parent_id)
        if parent is None or parent.project_id != project.id:
            raise UnknownParent(f"parent_id {data.parent_id} is not a model of this project")
    if data.params.reward_model_id is not None:
        reward = session.get(RewardModel, data.params.reward_model_id)
        if reward is None or reward.project_id != project.id:
            raise Invalid(
                f"params.reward_model_id {data.params.reward_model_id} is not a reward model "
                "of this project"
            )
    try:
        base, adapter = resolve_sources(
            session, project_id=project.id, base=data.base, adapter=data.adapter
        )
    except SourceError as exc:
        raise Invalid(str(exc)) from None
    model = ModelVersion(
        project_id=project.id,
        name=data.name,
        base=base,
        adapter=adapter,
        params=data.params.stored(),
        parent_id=data.parent_id,
        status="arena",
        check_status="pending",
        evaluation={},
    )
    session.add(model)
    session.flush()
    queue_check(session, model, created_by_id=created_by_id)
    return model


def queue_check(session: Session, model: ModelVersion, *, created_by_id: int | None) -> int:
    """Queue the model's check job (sent once the transaction commits); returns its id."""
    from app.jobs.service import create_job

    model.check_status = "pending"
    model.check_error = None
    job = create_job(
        session,
        kind="check_model",
        params={"model_id": model.id},
        project_id=model.project_id,
        created_by_id=created_by_id,
        max_attempts=get_settings().job_max_attempts,
    )
    return job.id


def update_model(session: Session, *, model: ModelVersion, data: ModelUpdate) -> dict[str, Any]:
    """Rename and/or (un)archive; returns what changed, for the audit row."""
    changes: dict[str, Any] = {}
    if data.name is not None and data.name != model.name:
        _refuse_taken_name(session, model.project_id, data.name, but=model.id)
        changes["name"] = [model.name, data.name]
        model.name = data.name
    set_archived(model, data.archived, changes)
    if "archived" in changes:
        refresh_hidden(session, project_id=model.project_id, model_id=model.id)
    session.flush()
    return changes


def model_references(session: Session, model: ModelVersion) -> list[str]:
    """What still refers to a model version, in words; empty when it can be deleted."""
    from app.images.models import Image
    from app.jobs.models import Job
    from app.ratings.models import Rating

    found = counted_references(
        session,
        [
            ("images", Image, Image.model_version_id == model.id),
            ("child models", ModelVersion, ModelVersion.parent_id == model.id),
            ("leaderboard ratings", Rating, Rating.model_version_id == model.id),
        ],
    )
    # Jobs name models inside their params; its own check jobs do not count.
    jobs = (
        job_id
        for job_id, kind, params in session.execute(
            select(Job.id, Job.kind, Job.params).where(Job.project_id == model.project_id)
        )
        if kind != "check_model" and _names_model(params or {}, model.id)
    )
    return naming_jobs(found, jobs)


def _names_model(params: dict[str, Any], model_id: int) -> bool:
    return params.get("model_id") == model_id or model_id in (params.get("model_ids") or [])


def delete_model(session: Session, *, model: ModelVersion) -> None:
    refusal = f"model {model.id} ({model.name}) is still referenced by"
    delete_unreferenced(session, model, model_references(session, model), refusal)


def to_public(model: ModelVersion) -> ModelPublic:
    return ModelPublic(
        id=model.id,
        project_id=model.project_id,
        name=model.name,
        base=model.base,
        adapter=model.adapter,
        params=model.params,
        parent_id=model.parent_id,
        produced_by_job_id=model.produced_by_job_id,
        status=model.status,
        evaluation=model.evaluation or {},
        check_status=model.check_status,
        check_error=model.check_error,
        archived=model.archived_at is not None,
    )


def list_models(
    session: Session, project_id: int, *, usable_only: bool = False
) -> list[ModelVersion]:
    """The project's models; `usable_only`: those a new job may pick (not failed, not archived)."""
    stmt = select(ModelVersion).where(ModelVersion.project_id == project_id)
    if usable_only:
        stmt = stmt.where(
            ModelVersion.archived_at.is_(None), ModelVersion.check_status != "failed"
        )
    return list(session.scalars(stmt.order_by(ModelVersion.id)))
