"""`train_dpo`: Diffusion-DPO on a snapshot of the project's votes → a child model version.

Orchestration only; the loss is `worker.dpo`, the training loop `worker.dpo_train`. A retry
(worker lost, soft time limit) trains on the same snapshot, reuses the cached latents and
resumes from the newest checkpoint, so its metrics continue from that step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.generators.models import ModelVersion
from app.jobs.kinds import TrainDPOParams
from app.projects.models import Project
from app.projects.service import project_settings
from app.ratings.models import Snapshot
from worker.pairs_source import collect_pairs, human_pairs, job_snapshot, record_sources
from worker.runner import ProjectJobContext
from worker.tasks.children import TrainingRun, load_parent, register_child, save_child_weights
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
    from worker.dpo_train import held_out_prompts

    val = human_pairs(ctx, snapshot_id, tie_policy, split="val")
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


def train_dpo(ctx: ProjectJobContext[TrainDPOParams]) -> dict[str, Any]:
    import torch

    from worker.dpo_train import (
        CachedPairs,
        TrainingDiverged,
        encode_pairs,
        list_checkpoints,
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
    pipe = load_parent(parent)
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

    run = TrainingRun(ctx, ckpt_dir, list_checkpoints, TrainingDiverged, params.time_limit_minutes)

    def on_validation(metrics: Any) -> None:
        ctx.metrics(metrics.step, metrics.as_dict())

    with run.training():
        result = train(
            pipe, data, params, ckpt_dir, on_metrics=run.reporter(0.05, params.steps),
            should_stop=run.should_stop, val_data=val_data, val_every=params.checkpoint_every,
            on_validation=on_validation,
        )  # fmt: skip
    run.finished(result.step, stopped_early=result.stopped_early)
    out_dir, as_adapter = save_child_weights(pipe, parent, params.lora_rank, work)
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    last = result.history[-1] if result.history else None
    child_id, follow_ups = register_child(
        ctx, params, out_dir, as_adapter, method="dpo", snapshot_id=snapshot_id
    )
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
