"""`train_rl`: online RL from the project's reward model (reward backpropagation, or GRPO / DDPO
policy gradients) → a child version.

Orchestration only; the maths is `worker.rl`, the loop `worker.rl_train`. Training prompts are
the project's train split; the reward-hacking guard's probe prompts are held out (val, then
test). A retry (worker lost, soft time limit) resumes from the newest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.generators.models import ModelVersion
from app.jobs.kinds import TrainRLParams
from app.pairs.active import latest_reward_model
from app.projects.models import Prompt
from app.ratings.models import RewardModel
from worker.runner import ProjectJobContext
from worker.tasks.children import TrainingRun, load_parent, register_child, save_child_weights


def _reward_models(
    session: Any, project_id: int, params: TrainRLParams
) -> tuple[RewardModel | None, RewardModel | None]:
    """The training reward model and the guard (another reward model of the project, if any)."""
    primary = (
        session.get(RewardModel, params.reward_model_id)
        if params.reward_model_id is not None
        else latest_reward_model(session, project_id)
    )
    if params.guard_reward_model_id is not None:
        return primary, session.get(RewardModel, params.guard_reward_model_id)
    others = select(RewardModel).where(RewardModel.project_id == project_id)
    if primary is not None:
        others = others.where(RewardModel.id != primary.id)
    guard = session.scalar(others.order_by(RewardModel.version.desc()).limit(1))
    return primary, guard


def _prompts(session: Any, project_id: int, probe_count: int) -> tuple[list[str], list[str], str]:
    """Train prompts, probe prompts and where the probe prompts come from."""
    rows = session.execute(
        select(Prompt.text, Prompt.split).where(Prompt.project_id == project_id).order_by(Prompt.id)
    ).all()
    train = [text for text, split in rows if split == "train"]
    for split in ("val", "test"):
        held_out = [text for text, s in rows if s == split]
        if held_out:
            return train, held_out[:probe_count], split
    return train, train[:probe_count], "train (no held-out prompts)"


def train_rl(ctx: ProjectJobContext[TrainRLParams]) -> dict[str, Any]:
    import torch

    from worker.rl_train import (
        ProbeSet,
        RewardModelScorer,
        Scorer,
        ToyFidelityScorer,
        ToyRecogniserScorer,
        TrainingDiverged,
        WeightedSum,
        list_checkpoints,
        train,
    )
    from worker.tasks.generate import spec_for
    from worker.tasks.reward import load_cached
    from worker.toy import resolve_toy

    params = ctx.params
    project_id = ctx.project_id
    with ctx.session() as session:
        parent = session.get(ModelVersion, params.model_id)
        if parent is None:
            raise ValueError("the model of this job no longer exists")
        primary_row, guard_row = _reward_models(session, project_id, params)
        primary = load_cached(ctx.store, primary_row) if primary_row is not None else None
        guard = load_cached(ctx.store, guard_row) if guard_row is not None else None
        train_prompts, probe_prompts, probe_source = _prompts(
            session, project_id, params.probe_prompts
        )
        spec = spec_for(parent)
        is_toy = resolve_toy(parent.base) is not None
    if not train_prompts:
        raise ValueError("the project has no train-split prompts")
    guidance = params.guidance_scale if params.guidance_scale is not None else spec.guidance_scale
    # The trainer reads the job's params themselves, with the guidance resolved.
    config = params.model_copy(update={"guidance_scale": guidance})
    parts: list[tuple[Scorer, float]] = []
    if primary is not None and params.reward_weight > 0:
        parts.append((RewardModelScorer(primary, "reward"), params.reward_weight))
    # Trained against the recogniser, judged by the reader: the term the policy climbs is not
    # the one the guard reads.
    fidelity = ToyFidelityScorer() if is_toy else None
    fidelity_weight = params.fidelity_weight_for(toy=is_toy)
    if fidelity_weight > 0:
        if fidelity is None:
            raise ValueError("fidelity_weight needs a toy model (no fidelity scorer for others)")
        parts.append((ToyRecogniserScorer(), fidelity_weight))
    if not parts:
        raise ValueError("nothing to train towards: reward_weight is 0 and this model has no "
                         "fidelity term")  # fmt: skip
    reward = WeightedSum(parts)
    probe = ProbeSet(
        prompts=probe_prompts,
        guard=RewardModelScorer(guard, "guard") if guard is not None else None,
        fidelity=fidelity,
        seed=params.seed + 12_345,
    )
    ctx.log(
        f"reward {reward.name} (reward model {primary_row and primary_row.id}); guard reward "
        f"model {guard_row and guard_row.id}; fidelity {'toy world' if fidelity else 'none'}; "
        f"{len(train_prompts)} train prompts, {len(probe_prompts)} probe prompts from "
        f"{probe_source}"
    )

    work = Path(ctx.work_dir())
    ckpt_dir = work / "checkpoints"
    ctx.progress(0.01, "loading the parent model")
    pipe = load_parent(parent)
    run = TrainingRun(ctx, ckpt_dir, list_checkpoints, TrainingDiverged, params.time_limit_minutes)

    def on_probe(probe_metrics: Any) -> None:
        ctx.metrics(probe_metrics.step, probe_metrics.as_dict())
        if probe_metrics.stop_reason:
            ctx.log(f"guard at step {probe_metrics.step}: {probe_metrics.stop_reason}")

    with run.training():
        result = train(
            pipe, train_prompts, reward, config, ckpt_dir, probe=probe,
            on_metrics=run.reporter(0.03, config.steps), on_probe=on_probe,
            should_stop=run.should_stop,
        )  # fmt: skip
    run.finished(result.step, stopped_early=result.stopped_early)
    if result.guard_stop:
        ctx.log(f"stopped early by the reward-hacking guard: {result.guard_stop}")
    out_dir, as_adapter = save_child_weights(pipe, parent, config.lora_rank, work)
    del pipe
    torch.cuda.empty_cache() if torch.cuda.is_available() else None

    last = result.history[-1] if result.history else None
    probes = result.probes
    child_id, follow_ups = register_child(ctx, params, out_dir, as_adapter, method="rl")
    return {
        "model_id": child_id,
        "parent_id": params.model_id,
        "reward_model_id": primary_row.id if primary_row is not None else None,
        "guard_reward_model_id": guard_row.id if guard_row is not None else None,
        "steps": result.step,
        "stopped_by_guard": result.guard_stop is not None,
        "guard_stop": result.guard_stop,
        "final_reward_mean": last.reward_mean if last else None,
        "final_kl": last.kl if last else None,
        "probe_source": probe_source,
        "probe_first": probes[0].as_dict() if probes else None,
        "probe_last": probes[-1].as_dict() if probes else None,
        "output": str(out_dir),
        **follow_ups,
    }
