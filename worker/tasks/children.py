"""What every fine-tuning method (DPO, iterative DPO, RL) does around its objective.

They differ in what they optimise, not in how they load the parent, stop at a time limit, write
their weights or register the child: those steps live here, once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.storage import atomic_dir
from app.generators.models import ModelVersion
from app.jobs.kinds import ChildJobParams
from app.jobs.service import create_job
from app.projects.models import Prompt
from app.ratings.models import RewardModel
from worker.runner import JobCancelled, ProjectJobContext, TimeLimitReached, TransientJobError


def load_rgb(ctx: ProjectJobContext[Any], key: str) -> Any:
    """A stored image as an RGB PIL image."""
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(ctx.store.read(key))).convert("RGB")


def load_parent(parent: ModelVersion) -> Any:
    """A private copy of the parent's pipeline, its own adapter (if any) fused into the UNet."""
    from worker.generation import load_pipeline
    from worker.tasks.generate import spec_for

    # A private copy: training changes the UNet in place, the generation cache must not see it.
    pipe = load_pipeline(spec_for(parent))
    if parent.adapter:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def resume_point(ctx: ProjectJobContext[Any], checkpoints: list[Path]) -> int:
    """The step the newest checkpoint holds (0: none); metrics past it are dropped."""
    if not checkpoints:
        return 0
    step = int(checkpoints[-1].name.split("-")[-1])
    ctx.truncate_metrics(step)
    ctx.log(f"resuming from checkpoint at step {step}")
    return step


def stopper(ctx: ProjectJobContext[Any], minutes: float | None) -> Callable[[], bool]:
    """A trainer's `should_stop`: the job was cancelled or its soft time limit passed."""
    deadline = time.monotonic() + 60 * minutes if minutes else None

    def should_stop() -> bool:
        timed_out = deadline is not None and time.monotonic() > deadline
        return ctx.cancel_requested or timed_out

    return should_stop


def stop_early(ctx: ProjectJobContext[Any], step: int, resumed_from: int) -> None:
    """A run that returned before its last step: cancelled, or back to the queue to resume."""
    if ctx.cancel_requested:
        raise JobCancelled()
    message = f"soft time limit reached at step {step}; the next run resumes there"
    if step > resumed_from:
        raise TimeLimitReached(message)  # progress was made: not a failed attempt
    raise TransientJobError(message)


class TrainingRun:
    """A trainer's run inside its job: resumed from the newest checkpoint, stopped when the job
    is cancelled or its soft time limit passes, and failed naming the last good checkpoint when
    the trainer diverges. Built just before training (the time limit counts from here)."""

    def __init__(
        self,
        ctx: ProjectJobContext[Any],
        ckpt_dir: Path,
        checkpoints: Callable[[Path], list[Path]],
        diverged: type[Exception],
        minutes: float | None,
    ) -> None:
        self.ctx = ctx
        self._checkpoints = lambda: checkpoints(ckpt_dir)
        self._diverged = diverged
        self.resumed_from = resume_point(ctx, self._checkpoints())
        self.should_stop = stopper(ctx, minutes)

    def reporter(self, start: float, steps: int) -> Callable[[Any], None]:
        """A trainer's `on_metrics`: records each step, progress from `start` over 90%."""

        def on_metrics(metrics: Any) -> None:
            self.ctx.metrics(metrics.step, metrics.as_dict())
            self.ctx.progress(start + 0.9 * metrics.step / steps, f"step {metrics.step}")

        return on_metrics

    @contextmanager
    def training(self) -> Iterator[None]:
        try:
            yield
        except self._diverged as exc:
            kept = self._checkpoints()
            note = f"; last good checkpoint: {kept[-1].name}" if kept else ""
            raise RuntimeError(f"{exc}{note}") from None

    def finished(self, step: int, *, stopped_early: bool) -> None:
        """The trainer returned: a run that stopped before its last step ends the job here."""
        if stopped_early:
            stop_early(self.ctx, step, self.resumed_from)


