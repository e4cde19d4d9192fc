"""`selftest`: a diagnostic ops can launch to check that workers run end to end."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from typing import Any

from app.jobs.kinds import SelftestParams
from worker.runner import JobContext, TransientJobError


def device_facts() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_threads": torch.get_num_threads(),
    }


def selftest(ctx: JobContext[SelftestParams]) -> dict[str, Any]:
    steps = ctx.params.steps
    for step in range(steps):
        ctx.check_cancelled()
        time.sleep(ctx.params.sleep)
        ctx.progress((step + 1) / steps, f"step {step + 1} of {steps}")
        ctx.metrics(step + 1, {"step_seconds": ctx.params.sleep})
    if ctx.params.fail:
        raise TransientJobError(f"selftest asked to fail (attempt {ctx.attempt})")
    facts = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "attempt": ctx.attempt,
        **device_facts(),
    }
    path = ctx.store.write_file(f"jobs/{ctx.job_id}/selftest.json", json.dumps(facts).encode())
    ctx.log(f"wrote {path.name}")
    return {**facts, "media_file": str(path.relative_to(ctx.store.root))}
