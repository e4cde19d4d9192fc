"""`check_model`: a new model version loads and samples one image, or says why it cannot.

The verdict is stored on the model (`check_status` ready/failed, `check_error`); the image
is thrown away. A failed check also fails the job, with the same reason, so the job page and
the models page agree.
"""

from __future__ import annotations

import time
from typing import Any

from app.generators.models import ModelVersion
from app.jobs.kinds import CheckModelParams
from worker.runner import JobCancelled, ProjectJobContext, TransientJobError

CHECK_PROMPT = "a red circle"
CHECK_SEED = 0


class ModelCheckFailed(RuntimeError):
    pass


def _verdict(ctx: ProjectJobContext[Any], status: str, error: str | None) -> None:
    with ctx.session() as session:
        model = session.get(ModelVersion, ctx.params.model_id)
        if model is not None:
            model.check_status = status
            model.check_error = error


def check_model(ctx: ProjectJobContext[CheckModelParams]) -> dict[str, Any]:
    from worker.generation import GeneratorSpec, iter_generate

    with ctx.session() as session:
        model = session.get(ModelVersion, ctx.params.model_id)
        if model is None:
            raise ValueError(f"model {ctx.params.model_id} was deleted before its check")
        base, adapter, params = model.base, model.adapter, dict(model.params or {})
    ctx.progress(0.1, f"loading {base}")
    started = time.monotonic()
    try:
        spec = GeneratorSpec.from_params(base, adapter, {**params, "steps": ctx.params.steps})
        images = list(iter_generate(spec, [(CHECK_PROMPT, CHECK_SEED)], batch_size=1))
        if len(images) != 1:
            raise RuntimeError("the sampler returned no image")
    except (JobCancelled, TransientJobError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is the model's verdict
        reason = f"{type(exc).__name__}: {exc}"
        _verdict(ctx, "failed", reason[:2000])
        raise ModelCheckFailed(reason) from None
    _verdict(ctx, "ready", None)
    image = images[0][2]
    seconds = time.monotonic() - started
    ctx.progress(1.0, f"ready: one {image.width}×{image.height} image in {seconds:.1f} s")
    return {"model_id": ctx.params.model_id, "check_status": "ready", "seconds": round(seconds, 2),
            "width": image.width, "height": image.height}  # fmt: skip
