"""Where a training method's preference pairs come from: human votes, the reward model, or both.

Every method that learns from pairs (`train_dpo`, each round of `train_loop`, RL) reads them here,
so "which pairs did this model see" has one answer:

- ``votes``: the job's vote snapshot, train-split prompts only (val/test prompts stay held out);
- ``reward``: on-policy pairs. The model being trained draws ``candidates`` images per train
  prompt; the reward model scores them; per prompt the best is paired with the worst (then the
  second best with the second worst, up to ``pairs_per_prompt``), and a pair is kept only when
  the reward model's Bradley-Terry probability P(best ≻ worst) = σ(r_best − r_worst) reaches
  ``threshold``. The kept pairs train as clear wins (label 1), as best-vs-worst pairs do in
  online preference optimisation: the threshold, not a soft label, carries the uncertainty;
- ``votes+reward``: both sets, concatenated.

Candidate seeds are drawn per (prompt, job seed, index) from a salted hash above the range of
stored images' seeds, so they coincide neither with the seeds of voted images nor with evaluation
seeds, and every prompt gets fresh starting noise.

The pure parts (`candidate_seeds`, `margin_pairs`) are tested against hand-computed values; the
rest is orchestration (loading, generating, scoring).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from app.jobs.kinds import TrainDPOParams
    from worker.dpo_train import PreferencePair
    from worker.runner import ProjectJobContext

DataSource = Literal["votes", "reward", "votes+reward"]
DATA_SOURCES: tuple[str, ...] = ("votes", "reward", "votes+reward")
# Salt of the candidate-seed hash: no other seed in the project comes from this stream.
CANDIDATE_SEED_SALT = "prefloop/reward-candidates"
# Seeds of images that are never stored lie above the images' 32-bit seed column, so none
# coincides with a stored (voted on, or evaluation) image's seed; all stay below a torch
# generator's 2**63.
UNSTORED_SEED_BASE = 2**31
UNSTORED_SEED_SPAN = 2**63 - 2**31

# score_fn(prompts, images (H, W, 3) uint8) -> (N,) rewards
ScoreFn = Callable[[Sequence[str], Sequence[np.ndarray]], np.ndarray]


def uses_votes(data: str) -> bool:
    return data in ("votes", "votes+reward")


def uses_reward(data: str) -> bool:
    return data in ("reward", "votes+reward")


def candidate_seeds(prompt: str, seed: int, n: int) -> list[int]:
    """n seeds in [0, 2**63) for one prompt's candidates under a job seed (deterministic)."""
    seeds = []
    for k in range(n):
        digest = hashlib.blake2b(
            f"{CANDIDATE_SEED_SALT}\x1f{seed}\x1f{k}\x1f{prompt}".encode(), digest_size=8
        ).digest()
        seeds.append(UNSTORED_SEED_BASE + int.from_bytes(digest, "big") % UNSTORED_SEED_SPAN)
    return seeds


@dataclass(frozen=True)
class MarginPair:
    """Candidate `winner` of prompt row `row` beats candidate `loser` with probability `p`."""

    row: int
    winner: int
    loser: int
    p: float
    margin: float  # r_winner - r_loser


