"""Runs one job: claim the row, heartbeat, call the kind's handler, record the outcome.

Handlers are plain functions `handler(ctx) -> dict`, named per kind in `app.jobs.kinds`; the
context carries the kind's validated params model (`ctx.params`) and, for project jobs, an int
`project_id`. They report progress and metrics through the context and check for cancellation
between units of work.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import CursorResult, Update, select, update
from sqlalchemy.orm import Session

import app.models  # noqa: F401  (every table, so relationships and foreign keys resolve)
from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker, session_scope, utcnow
from app.core.storage import MediaStore, get_media_store
from app.jobs.kinds import KINDS, JobKind, JobParams
from app.jobs.models import Job
from app.jobs.service import enqueue_after_commit

log = logging.getLogger("prefloop.worker")

P = TypeVar("P", bound=JobParams)
Handler = Callable[[Any], dict[str, Any]]


def resolve_handler(kind: JobKind[Any]) -> Handler:
    """The function a kind's `handler` path names."""
    module, _, name = kind.handler.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise RuntimeError(f"job kind {kind.name!r} names no handler {kind.handler!r}")
    return fn


class JobCancelled(Exception):
    """Raised inside a handler when the job was cancelled; the job ends `cancelled`."""


class JobPartial(Exception):  # noqa: N818 - an outcome, not an error of the handler
    """Raised by a handler that finished with part of its work failed: the job ends `partial`
    with `result` (what was done) and `reason` (what was not) as its error."""

    def __init__(self, result: dict[str, Any], reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class TransientJobError(Exception):
    """A failure worth another attempt (a lost connection, a soft time limit after a checkpoint)."""


class TimeLimitReached(TransientJobError):
    """The job stopped at its soft time limit after saving progress: it goes back to the queue
    without using up an attempt (attempts are for failures). Raised only when the run moved
    forward, so a job that cannot progress still runs out of attempts."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobContext(Generic[P]):
    def __init__(
        self, job: Job, params: P, settings: Settings, store: MediaStore, name: str
    ) -> None:
        self.job_id = job.id
        self.kind = job.kind
        self.project_id: int | None = job.project_id
        self.params: P = params
        self.attempt = job.attempts
        self.settings = settings
        self.store = store
        self.worker = name
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._metrics: dict[str, list[list[float]]] = {k: list(v) for k, v in job.metrics.items()}
        self._log: list[str] = list(job.log)

    # Database helpers -----------------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope() as session:
            yield session

    def _update(self, **values: Any) -> None:
        with session_scope() as session:
            session.execute(
                update(Job).where(Job.id == self.job_id, Job.worker == self.worker).values(**values)
            )

    # Reporting ------------------------------------------------------------------------------
    def progress(self, fraction: float, message: str = "") -> None:
        self._update(
            progress=max(0.0, min(1.0, float(fraction))),
            progress_message=message[:500],
            heartbeat_at=utcnow(),
        )

    def log(self, line: str) -> None:
        self._log = [*self._log[-199:], f"{utcnow():%H:%M:%S} {line}"]
        self._update(log=self._log)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Append one point per metric to the job's time series."""
        for name, value in values.items():
            self._metrics.setdefault(name, []).append([step, float(value)])
        self._update(metrics=self._metrics)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop points past a step (a resumed run repeats them from its checkpoint)."""
        self._metrics = {k: [p for p in v if p[0] <= after_step] for k, v in self._metrics.items()}
        self._update(metrics=self._metrics)

    # Cancellation ---------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set() or self._lost.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_requested:
            raise JobCancelled()

    def work_dir(self) -> str:
        """A per-job folder under the media store for checkpoints and outputs."""
        path = self.store.root / "jobs" / str(self.job_id)
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


class ProjectJobContext(JobContext[P]):
    """The context of a job that belongs to a project."""

    def __init__(
        self, job: Job, params: P, settings: Settings, store: MediaStore, name: str
    ) -> None:
        super().__init__(job, params, settings, store, name)
        if job.project_id is None:
            raise ValueError(f"{job.kind} job {job.id} has no project")
        self.project_id: int = job.project_id


def make_context(
    job: Job, settings: Settings, store: MediaStore, name: str
) -> tuple[JobContext[Any], Handler]:
    """The job's context, its params re-validated by the kind's model, and its handler."""
    kind = KINDS.get(job.kind)
    if kind is None:
        raise RuntimeError(f"no handler for job kind {job.kind!r} in this worker")
    params = kind.params.model_validate(job.params)
    context = ProjectJobContext if kind.needs_project else JobContext
    return context(job, params, settings, store, name), resolve_handler(kind)


def _rows_updated(session: Session, statement: Update) -> int:
    """How many rows an UPDATE matched (its result is a CursorResult, typed as a plain Result)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def _claim(session: Session, job_id: int, name: str) -> Job | None:
    """Atomically move a queued job to running for this worker; None if someone else has it."""
    now = utcnow()
    claimed = _rows_updated(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            worker=name,
            heartbeat_at=now,
            started_at=now,
            error=None,
        )
    )
    if claimed != 1:
        return None
    return session.scalar(select(Job).where(Job.id == job_id))


