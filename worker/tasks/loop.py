"""`train_loop`: iterative DPO; each round relabels, trains a child, checks it on held-out data.

Round r, from the latest model M (the job's `model_id` in round 1):
1. the reward model: reused while it has seen every usable vote; retrained (a `train_reward`
   job) when votes arrived since, e.g. on the images of an earlier round's child in the arena;
2. DPO (a `train_dpo` job, every DPO field taken from this job's params, `seed` + r): pairs from
   `worker.pairs_source` (by default the votes plus on-policy pairs drawn from M and labelled by
   the reward model), M as the reference; its child enters the lineage (parent M) and, with
   `closed_loop`, the arena;
3. held-out check: M and the child sample the same validation prompts (test prompts when the
   project has no validation split) with seeds no training image uses; the round's reward model
   scores both; on toy models, prompt fidelity is measured too.
The loop stops when the child's mean reward does not beat M's by more than `min_reward_gain`,
when fidelity fell more than `max_fidelity_drop` below the first model's, or after `rounds`.

Sub-jobs are ordinary job rows (visible, with their own logs and results) run in this process;
the loop's progress (`loop-state.json` in its work folder) lets a retried attempt continue with
the round it was in.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from app.generators.models import ModelVersion
from app.jobs.kinds import TrainLoopParams
from app.jobs.models import TERMINAL, Job
from app.jobs.service import create_job
from app.pairs.active import latest_reward_model
from app.pairs.models import Pair
from app.projects.models import Prompt
from app.ratings.models import RewardModel, Snapshot
from app.ratings.snapshots import usable_vote_filter
from app.votes.models import Vote
from worker import runner
from worker.runner import ProjectJobContext


def dpo_fields(params: TrainLoopParams) -> dict[str, Any]:
    """The loop's params that a round's train_dpo job takes (all but the loop's own)."""
    from app.jobs.kinds import TrainDPOParams

    return params.model_dump(mode="json", include=set(TrainDPOParams.model_fields))


def eval_seeds(prompt_id: int, n: int) -> list[int]:
    """Held-out seeds of one prompt: the evaluation domain, which no training image uses."""
    from worker.seeds import prompt_seeds

    return prompt_seeds(prompt_id, n, "eval")


@dataclass(frozen=True)
class RoundCheck:
    """Held-out figures of a round: the reference and the child under one reward model."""

    reward_reference: float
    reward_child: float
    fidelity_child: float | None  # toy models only

    @property
    def gain(self) -> float:
        return self.reward_child - self.reward_reference


def stop_reason(
    check: RoundCheck,
    first_fidelity: float | None,
    *,
    min_reward_gain: float,
    max_fidelity_drop: float,
) -> str | None:
    """Why the loop stops after this round, or None to go on."""
    if check.gain <= min_reward_gain:
        return (
            f"held-out reward stopped improving (gain {check.gain:+.4f} ≤ {min_reward_gain:+.4f})"
        )
    if (
        first_fidelity is not None
        and check.fidelity_child is not None
        and first_fidelity - check.fidelity_child > max_fidelity_drop
    ):
        return (
            f"fidelity dropped {first_fidelity - check.fidelity_child:.3f} "
            f"(> {max_fidelity_drop:.3f}) below the first model's {first_fidelity:.3f}"
        )
    return None


# --- sub-jobs ---------------------------------------------------------------------------------


def run_subjob(ctx: ProjectJobContext[Any], job_id: int, *, poll: float = 1.0) -> dict[str, Any]:
    """Run a queued job here (or wait for whoever claimed it) and return its result."""
    name = f"{ctx.worker}/sub"
    while True:
        with ctx.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            status = job.status
        if status in TERMINAL:
            break
        if status == "queued":
            runner.execute(job_id, name=name)
            continue
        if ctx.cancel_requested:
            raise runner.JobCancelled()
        time.sleep(poll)  # another worker runs it: wait for its outcome
    with ctx.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        if job.status != "succeeded":
            raise RuntimeError(f"{job.kind} job {job.id} {job.status}: {job.error}")
        return dict(job.result or {})


def _create(ctx: ProjectJobContext[Any], kind: str, params: dict[str, Any]) -> int:
    with ctx.session() as session:
        job = create_job(
            session,
            kind=kind,
            params=params,
            project_id=ctx.project_id,
            created_by_id=None,
            max_attempts=ctx.settings.job_max_attempts,
        )
        return job.id


# --- state --------------------------------------------------------------------------------------


class LoopState:
    """Rounds done and sub-jobs started, in the job's work folder (read back on a retry)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = (
            json.loads(path.read_text()) if path.exists() else {"rounds": [], "jobs": {}}
        )

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def job(self, ctx: ProjectJobContext[Any], key: str, kind: str, params: dict[str, Any]) -> int:
        """The sub-job for `key`, created once (a retry finds the one it made)."""
        if key not in self.data["jobs"]:
            self.data["jobs"][key] = _create(ctx, kind, params)
            self.save()
        return int(self.data["jobs"][key])


# --- rounds -------------------------------------------------------------------------------------


def _usable_votes(ctx: ProjectJobContext[Any]) -> int:
    """Votes a snapshot taken now would freeze."""
    with ctx.session() as session:
        return int(
            session.scalar(
                select(func.count(Vote.id))
                .join(Pair, Pair.id == Vote.pair_id)
                .where(*usable_vote_filter(ctx.project_id, ("train", "eval")))
            )
            or 0
        )


def _reward_for_round(
    ctx: ProjectJobContext[Any], state: LoopState, r: int, root: ModelVersion
) -> int:
    """The reward model of round r: the latest one, retrained first if votes arrived since."""
    params = ctx.params
    key = f"reward-{r}"
    if key not in state.data["jobs"]:  # not started by an earlier attempt
        with ctx.session() as session:
            named = params.reward_model_id if r == 1 else None
            candidate = (
                session.get(RewardModel, named)
                if named is not None
                else latest_reward_model(session, ctx.project_id)
            )
            snapshot = (
                session.get(Snapshot, candidate.snapshot_id)
                if candidate is not None and candidate.snapshot_id is not None
                else None
            )
            seen = snapshot.vote_count if snapshot is not None else -1
        if candidate is not None and (not params.retrain_reward or seen >= _usable_votes(ctx)):
            return int(candidate.id)
    backbone = params.reward_backbone or ("toyconv" if _is_toy(root.base) else "clip")
    job_id = state.job(ctx, key, "train_reward", {"backbone": backbone, "seed": params.seed})
    ctx.log(f"round {r}: training reward model (job {job_id}) on {_usable_votes(ctx)} votes")
    return int(run_subjob(ctx, job_id)["reward_model_id"])


def _is_toy(base: str) -> bool:
    from worker.toy import resolve_toy

    return resolve_toy(base) is not None


def _heldout_prompts(ctx: ProjectJobContext[Any]) -> tuple[str, list[tuple[int, str]]]:
    with ctx.session() as session:
        for split in ("val", "test"):
            rows = session.execute(
                select(Prompt.id, Prompt.text)
                .where(Prompt.project_id == ctx.project_id, Prompt.split == split)
                .order_by(Prompt.id)
            ).all()
            if rows:
                return split, [(pid, text) for pid, text in rows]
    return "none", []


def heldout_samples(
    model: ModelVersion, prompts: list[tuple[int, str]], per_prompt: int
) -> tuple[list[str], list[np.ndarray]]:
    """The model's plain samples of the held-out prompts at the held-out seeds."""
    from worker.generation import iter_generate
    from worker.tasks.generate import batch_size_for, spec_for

    spec = spec_for(model)
    items = [(text, seed) for pid, text in prompts for seed in eval_seeds(pid, per_prompt)]
    texts, images = [], []
    for text, _seed, image in iter_generate(spec, items, batch_size=batch_size_for(spec, None)):
        texts.append(text)
        images.append(np.array(image.convert("RGB"), dtype=np.uint8))
    return texts, images


def _measure(
    ctx: ProjectJobContext[Any],
    model: ModelVersion,
    prompts: list[tuple[int, str]],
    reward_id: int,
    toy: bool,
) -> tuple[float, float | None]:
    """(mean held-out reward, toy prompt fidelity or None)."""
    from worker.pairs_source import reward_model_row, reward_scorer

    texts, images = heldout_samples(model, prompts, ctx.params.eval_images_per_prompt)
    scores = reward_scorer(ctx, reward_model_row(ctx, reward_id))(texts, images)
    fidelity = None
    if toy:
        from worker.toy.preferences import prompt_fidelity

        fidelity = float(prompt_fidelity(texts, images).both)
    return float(np.mean(scores)), fidelity


def _load(ctx: ProjectJobContext[Any], model_id: int) -> ModelVersion:
    with ctx.session() as session:
        model = session.get(ModelVersion, model_id)
    if model is None:
        raise ValueError(f"model version {model_id} of this loop no longer exists")
    return model


def train_loop(ctx: ProjectJobContext[TrainLoopParams]) -> dict[str, Any]:
    params = ctx.params
    state = LoopState(Path(ctx.work_dir()) / "loop-state.json")
    root = _load(ctx, params.model_id)
    toy = _is_toy(root.base)
    split, heldout = _heldout_prompts(ctx)
    if not heldout:
        raise ValueError("the loop's held-out check needs val or test prompts in the project")
    dpo_base = dpo_fields(params)
    rounds: list[dict[str, Any]] = state.data["rounds"]
    first_fidelity: float | None = state.data.get("first_fidelity")
    stopped = state.data.get("stopped")
    while stopped is None and len(rounds) < params.rounds:
        r = len(rounds) + 1
        reference = _load(ctx, rounds[-1]["model_id"] if rounds else root.id)
        low = (r - 1) / params.rounds
        ctx.progress(low, f"round {r}: reward model")
        reward_id = _reward_for_round(ctx, state, r, root)
        ctx.check_cancelled()
        ctx.progress(low + 0.1 / params.rounds, f"round {r}: DPO")
        dpo_params = {
            **dpo_base,
            "model_id": reference.id,
            "reward_model_id": reward_id,
            "seed": params.seed + r,
            "name": f"{params.name or root.name}+loop{ctx.job_id}r{r}",
        }
        dpo = run_subjob(ctx, state.job(ctx, f"dpo-{r}", "train_dpo", dpo_params))
        ctx.check_cancelled()
        child = _load(ctx, dpo["model_id"])
        ctx.progress(low + 0.8 / params.rounds, f"round {r}: held-out check")
        ref_reward, ref_fidelity = _measure(ctx, reference, heldout, reward_id, toy)
        child_reward, child_fidelity = _measure(ctx, child, heldout, reward_id, toy)
        if first_fidelity is None:
            first_fidelity = ref_fidelity
            state.data["first_fidelity"] = first_fidelity
        check = RoundCheck(ref_reward, child_reward, child_fidelity)
        reason = stop_reason(
            check,
            first_fidelity,
            min_reward_gain=params.min_reward_gain,
            max_fidelity_drop=params.max_fidelity_drop,
        )
        record = {
            "round": r,
            "model_id": child.id,
            "reference_id": reference.id,
            "reward_model_id": reward_id,
            "dpo_job_id": state.data["jobs"][f"dpo-{r}"],
            "pairs": dpo.get("pairs"),
            "sources": dpo.get("sources"),
            "heldout_split": split,
            "reward_reference": ref_reward,
            "reward_child": child_reward,
            "reward_gain": check.gain,
            "fidelity_reference": ref_fidelity,
            "fidelity_child": child_fidelity,
            "accepted": reason is None,
            "arena_job_id": dpo.get("arena_job_id"),
        }
        rounds.append(record)
        ctx.metrics(r, {"reward_gain": check.gain, "reward_child": child_reward})
        if child_fidelity is not None:
            ctx.metrics(r, {"fidelity_child": child_fidelity})
        with ctx.session() as session:
            row = session.get(ModelVersion, child.id)
            if row is not None:
                row.evaluation = {
                    **(row.evaluation or {}),
                    "loop": {k: record[k] for k in record if k not in ("sources",)},
                }
        ctx.log(
            f"round {r}: child {child.id} held-out reward {child_reward:.4f} vs "
            f"{ref_reward:.4f}" + (f"; fidelity {child_fidelity:.3f}" if toy else "")
        )
        if reason is not None:
            stopped = f"after round {r}: {reason}"
            state.data["stopped"] = stopped
            ctx.log(f"stopping {stopped}")
        state.save()
    accepted = [rd for rd in rounds if rd["accepted"]]
    return {
        "rounds": rounds,
        "model_ids": [rd["model_id"] for rd in rounds],
        # The last child that improved held-out reward within the fidelity bound.
        "best_model_id": accepted[-1]["model_id"] if accepted else root.id,
        "stopped": stopped or f"after {len(rounds)} rounds (the limit)",
        "first_fidelity": first_fidelity,
    }