def margin_pairs(
    scores: np.ndarray, *, pairs_per_prompt: int, threshold: float
) -> list[MarginPair]:
    """Best-vs-worst pairs per row of `scores` (P, N) whose σ(margin) ≥ `threshold`.

    Row i's candidates are ranked by score (the lower index first among equals); rank j is
    paired with rank N−1−j for j < min(pairs_per_prompt, N // 2), so no candidate is in two
    pairs. A pair whose probability is below the threshold is left out; equal scores give
    p = 0.5 and are never kept for a threshold above 0.5.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (prompts, candidates), got shape {scores.shape}")
    if pairs_per_prompt < 1:
        raise ValueError("pairs_per_prompt must be at least 1")
    if not 0.5 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0.5, 1), got {threshold}")
    _, n = scores.shape
    kept: list[MarginPair] = []
    for row, values in enumerate(scores):
        order = np.argsort(-values, kind="stable")  # (N,) best first
        for j in range(min(pairs_per_prompt, n // 2)):
            w, lo = int(order[j]), int(order[n - 1 - j])
            margin = float(values[w] - values[lo])
            p = float(0.5 * (1.0 + np.tanh(0.5 * margin)))  # σ(margin), overflow-free
            if p >= threshold and margin > 0:
                kept.append(MarginPair(row=row, winner=w, loser=lo, p=p, margin=margin))
    return kept


@dataclass(frozen=True)
class RewardPairsConfig:
    """How the reward model labels on-policy pairs."""

    reward_model_id: int
    candidates: int = 8
    pairs_per_prompt: int = 1
    threshold: float = 0.75
    seed: int = 0


@dataclass
class PairSet:
    """The pairs a method trains on, and where they came from (recorded on the snapshot)."""

    pairs: list[PreferencePair]
    sources: dict[str, Any] = field(default_factory=dict)


def reward_pairs(
    generate: Callable[[Sequence[str], Sequence[int]], list[Any]],
    score: ScoreFn,
    prompts: Sequence[str],
    config: RewardPairsConfig,
    *,
    batch_prompts: int = 8,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """On-policy pairs labelled by the reward model, and their statistics.

    `generate(prompts, seeds)` returns one PIL image per (prompt, seed); `score` rewards them.
    """
    from worker.dpo_train import PreferencePair

    pairs: list[PreferencePair] = []
    margins: list[float] = []
    considered = 0
    n = config.candidates
    for start in range(0, len(prompts), batch_prompts):
        if should_stop is not None and should_stop():
            break
        chunk = list(prompts[start : start + batch_prompts])
        flat_prompts = [p for p in chunk for _ in range(n)]
        flat_seeds = [s for p in chunk for s in candidate_seeds(p, config.seed, n)]
        images = generate(flat_prompts, flat_seeds)
        arrays = [np.array(img.convert("RGB"), dtype=np.uint8) for img in images]
        values = np.asarray(score(flat_prompts, arrays), dtype=np.float64).reshape(len(chunk), n)
        considered += len(chunk) * min(config.pairs_per_prompt, n // 2)
        for pair in margin_pairs(
            values, pairs_per_prompt=config.pairs_per_prompt, threshold=config.threshold
        ):
            base = pair.row * n
            pairs.append(
                PreferencePair(
                    prompt=chunk[pair.row],
                    winner=images[base + pair.winner],
                    loser=images[base + pair.loser],
                    label=1.0,
                )
            )
            margins.append(pair.margin)
        if on_progress is not None:
            on_progress(min(start + batch_prompts, len(prompts)), len(prompts))
    stats = {
        "reward_model_id": config.reward_model_id,
        "prompts": len(prompts),
        "candidates_per_prompt": n,
        "pairs_per_prompt": config.pairs_per_prompt,
        "threshold": config.threshold,
        "seed": config.seed,
        "pairs_considered": considered,
        "pairs": len(pairs),
        "mean_margin": float(np.mean(margins)) if margins else None,
    }
    return pairs, stats


# --- orchestration ------------------------------------------------------------------------------


def human_pairs(
    ctx: ProjectJobContext[Any], snapshot_id: int, tie_policy: str | None, split: str = "train"
) -> list[PreferencePair]:
    """The snapshot's pairs of one split, as images (held-out prompts stay out of training)."""
    from app.ratings.snapshots import snapshot_pairs
    from worker.dpo_train import PreferencePair
    from worker.tasks.children import load_rgb

    with ctx.session() as session:
        # snapshot_pairs refuses an unknown policy (None included: callers resolve it first).
        rows = snapshot_pairs(session, snapshot_id, tie_policy=tie_policy, split=split)  # type: ignore[arg-type]
    return [
        PreferencePair(
            prompt=row.prompt,
            winner=load_rgb(ctx, row.winner_storage_key),
            loser=load_rgb(ctx, row.loser_storage_key),
            label=row.p,
        )
        for row in rows
    ]


def job_snapshot(ctx: ProjectJobContext[Any]) -> int:
    """The job's vote snapshot: made on its first attempt, reused by a retry."""
    from app.ratings.snapshots import create_snapshot, snapshot_for_job

    with ctx.session() as session:
        snapshot = snapshot_for_job(session, ctx.job_id) or create_snapshot(
            session,
            project_id=ctx.project_id,
            job_id=ctx.job_id,
        )
        return snapshot.id


def record_sources(ctx: ProjectJobContext[Any], snapshot_id: int, sources: dict[str, Any]) -> None:
    """Write where the pairs came from onto the snapshot (its `params.sources`)."""
    from app.ratings.models import Snapshot

    with ctx.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is not None:
            snapshot.params = {**(snapshot.params or {}), "sources": sources}


