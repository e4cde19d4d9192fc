"""/healthz tells the truth about workers: `degraded` (200, with the reason) without a recent
heartbeat, 503 under `?strict=1`; `ok` once a worker reports in."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import delete

from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.core.health import worker_problem
from app.jobs.models import WorkerHeartbeat


def test_worker_problem_by_age() -> None:
    assert worker_problem(None, 60) == "no worker has reported in yet; jobs wait in the queue"
    assert worker_problem(59.9, 60) is None
    assert worker_problem(60.0, 60) is None
    assert worker_problem(61.2, 60) == (
        "no worker heartbeat for 61 s (more than PREFLOOP_JOB_STALE_SECONDS=60); "
        "jobs wait in the queue"
    )


@pytest.fixture()
def heartbeats(engine) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """No worker rows before and after the test (the rows are committed: /healthz reads them)."""
    with session_scope() as session:
        session.execute(delete(WorkerHeartbeat))
    yield
    with session_scope() as session:
        session.execute(delete(WorkerHeartbeat))


def _beat(seconds_ago: float) -> None:
    with session_scope() as session:
        row = session.get(WorkerHeartbeat, "test-worker@host")
        if row is None:
            row = WorkerHeartbeat(name="test-worker@host", queues="cpu", facts={})
            session.add(row)
        row.last_seen_at = utcnow() - dt.timedelta(seconds=seconds_ago)


def test_healthz_degraded_until_a_worker_reports_in(client, heartbeats, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(get_settings(), "job_stale_seconds", 60.0)

    never = client.get("/healthz")
    assert never.status_code == 200
    assert never.json()["status"] == "degraded"
    assert never.json()["reason"] == "no worker has reported in yet; jobs wait in the queue"
    strict = client.get("/healthz", params={"strict": "1"})
    assert strict.status_code == 503 and strict.headers["Retry-After"] == "5"
    assert strict.json()["status"] == "degraded"

    _beat(seconds_ago=300)
    stale = client.get("/healthz").json()
    assert stale["status"] == "degraded" and "no worker heartbeat for 300 s" in stale["reason"]
    assert stale["worker"]["age_seconds"] >= 300
    assert client.get("/healthz?strict=1").status_code == 503

    _beat(seconds_ago=1)
    fresh = client.get("/healthz")
    assert fresh.status_code == 200
    assert fresh.json()["status"] == "ok" and "reason" not in fresh.json()
    assert client.get("/healthz?strict=1").status_code == 200
