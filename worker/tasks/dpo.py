"""`train_dpo`: Diffusion-DPO on a snapshot of the project's votes → a child model version.

Orchestration only; the loss is `worker.dpo`, the training loop `worker.dpo_train`. A retry
(worker lost, soft time limit) trains on the same snapshot, reuses the cached latents and
resumes from the newest checkpoint, so its metrics continue from that step.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.generators.models import ModelVersion
from app.jobs.kinds import TrainDPOParams
from app.jobs.service import create_job
from app.projects.models import Project, Prompt
from app.projects.service import project_settings
from app.ratings.models import RewardModel
from app.ratings.snapshots import create_snapshot, snapshot_for_job, snapshot_pairs
from worker.runner import JobCancelled, ProjectJobContext, TimeLimitReached, TransientJobError

# Share of train-split prompts held out for validation when the project has no val prompts.
VAL_SHARE = 0.1


def _training_pairs(
    ctx: ProjectJobContext[TrainDPOParams], tie_policy: str
) -> tuple[int, list[Any], list[Any]]:
    """The job's snapshot (made on the first attempt) and its training and validation pairs.

    Validation pairs are the val-split prompts' pairs, or, without any, those of a stable tenth
    of the train-split prompts (held out of training). Test prompts stay out of both.
    """
    from PIL import Image as PILImage

    from worker.dpo_train import PreferencePair, held_out_prompts

    with ctx.session() as session:
        snapshot = snapshot_for_job(session, ctx.job_id) or create_snapshot(
            session, project_id=ctx.project_id, job_id=ctx.job_id
        )
        snapshot_id = snapshot.id
    with ctx.session() as session:
        # Held-out prompts (val/test) stay out of training: evaluation uses them.
        rows = snapshot_pairs(session, snapshot_id, tie_policy=tie_policy, split="train")  # type: ignore[arg-type]
        val_rows = snapshot_pairs(session, snapshot_id, tie_policy=tie_policy, split="val")  # type: ignore[arg-type]
    if not val_rows:
        held = held_out_prompts([row.prompt for row in rows], VAL_SHARE)
        if len(held) < len({row.prompt for row in rows}):  # never hold out every prompt
            val_rows = [row for row in rows if row.prompt in held]
            rows = [row for row in rows if row.prompt not in held]

    def load(key: str) -> Any:
        return PILImage.open(io.BytesIO(ctx.store.read(key))).convert("RGB")

    def pairs(of: list[Any]) -> list[Any]:
        return [
            PreferencePair(
                prompt=row.prompt,
                winner=load(row.winner_storage_key),
                loser=load(row.loser_storage_key),
                label=row.p,
            )
            for row in of
        ]

    return snapshot_id, pairs(rows), pairs(val_rows)


def _load_parent(parent: ModelVersion) -> Any:
    from worker.generation import load_pipeline
    from worker.tasks.generate import spec_for

    # A private copy: training changes the UNet in place, the generation cache must not see it.
    pipe = load_pipeline(spec_for(parent))
    if parent.adapter:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def train_dpo(ctx: ProjectJobContext[TrainDPOParams]) -> dict[str, Any]:
    import torch

    from worker.dpo_train import (
        CachedPairs,
        TrainingDiverged,
        encode_pairs,
        list_checkpoints,
        save_result,
        train,
    )

    with ctx.session() as session:
        project = session.get(Project, ctx.project_id)
        parent = session.get(ModelVersion, ctx.params.model_id)
        if project is None or parent is None:
            raise ValueError("the project or the model of this job no longer exists")
        tie_policy = ctx.params.tie_policy or project_settings(project).tie_policy
    # The trainer reads the job's params themselves, with the tie policy resolved.
    params = ctx.params.model_copy(update={"tie_policy": tie_policy})
    work = Path(ctx.work_dir())
    cache_path = work / "pairs-cache.pt"
    val_cache_path = work / "val-pairs-cache.pt"
    ckpt_dir = work / "checkpoints"

    ctx.progress(0.01, "loading the parent model")
    pipe = _load_parent(parent)
    snapshot_id, pairs, val_pairs = _training_pairs(ctx, tie_policy)
    if cache_path.exists():
        data = CachedPairs.load(cache_path)
        val_data = CachedPairs.load(val_cache_path) if val_cache_path.exists() else None
    else:
        if not pairs:
            raise ValueError(
                f"snapshot {snapshot_id} has no training pairs on train-split prompts "
                f"(tie policy {tie_policy!r})"
            )
        ctx.progress(0.02, f"encoding {len(pairs) + len(val_pairs)} pairs once")
        val_data = encode_pairs(pipe, val_pairs) if val_pairs else None
        if val_data is not None:
            val_data.save(val_cache_path)
        data = encode_pairs(pipe, pairs)
        data.save(cache_path)  # last: its presence means both caches are complete
    ctx.log(
        f"snapshot {snapshot_id}: {len(data)} training pairs, "
        f"{len(val_data) if val_data is not None else 0} held-out validation pairs; "
        f"tie policy {tie_policy}"
    )

    existing = list_checkpoints(ckpt_dir)
    resumed_from = 0
    if existing:
        resumed_at = resumed_from = int(existing[-1].name.split("-")[-1])
        ctx.truncate_metrics(resumed_at)
        ctx.log(f"resuming from checkpoint at step {resumed_at}")

    deadline = (
        time.monotonic() + 60 * params.time_limit_minutes if params.time_limit_minutes else None
    )
    timed_out = False

    def should_stop() -> bool:
        nonlocal timed_out
        timed_out = deadline is not None and time.monotonic() > deadline
        return ctx.cancel_requested or timed_out

    def on_metrics(metrics: Any) -> None:
        ctx.metrics(metrics.step, metrics.as_dict())
        ctx.progress(0.05 + 0.9 * metrics.step / params.steps, f"step {metrics.step}")

    def on_validation(metrics: Any) -> None:
        ctx.metrics(metrics.step, metrics.as_dict())

    try:
        result = train(
            pipe, data, params, ckpt_dir, on_metrics=on_metrics, should_stop=should_stop,
            val_data=val_data, val_every=params.checkpoint_every, on_validation=on_validation,
        )  # fmt: skip
    except TrainingDiverged as exc:
        kept = list_checkpoints(ckpt_dir)
        note = f"; last good checkpoint: {kept[-1].name}" if kept else ""
        raise RuntimeError(f"{exc}{note}") from None
    if result.stopped_early:
        if ctx.cancel_requested:
            raise JobCancelled()
        message = f"soft time limit reached at step {result.step}; the next run resumes there"
        if result.step > resumed_from:
            raise TimeLimitReached(message)
        raise TransientJobError(message)

    out_dir = save_result(pipe, params, work / ("adapter" if params.lora_rank > 0 else "model"))
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    last = result.history[-1] if result.history else None
    with ctx.session() as session:
        parent = session.get(ModelVersion, params.model_id)
        assert parent is not None
        child = session.scalar(
            select(ModelVersion).where(ModelVersion.produced_by_job_id == ctx.job_id)
        )
        if child is None:
            child = ModelVersion(
                project_id=parent.project_id,
                name=params.name or f"{parent.name}+dpo{ctx.job_id}",
                base=parent.base if params.lora_rank > 0 else str(out_dir),
                adapter=str(out_dir) if params.lora_rank > 0 else None,
                params=dict(parent.params),
                parent_id=parent.id,
                produced_by_job_id=ctx.job_id,
                snapshot_id=snapshot_id,
                status="arena",
                evaluation={},
            )
            session.add(child)
            session.flush()
        child_id = child.id
        follow_ups = _close_the_loop(session, ctx, parent, child) if params.closed_loop else {}
    return {
        "model_id": child_id,
        "parent_id": params.model_id,
        "snapshot_id": snapshot_id,
        "pairs": len(data),
        "steps": result.step,
        "final_loss": last.loss if last else None,
        "implicit_acc": last.implicit_acc if last else None,
        **(result.validation[-1].as_dict() if result.validation else {}),
        "output": str(out_dir),
        **follow_ups,
    }


def _close_the_loop(
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