def _heartbeat_loop(ctx: JobContext, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            with session_scope() as session:
                beaten = _rows_updated(
                    session,
                    update(Job)
                    .where(Job.id == ctx.job_id, Job.worker == ctx.worker, Job.status == "running")
                    .values(heartbeat_at=utcnow()),
                )
                if beaten != 1:
                    # The reaper gave the job to someone else: stop working on it.
                    ctx._lost.set()
                cancelled = session.scalar(select(Job.cancel_requested).where(Job.id == ctx.job_id))
                if cancelled:
                    ctx._cancel.set()
        except Exception as exc:  # noqa: BLE001 - a flaky database must not kill the job
            log.warning("jobs.heartbeat_failed job_id=%s error=%s", ctx.job_id, exc)


def execute(job_id: int, name: str | None = None) -> str:
    """Run a job to an outcome; returns the final status (or 'skipped')."""
    settings = get_settings()
    name = name or worker_name()
    factory = get_sessionmaker()
    with session_scope(factory) as session:
        job = _claim(session, job_id, name)
        if job is None:
            existing = session.get(Job, job_id)
            if existing is not None and existing.status == "queued" and existing.cancel_requested:
                existing.status = "cancelled"
                existing.finished_at = utcnow()
                return "cancelled"
            log.info("jobs.skip job_id=%s status=%s", job_id, existing and existing.status)
            return "skipped"
        if job.attempts > job.max_attempts:
            job.status = "failed"
            job.error = job.error or f"gave up after {job.max_attempts} attempts"
            job.finished_at = utcnow()
            return "failed"
        try:
            ctx, fn = make_context(job, settings, get_media_store(), name)
        except Exception as exc:  # noqa: BLE001 - a row the worker cannot run fails at once
            log.error("jobs.failed job_id=%s\n%s", job_id, traceback.format_exc())
            job.status = "failed"
            job.error = f"{type(exc).__name__}: {exc}"
            job.finished_at = utcnow()
            return "failed"
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat_loop, args=(ctx, stop, settings.job_heartbeat_seconds), daemon=True
    )
    beat.start()
    log.info("jobs.start job_id=%s kind=%s attempt=%s", job_id, ctx.kind, ctx.attempt)
    started = time.monotonic()
    outcome: tuple[str, dict[str, Any]]
    try:
        result = fn(ctx)
        outcome = ("succeeded", {"result": result, "progress": 1.0, "error": None})
    except JobPartial as exc:
        outcome = ("partial", {"result": exc.result, "progress": 1.0, "error": exc.reason})
    except JobCancelled:
        outcome = ("cancelled", {})
    except TimeLimitReached as exc:
        outcome = ("requeue", {"error": f"{type(exc).__name__}: {exc}"})
    except TransientJobError as exc:
        outcome = ("retry", {"error": f"{type(exc).__name__}: {exc}"})
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        log.error("jobs.failed job_id=%s\n%s", job_id, traceback.format_exc())
        outcome = ("failed", {"error": f"{type(exc).__name__}: {exc}"})
    finally:
        stop.set()
        beat.join(timeout=5)
    status, values = outcome
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        if job is None or job.worker != name or job.status != "running":
            return "lost"
        if status == "requeue":
            # Give back the attempt the claim counted.
            job.attempts = max(0, job.attempts - 1)
            status = "retry"
            job.status = "queued"
            job.worker = None
            job.error = values["error"]
            enqueue_after_commit(session, job)
        elif status == "retry":
            if job.attempts < job.max_attempts:
                job.status = "queued"
                job.worker = None
                job.error = values["error"]
                enqueue_after_commit(session, job)
            else:
                status = "failed"
                values["error"] = f"gave up after {job.attempts} attempts: {values['error']}"
        if status != "retry":
            job.status = status
            job.finished_at = utcnow()
            for key, value in values.items():
                setattr(job, key, value)
    log.info(
        "jobs.end job_id=%s status=%s seconds=%.1f", job_id, status, time.monotonic() - started
    )
    return status
