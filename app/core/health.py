"""/healthz for load balancers and ops, /metrics for Prometheus."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select, text

from app.core.config import get_settings
from app.core.db import get_sessionmaker, utcnow
from app.jobs.models import STATUSES, Job, WorkerHeartbeat

router = APIRouter(tags=["ops"])

REQUESTS = Counter("prefloop_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "prefloop_http_request_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VOTES = Counter("prefloop_votes_total", "Votes recorded", ["choice"])
# The annotator API's plain requests answered by app.votes.fast_lane ("lane"), and those it
# handed to the full application ("long"): a high share of the latter costs CPU.
FAST_LANE = Counter(
    "prefloop_fast_lane_requests_total", "Annotator API requests by path", ["request", "way"]
)
JOBS = Gauge("prefloop_jobs", "Jobs by status", ["status"])
WORKER_AGE = Gauge("prefloop_worker_heartbeat_age_seconds", "Seconds since a worker reported in")


def _broker_ok() -> tuple[bool, str]:
    settings = get_settings()
    if settings.embedded:
        ok = settings.broker_dir.exists()
        return ok, "filesystem"
    from app.core.broker import celery_app

    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True, "redis"
    except Exception as exc:  # noqa: BLE001
        return False, f"unreachable: {type(exc).__name__}"


def worker_problem(age_seconds: float | None, stale_seconds: float) -> str | None:
    """Why jobs would not run, judged by the freshest worker heartbeat; None when one is recent."""
    if age_seconds is None:
        return "no worker has reported in yet; jobs wait in the queue"
    if age_seconds > stale_seconds:
        return (
            f"no worker heartbeat for {age_seconds:.0f} s (more than PREFLOOP_JOB_STALE_SECONDS="
            f"{stale_seconds:g}); jobs wait in the queue"
        )
    return None


@router.get(
    "/healthz",
    responses={
        503: {"description": "Unavailable (database or broker down), or degraded under strict"}
    },
)
def healthz(
    strict: bool = Query(
        False, description="Also answer 503 when the platform is degraded (no live worker)."
    ),
) -> JSONResponse:
    """`ok`; `degraded` (still 200: the web and voting work, jobs do not run) with a `reason`;
    or `unavailable` (503: the database or the broker is down)."""
    body: dict[str, Any] = {}
    status = 200
    reason: str | None = None
    try:
        with get_sessionmaker()() as session:
            session.execute(text("SELECT 1"))
            last = session.scalar(select(func.max(WorkerHeartbeat.last_seen_at)))
        body["database"] = "ok"
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=dt.UTC)
        age = (utcnow() - last).total_seconds() if last else None
        body["worker"] = {
            "last_heartbeat": last.isoformat() if last else None,
            "age_seconds": round(age, 1) if age is not None else None,
        }
        reason = worker_problem(age, get_settings().job_stale_seconds)
    except Exception as exc:  # noqa: BLE001
        body["database"] = f"unavailable: {type(exc).__name__}"
        status = 503
    broker_ok, broker = _broker_ok()
    body["broker"] = "ok" if broker_ok else broker
    if not broker_ok:
        status = 503
    if status == 503:
        body["status"] = "unavailable"
    elif reason is not None:
        body["status"] = "degraded"
        body["reason"] = reason
        if strict:
            status = 503
    else:
        body["status"] = "ok"
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


# Documented as text/plain (the Prometheus exposition format), not the default JSON.
@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    try:
        with get_sessionmaker()() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            last = session.scalar(select(func.max(WorkerHeartbeat.last_seen_at)))
        for status in STATUSES:
            JOBS.labels(status).set(counts.get(status, 0))
        if last is not None:
            WORKER_AGE.set((utcnow() - last).total_seconds())
    except Exception:  # noqa: BLE001 - metrics must answer even when the database does not
        pass
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
