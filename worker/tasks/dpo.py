"""`train_dpo`: Diffusion-DPO on a snapshot of the project's votes → a child model version.

Orchestration only; the loss is `worker.dpo`, the training loop `worker.dpo_train`. A retry
(worker lost, soft time limit) trains on the same snapshot, reuses the cached latents and
resumes from the newest checkpoint, so its metrics continue from that step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.generators.models import ModelVersion
from app.jobs.service import create_job
from app.projects.models import Project, Prompt
from app.projects.service import project_settings
from app.ratings.models import RewardModel, Snapshot
from worker.generation import sampling_free_params
from worker.pairs_source import collect_pairs, job_snapshot, record_sources
from worker.runner import JobCancelled, JobContext, TransientJobError, handler
from worker.tasks.generate import spec_for


def dpo_config(params: dict[str, Any]) -> Any:
    from worker.dpo_train import DPOConfig

    return DPOConfig(
        beta=params["beta"],
        beta_convention=params["beta_convention"],
        loss_kind=params["loss"],
        learning_rate=params["learning_rate"],
        steps=params["steps"],
        batch_size=params["batch_size"],
        grad_accum=params["grad_accum"],
        warmup_steps=params["warmup_steps"],
        max_grad_norm=params["max_grad_norm"],
        lora_rank=params["lora_rank"],
        mixed_precision=params["mixed_precision"],
        gradient_checkpointing=params["gradient_checkpointing"],
        empty_prompt_prob=params["empty_prompt_prob"],
        tie_soft_labels=params["tie_policy"] == "soft",
        checkpoint_every=params["checkpoint_every"],
        seed=params["seed"],
    )


def _no_pairs_reason(snapshot_id: int, params: dict[str, Any], sources: dict[str, Any]) -> str:
    if "reward" in sources and not sources.get("votes", {}).get("pairs"):
        reward = sources["reward"]
        return (
            f"no reward-labelled pair reached P(best ≻ worst) ≥ {reward['threshold']} "
            f"({reward['pairs_considered']} considered); lower reward_threshold or add votes"
        )
    return (
        f"snapshot {snapshot_id} has no training pairs on train-split prompts "
        f"(tie policy {params['tie_policy']!r})"
    )


def _load_parent(parent: ModelVersion) -> Any:
    from worker.generation import load_pipeline

    # A private copy: training changes the UNet in place, the generation cache must not see it.
    pipe = load_pipeline(spec_for(parent))
    if parent.adapter:
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


@handler("train_dpo")
def train_dpo(ctx: JobContext) -> dict[str, Any]:
    import torch

    from worker.dpo_train import (
        CachedPairs,
        TrainingDiverged,
        encode_pairs,
        list_checkpoints,
        save_result,
        train,
    )

    params = dict(ctx.params)
    with ctx.session() as session:
        project = session.get(Project, ctx.project_id)
        parent = session.get(ModelVersion, params["model_id"])
        if project is None or parent is None:
            raise ValueError("the project or the model of this job no longer exists")
        params["tie_policy"] = params.get("tie_policy") or project_settings(project).tie_policy
    config = dpo_config(params)
    work = Path(ctx.work_dir())
    cache_path = work / "pairs-cache.pt"
    ckpt_dir = work / "checkpoints"

    ctx.progress(0.01, "loading the parent model")
    pipe = _load_parent(parent)
    snapshot_id = job_snapshot(ctx)
    if cache_path.exists():
        data = CachedPairs.load(cache_path)
    else:
        pair_set = collect_pairs(
            ctx, pipe, spec_for(parent), params, snapshot_id=snapshot_id, seed=params["seed"]
        )
        if not pair_set.pairs:
            raise ValueError(_no_pairs_reason(snapshot_id, params, pair_set.sources))
        record_sources(ctx, snapshot_id, pair_set.sources)
        ctx.progress(0.05, f"encoding {len(pair_set.pairs)} pairs once")
        data = encode_pairs(pipe, pair_set.pairs)
        data.save(cache_path)
    with ctx.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        sources = dict((snapshot.params or {}).get("sources", {})) if snapshot else {}
    ctx.log(f"snapshot {snapshot_id}: {len(data)} pairs ({json.dumps(sources, sort_keys=True)})")

    existing = list_checkpoints(ckpt_dir)
    if existing:
        resumed_at = int(existing[-1].name.split("-")[-1])
        ctx.truncate_metrics(resumed_at)
        ctx.log(f"resuming from checkpoint at step {resumed_at}")

    deadline = (
        time.monotonic() + 60 * params["time_limit_minutes"]
        if params.get("time_limit_minutes")
        else None
    )
    timed_out = False

    def should_stop() -> bool:
        nonlocal timed_out
        timed_out = deadline is not None and time.monotonic() > deadline
        return ctx.cancel_requested or timed_out

    def on_metrics(metrics: Any) -> None:
        ctx.metrics(metrics.step, metrics.as_dict())
        ctx.progress(0.05 + 0.9 * metrics.step / config.steps, f"step {metrics.step}")

    try:
        result = train(pipe, data, config, ckpt_dir, on_metrics=on_metrics, should_stop=should_stop)
    except TrainingDiverged as exc:
        kept = list_checkpoints(ckpt_dir)
        note = f"; last good checkpoint: {kept[-1].name}" if kept else ""
        raise RuntimeError(f"{exc}{note}") from None
    if result.stopped_early:
        if ctx.cancel_requested:
            raise JobCancelled()
        raise TransientJobError(
            f"soft time limit reached at step {result.step}; the next attempt resumes there"
        )

    # A LoRA trained on a parent that already carries one (a later round of train_loop) cannot be
    # a second adapter of the base: it is merged, and the child is a whole pipeline directory.
    as_adapter = config.lora_rank > 0 and not parent.adapter
    out_dir = work / ("adapter" if as_adapter else "model")
    if as_adapter:
        save_result(pipe, config, out_dir)
    else:
        if config.lora_rank > 0:
            pipe.unet.fuse_lora()
            pipe.unet.unload_lora()
        # A fully fine-tuned UNet becomes a whole pipeline directory the generator can load.
        tmp = out_dir.with_name(".tmp-model")
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    last = result.history[-1] if result.history else None
    with ctx.session() as session:
        parent = session.get(ModelVersion, params["model_id"])
        assert parent is not None
        child = session.scalar(
            select(ModelVersion).where(ModelVersion.produced_by_job_id == ctx.job_id)
        )
        if child is None:
            child = ModelVersion(
                project_id=parent.project_id,
                name=params.get("name") or f"{parent.name}+dpo{ctx.job_id}",
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
        follow_ups = _close_the_loop(session, ctx, parent, child) if params["closed_loop"] else {}
    return {
        "model_id": child_id,
        "parent_id": params["model_id"],
        "snapshot_id": snapshot_id,
        "pairs": len(data),
        "steps": result.step,
        "final_loss": last.loss if last else None,
        "implicit_acc": last.implicit_acc if last else None,
        "output": str(out_dir),
        "sources": sources,
        **follow_ups,
    }


def _close_the_loop(
    session: Any, ctx: JobContext, parent: ModelVersion, child: ModelVersion
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
            "images_per_prompt": ctx.params["arena_images_per_prompt"],
            "split": "train",
            "make_pairs": True,
        },
        project_id=parent.project_id,
        created_by_id=None,
        max_attempts=ctx.settings.job_max_attempts,
    )
    follow_ups["arena_job_id"] = arena.id
    return follow_ups
