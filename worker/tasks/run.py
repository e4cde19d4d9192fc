"""The Celery tasks: thin wrappers that hand a job id to the runner."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task
from celery.signals import worker_ready

from app.core.broker import celery_app
from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.jobs.periodic import periodic_work
from worker import runner

log = logging.getLogger("prefloop.worker")


@celery_app.task(name="prefloop.run_job", bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: int) -> str:
    return runner.execute(int(job_id))


@celery_app.task(name="prefloop.periodic")
def periodic() -> list[int]:
    """Beat's heartbeat of the platform: re-queue jobs whose worker died, refresh ratings."""
    return periodic_work()


def _report_in(name: str, queues: str, stop: threading.Event, interval: float) -> None:
    from app.jobs.models import WorkerHeartbeat
    from worker.tasks.selftest import device_facts

    facts = device_facts()
    while True:
        try:
            with session_scope() as session:
                row = session.get(WorkerHeartbeat, name)
                if row is None:
                    session.add(WorkerHeartbeat(name=name, queues=queues, facts=facts))
                else:
                    row.last_seen_at = utcnow()
                    row.queues = queues
        except Exception as exc:  # noqa: BLE001 - reporting in must never kill the worker
            log.warning("worker.heartbeat_failed error=%s", exc)
        if stop.wait(interval):
            return


_stop_reporting = threading.Event()


def _report_interval() -> float:
    return min(10.0, get_settings().job_stale_seconds / 3)


@worker_ready.connect
def _start_reporting(sender: Any = None, **_: Any) -> None:
    queues = ",".join(sorted(q.name for q in sender.app.amqp.queues.consume_from.values()))
    thread = threading.Thread(
        target=_report_in,
        # Several times within PREFLOOP_JOB_STALE_SECONDS, by which /healthz judges workers.
        args=(runner.worker_name(), queues, _stop_reporting, _report_interval()),
        daemon=True,
    )
    thread.start()