def train_prompts(ctx: ProjectJobContext[Any]) -> list[str]:
    """Texts of the project's train-split prompts (candidates are drawn for each)."""
    from sqlalchemy import select

    from app.projects.models import Prompt

    with ctx.session() as session:
        return list(
            session.scalars(
                select(Prompt.text)
                .where(Prompt.project_id == ctx.project_id, Prompt.split == "train")
                .order_by(Prompt.id)
            )
        )


def reward_model_row(ctx: ProjectJobContext[Any], reward_model_id: int | None) -> Any:
    """The named reward model of the project, or its latest; ValueError when there is none."""
    from app.pairs.active import latest_reward_model
    from app.ratings.models import RewardModel

    with ctx.session() as session:
        if reward_model_id is not None:
            row = session.get(RewardModel, reward_model_id)
            if row is None or row.project_id != ctx.project_id:
                raise ValueError(f"reward model {reward_model_id} is not one of this project")
            return row
        row = latest_reward_model(session, ctx.project_id)
    if row is None:
        raise ValueError("the project has no reward model yet; run train_reward first")
    return row


def reward_scorer(ctx: ProjectJobContext[Any], row: Any) -> ScoreFn:
    from worker.tasks.reward import load_cached, score_arrays

    model = load_cached(ctx.store, row)
    return lambda prompts, images: score_arrays(model, prompts, images)


def pipeline_generator(pipe: Any, spec: Any, batch_size: int) -> Callable[..., list[Any]]:
    """generate(prompts, seeds) on an in-memory pipeline, leaving its scheduler as it was."""
    from worker.generation import generate_batch

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> list[Any]:
        original = pipe.scheduler
        out: list[Any] = []
        try:
            for start in range(0, len(prompts), batch_size):
                out.extend(
                    generate_batch(
                        pipe,
                        spec,
                        prompts[start : start + batch_size],
                        seeds[start : start + batch_size],
                    )
                )
        finally:
            # Training reads the noise schedule from pipe.scheduler: give it back untouched.
            pipe.scheduler = original
        return out

    return generate


def collect_pairs(
    ctx: ProjectJobContext[Any],
    pipe: Any,
    spec: Any,
    params: TrainDPOParams,
    *,
    snapshot_id: int,
    seed: int = 0,
    progress: tuple[float, float] = (0.02, 0.05),
) -> PairSet:
    """The pairs `params.data` asks for (see the module docstring), with their sources.

    `pipe` is the model being trained, before any adapter is added: candidates are its samples.
    """
    from worker.generation import default_batch_size

    data = params.data or "votes"
    if data not in DATA_SOURCES:
        raise ValueError(f"data must be one of {DATA_SOURCES}, got {data!r}")
    pairs: list[PreferencePair] = []
    sources: dict[str, Any] = {"data": data}
    if uses_votes(data):
        human = human_pairs(ctx, snapshot_id, params.tie_policy)
        pairs.extend(human)
        sources["votes"] = {
            "snapshot_id": snapshot_id,
            "pairs": len(human),
            "tie_policy": params.tie_policy,
        }
    if uses_reward(data):
        row = reward_model_row(ctx, params.reward_model_id)
        prompts = train_prompts(ctx)
        if not prompts:
            raise ValueError("the project has no train-split prompts to draw candidates for")
        config = RewardPairsConfig(
            reward_model_id=row.id,
            candidates=params.reward_candidates,
            pairs_per_prompt=params.reward_pairs_per_prompt,
            threshold=params.reward_threshold,
            seed=seed,
        )
        low, high = progress
        ctx.log(
            f"drawing {config.candidates} candidates for each of {len(prompts)} train prompts; "
            f"reward model {row.id} (v{row.version}) labels them"
        )

        def on_progress(done: int, total: int) -> None:
            ctx.progress(low + (high - low) * done / max(total, 1), f"candidates {done}/{total}")

        synthetic, stats = reward_pairs(
            pipeline_generator(pipe, spec, default_batch_size(pipe.device) * 4),
            reward_scorer(ctx, row),
            prompts,
            config,
            should_stop=lambda: ctx.cancel_requested,
            on_progress=on_progress,
        )
        if ctx.cancel_requested:
            from worker.runner import JobCancelled

            raise JobCancelled()
        stats["reward_model_version"] = row.version
        stats["reward_model_val_accuracy"] = (row.metrics or {}).get("val_accuracy")
        pairs.extend(synthetic)
        sources["reward"] = stats
        ctx.log(
            f"reward model kept {stats['pairs']} of {stats['pairs_considered']} candidate pairs "
            f"(P(best ≻ worst) ≥ {config.threshold})"
        )
    sources["pairs"] = len(pairs)
    return PairSet(pairs=pairs, sources=sources)
