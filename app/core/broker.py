"""The Celery application: queues `gpu` and `cpu`, and settings for long, crash-prone jobs.

It lives on the web side because the web only sends job ids by task name (`prefloop.run_job`);
the task bodies are imported by name (`worker.tasks.run`) in worker processes alone, so the web
runs without the worker's dependencies. `celery -A app.core.broker` names it for beat and Flower.

The broker only carries job ids; the jobs table says what is really going on. Messages are
acknowledged after the task finishes (acks_late) and given back if the worker dies, one task at a
time per process (prefetch 1). Embedded mode uses the filesystem transport, which does not
redeliver after a crash: the reaper covers that from the jobs table.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from app.core.config import Settings, get_settings


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options: dict[str, Any] = {}
    if settings.embedded:
        folder = settings.broker_dir / "queue"
        folder.mkdir(parents=True, exist_ok=True)
        control = settings.broker_dir / "control"
        control.mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "control_folder": str(control),
        }
    else:
        # Above the longest job, or Redis hands a running job's message to a second worker.
        transport_options = {"visibility_timeout": settings.broker_visibility_timeout}
        if settings.broker_key_prefix:
            transport_options["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [
            Queue(q, Exchange(q, type="direct"), routing_key=q) for q in ("gpu", "cpu")
        ],
        "task_default_queue": "cpu",
        "task_default_exchange": "cpu",
        "task_default_routing_key": "cpu",
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "beat_schedule": {
            "reap-stale-jobs": {
                "task": "prefloop.periodic",
                "schedule": settings.reaper_interval_seconds,
                "options": {"queue": "cpu"},
            }
        },
    }


def make_celery(settings: Settings | None = None) -> Celery:
    app = Celery("prefloop")
    app.conf.update(celery_config(settings or get_settings()))
    app.conf.imports = ("worker.tasks.run",)
    return app


celery_app = make_celery()
