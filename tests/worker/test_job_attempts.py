"""A job re-queued at its soft time limit keeps its attempts; failures use them up."""

from __future__ import annotations

import pytest

from app.core.db import session_scope
from app.jobs.models import Job
from app.jobs.service import create_job
from worker import runner


def _selftest_job(max_attempts: int) -> int:
    with session_scope() as session:
        job = create_job(
            session, kind="selftest", params={}, project_id=None, created_by_id=None,
            max_attempts=max_attempts,
        )  # fmt: skip
        return job.id


def _job(job_id: int) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_time_limit_requeues_without_using_an_attempt(
    pg_url: str, sent_jobs: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks.selftest as selftest_module  # the kind's handler, replaced below

    def stops_at_the_limit(ctx: runner.JobContext) -> None:
        raise runner.TimeLimitReached("soft time limit reached at step 10")

    monkeypatch.setattr(selftest_module, "selftest", stops_at_the_limit)
    job_id = _selftest_job(max_attempts=2)
    for _ in range(4):  # more runs than attempts
        assert runner.execute(job_id) == "retry"
        job = _job(job_id)
        assert job.status == "queued" and job.attempts == 0, (job.status, job.attempts)
        assert "time limit" in (job.error or "")
    assert sent_jobs.count((job_id, "cpu")) >= 4

    def fails(ctx: runner.JobContext) -> None:
        raise runner.TransientJobError("connection lost")

    monkeypatch.setattr(selftest_module, "selftest", fails)
    assert runner.execute(job_id) == "retry"
    assert _job(job_id).attempts == 1
    assert runner.execute(job_id) == "failed"
    job = _job(job_id)
    assert job.status == "failed" and "gave up after 2 attempts" in (job.error or "")
