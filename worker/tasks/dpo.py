"""`train_dpo`: Diffusion-DPO on a snapshot of the project's votes → a child model version.

Orchestration only; the loss is `worker.dpo`, the training loop `worker.dpo_train`. A retry
(worker lost, soft time limit) trains on the same snapshot, reuses the cached latents and
resumes from the newest checkpoint, so its metrics continue from that step.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.storage import atomic_dir
from app.generators.models import ModelVersion
from app.jobs.kinds import TrainDPOParams
from app.jobs.service import create_job
from app.projects.models import Project, Prompt
from app.projects.service import project_settings
from app.ratings.models import RewardModel, Snapshot
from app.ratings.snapshots import snapshot_pairs
from worker.generation import sampling_free_params
from worker.pairs_source import collect_pairs, job_snapshot, record_sources
from worker.runner import JobCancelled, ProjectJobContext, TimeLimitReached, TransientJobError
from worker.tasks.generate import spec_for

# Share of train-split prompts held out for validation when the project has no val prompts.
VAL_SHARE = 0.1


def _validation_split(
    ctx: ProjectJobContext[TrainDPOParams], snapshot_id: int, tie_policy: str, pairs: list[Any]
) -> tuple[list[Any], list[Any]]:
    """The training pairs and the held-out validation pairs.

    Validation pairs are the val-split prompts' human pairs, or, without any, those of a stable
    tenth of the training pairs' prompts (held out of training). Test prompts stay out of both.
    """
    from PIL import Image as PILImage

    from worker.dpo_train import PreferencePair, held_out_prompts

    with ctx.session() as session:
        val_rows = snapshot_pairs(session, snapshot_id, tie_policy=tie_policy, split="val")  # type: ignore[arg-type]

    def load(key: str) -> Any:
        return PILImage.open(io.BytesIO(ctx.store.read(key))).convert("RGB")

    val = [
        PreferencePair(
            prompt=row.prompt,
            winner=load(row.winner_storage_key),
            loser=load(row.loser_storage_key),
            label=row.p,
        )
        for row in val_rows
    ]
    if not val:
        held = held_out_prompts([p.prompt for p in pairs], VAL_SHARE)
        if len(held) < len({p.prompt for p in pairs}):  # never hold out every prompt
            val = [p for p in pairs if p.prompt in held]
            pairs = [p for p in pairs if p.prompt not in held]
    return pairs, val


def _no_pairs_reason(snapshot_id: int, params: TrainDPOParams, sources: dict[str, Any]) -> str:
    if "reward" in sources and not sources.get("votes", {}).get("pairs"):
        reward = sources["reward"]
        return (
            f"no reward-labelled pair reached P(best ≻ worst) ≥ {reward['threshold']} "
            f"({reward['pairs_considered']} considered); lower reward_threshold or add votes"
        )
    return (
        f"snapshot {snapshot_id} has no training pairs on train-split prompts "
        f"(tie policy {params.tie_policy!r})"
    )


def _load_parent(parent: ModelVersion) -> Any:
    from worker.generation import load_pipeline

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
    snapshot_id = job_snapshot(ctx)
    if cache_path.exists():
        data = CachedPairs.load(cache_path)
        val_data = CachedPairs.load(val_cache_path) if val_cache_path.exists() else None
    else:
        pair_set = collect_pairs(
            ctx, pipe, spec_for(parent), params, snapshot_id=snapshot_id, seed=params.seed
        )
        if not pair_set.pairs:
            raise ValueError(_no_pairs_reason(snapshot_id, params, pair_set.sources))
        record_sources(ctx, snapshot_id, pair_set.sources)
        pairs, val_pairs = _validation_split(ctx, snapshot_id, tie_policy, pair_set.pairs)
        ctx.progress(0.05, f"encoding {len(pairs) + len(val_pairs)} pairs once")
        val_data = encode_pairs(pipe, val_pairs) if val_pairs else None
        if val_data is not None:
            val_data.save(val_cache_path)
        data = encode_pairs(pipe, pairs)
        data.save(cache_path)  # last: its presence means both caches are complete
    with ctx.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        sources = dict((snapshot.params or {}).get("sources", {})) if snapshot else {}
    ctx.log(
        f"snapshot {snapshot_id}: {len(data)} training pairs, "
        f"{len(val_data) if val_data is not None else 0} held-out validation pairs; "
        f"tie policy {tie_policy} ({json.dumps(sources, sort_keys=True)})"
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

    # A LoRA trained on a parent that already carries one (a later round of train_loop) cannot be
    # a second adapter of the base: it is merged, and the child is a whole pipeline directory.
    as_adapter = params.lora_rank > 0 and not parent.adapter
    out_dir = work / ("adapter" if as_adapter else "model")
    if as_adapter:
        save_result(pipe, params, out_dir)
    else:
        if params.lora_rank > 0:
            pipe.unet.fuse_lora()
            pipe.unet.unload_lora()
        # A fully fine-tuned UNet becomes a whole pipeline directory the generator can load.
        with atomic_dir(out_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
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
        "sources": sources,
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
