"""Creating, enqueueing, cancelling and reaping jobs. The jobs table is the source of truth."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import event, or_, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict
from app.jobs.kinds import KINDS, JobParams
from app.jobs.models import TERMINAL, Job

log = logging.getLogger("prefloop.jobs")
_PENDING = "prefloop_pending_enqueue"


class JobStateError(Conflict):
    """The job's status does not allow the action (cancel a finished job, retry a running one)."""


class JobParamsError(ValueError):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid job params")
        self.errors = errors


def validate_params(kind: str, params: dict[str, Any]) -> JobParams:
    """The kind's params model for a submission (defaults filled in)."""
    spec = KINDS.get(kind)
    if spec is None:
        raise JobParamsError(
            [{"loc": ["kind"], "msg": f"unknown job kind {kind!r}; known: {sorted(KINDS)}"}]
        )
    try:
        return spec.params.model_validate(params)
    except ValidationError as exc:
        raise JobParamsError(
            [
                {"loc": ["params", *map(str, e["loc"])], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors()
            ]
        ) from None


def create_job(
    session: Session,
    *,
    kind: str,
    params: dict[str, Any],
    project_id: int | None,
    created_by_id: int | None,
    max_attempts: int,
) -> Job:
    """Insert a queued job; its message is sent only once this transaction commits."""
    valid = validate_params(kind, params)
    spec = KINDS[kind]
    if spec.needs_project and project_id is None:
        raise JobParamsError([{"loc": ["project_id"], "msg": f"{kind} jobs need a project"}])
    if not spec.needs_project and project_id is not None:
        # System jobs (the selftest diagnostic) are the admins' (POST /api/v1/jobs), not a
        # project's: a lead must not be able to occupy the workers with them.
        raise JobParamsError(
            [{"loc": ["kind"], "msg": f"{kind} is a system job, not a project job (admins only)"}]
        )
    if spec.check is not None and project_id is not None:
        errors = spec.check(session, project_id, valid)
        if errors:
            raise JobParamsError(errors)
    clean = valid.model_dump(mode="json")
    job = Job(
        kind=kind,
        queue=spec.queue_for(valid),
        params=clean,
        project_id=project_id,
        created_by_id=created_by_id,
        max_attempts=max_attempts,
        status="queued",
        metrics={},
        log=[],
    )
    session.add(job)
    session.flush()
    enqueue_after_commit(session, job)
    return job


def enqueue_after_commit(session: Session, job: Job) -> None:
    job.enqueued_at = utcnow()
    session.info.setdefault(_PENDING, []).append((job.id, job.queue))


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    for job_id, queue in session.info.pop(_PENDING, []):
        send_job(job_id, queue)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


def send_job(job_id: int, queue: str, countdown: float | None = None) -> None:
    """Hand a job id to the broker. A broker outage is logged, not raised: the reaper re-sends."""
    from app.core.broker import celery_app

    try:
        celery_app.send_task(
            "prefloop.run_job", args=[job_id], queue=queue, countdown=countdown, retry=False
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure is recoverable by the reaper
        log.warning("jobs.enqueue_failed job_id=%s error=%s", job_id, exc)


def request_cancel(session: Session, job: Job) -> None:
    if job.status in TERMINAL:
        raise JobStateError(f"job {job.id} already {job.status}")
    job.cancel_requested = True
    if job.status == "queued":
        job.status = "cancelled"
        job.finished_at = utcnow()
    session.flush()


# A partial job retried does only what is missing (a generate job skips stored images).
RETRYABLE = ("failed", "cancelled", "partial")


def retry_job(session: Session, job: Job) -> None:
    """Run a failed, cancelled or partial job again with a fresh attempts budget."""
    if job.status not in RETRYABLE:
        raise JobStateError(
            f"only failed, cancelled or partial jobs can be retried (is {job.status})"
        )
    job.status = "queued"
    job.attempts = 0
    job.error = None
    job.cancel_requested = False
    job.finished_at = None
    session.flush()
    enqueue_after_commit(session, job)


def reap_stale_jobs(session: Session, settings: Settings) -> list[int]:
    """Re-queue running jobs whose worker went silent, and re-send queued jobs whose message
    may have been lost. Returns the ids re-sent (after the caller commits)."""
    now = utcnow()
    stale_before = now - dt.timedelta(seconds=settings.job_stale_seconds)
    resent: list[int] = []
    running = session.scalars(
        select(Job)
        .where(
            Job.status == "running",
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before),
        )
        .with_for_update(skip_locked=True)
    ).all()
    for job in running:
        silent = (now - (job.heartbeat_at or job.started_at or now)).total_seconds()
        note = f"worker {job.worker} lost during attempt {job.attempts} (silent {silent:.0f}s)"
        job.log = [*job.log[-199:], note]
        if job.attempts >= job.max_attempts:
            job.status = "failed"
            job.error = f"gave up after {job.attempts} attempts: {note}"
            job.finished_at = now
            log.warning("jobs.gave_up job_id=%s attempts=%s", job.id, job.attempts)
            continue
        job.status = "queued"
        job.worker = None
        enqueue_after_commit(session, job)
        resent.append(job.id)
        log.warning("jobs.requeued job_id=%s attempts=%s", job.id, job.attempts)
    lost = session.scalars(
        select(Job)
        .where(Job.status == "queued", Job.enqueued_at < stale_before)
        .with_for_update(skip_locked=True)
    ).all()
    for job in lost:
        enqueue_after_commit(session, job)
        resent.append(job.id)
    session.flush()
    return resent


def to_public(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "project_id": job.project_id,
        "kind": job.kind,
        "queue": job.queue,
        "params": job.params,
        "status": job.status,
        "progress": job.progress,
        "progress_message": job.progress_message,
        "metrics": job.metrics,
        "result": job.result,
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "log": job.log[-50:],
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "heartbeat_at": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
    }