def save_child_weights(
    pipe: Any, parent: ModelVersion, lora_rank: int, work: Path
) -> tuple[Path, bool]:
    """Write the trained weights; returns (directory, whether it is an adapter of the base).

    A LoRA trained on a parent that already carries one (its adapter was fused before training)
    cannot be a second adapter of the base: it is fused too, and the child is a whole pipeline.
    """
    from worker.lora import save_lora

    as_adapter = lora_rank > 0 and not parent.adapter
    out_dir = work / ("adapter" if as_adapter else "model")
    if as_adapter:
        save_lora(pipe.unet, out_dir)
        return out_dir, True
    if lora_rank > 0:
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir, False


def register_child(
    ctx: ProjectJobContext[Any],
    params: ChildJobParams,
    out_dir: Path,
    as_adapter: bool,
    *,
    method: str,
    snapshot_id: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """The job's child model version (made once, even across retries) and its follow-up jobs.

    Unless the job names it, the child is named after its parent, the method and the job
    ("parent+dpo12").
    """
    from worker.generation import sampling_free_params

    with ctx.session() as session:
        parent = session.get(ModelVersion, params.model_id)
        if parent is None:
            raise ValueError(f"the parent model {params.model_id} no longer exists")
        child = session.scalar(
            select(ModelVersion).where(ModelVersion.produced_by_job_id == ctx.job_id)
        )
        if child is None:
            child = ModelVersion(
                project_id=parent.project_id,
                name=params.name or f"{parent.name}+{method}{ctx.job_id}",
                base=parent.base if as_adapter else str(out_dir),
                adapter=str(out_dir) if as_adapter else None,
                # The child is the trained weights with plain sampling: a parent's best-of
                # policy is not inherited.
                params=sampling_free_params(parent.params),
                parent_id=parent.id,
                produced_by_job_id=ctx.job_id,
                snapshot_id=snapshot_id,
                status="arena",
                evaluation={},
            )
            session.add(child)
            session.flush()
        follow_ups = close_the_loop(session, ctx, parent, child) if params.closed_loop else {}
        return child.id, follow_ups


def close_the_loop(
    session: Any, ctx: ProjectJobContext[Any], parent: ModelVersion, child: ModelVersion
) -> dict[str, Any]:
    """Queue the evaluation (if a reward model exists) and the child's entry into the arena."""
    has_prompts = session.scalar(
        select(Prompt.id)
        .where(Prompt.project_id == parent.project_id, Prompt.split == "test")
        .limit(1)
    )
    has_reward_model = session.scalar(
        select(RewardModel.id).where(RewardModel.project_id == parent.project_id).limit(1)
    )
    follow_ups: dict[str, Any] = {}
    if parent.archived_at is not None:
        # Archived while the child trained: the child is kept, nothing new is started with it.
        ctx.log(f"parent model {parent.id} is archived: no evaluation or arena round queued")
        return follow_ups
    if has_reward_model:
        evaluate = create_job(
            session,
            kind="evaluate",
            params={"model_ids": [parent.id, child.id], "split": "test" if has_prompts else "all"},
            project_id=parent.project_id,
            created_by_id=None,
            max_attempts=ctx.settings.job_max_attempts,
        )
        follow_ups["evaluate_job_id"] = evaluate.id
    else:
        ctx.log("no reward model yet: evaluation skipped (run train_reward, then evaluate)")
    arena = create_job(
        session,
        kind="generate",
        params={
            "model_ids": [parent.id, child.id],
            "images_per_prompt": ctx.params.arena_images_per_prompt,
            "split": "train",
            "make_pairs": True,
        },
        project_id=parent.project_id,
        created_by_id=None,
        max_attempts=ctx.settings.job_max_attempts,
    )
    follow_ups["arena_job_id"] = arena.id
    return follow_ups
