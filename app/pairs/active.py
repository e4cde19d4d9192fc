"""Active pair sampling: serve first the pairs whose outcome the current fit knows least.

For projects with the `active_sampling` setting, the scheduler (`app.pairs.scheduler.order_for`)
orders its capacity-checked candidates with `active_order`:

- with probability `random_floor` (project setting, default 0.2) the candidates come in a
  uniformly random order, so a share of votes never depends on the current estimates and the
  fits stay unbiased;
- otherwise most uncertain first (ties: fewest votes, then the per-annotator spread of the
  default order). Uncertainty u ∈ [0, 1] is 1 − |2P − 1|, P the probability of one ordering:
  - eval pairs (two model versions): P(model a ranks above model b) from the latest leaderboard
    fit, each rating a normal with its 95 % interval (sd = interval width / 3.92), so models
    whose intervals overlap are uncertain; with zero-width intervals (no bootstrap) P is the
    Bradley–Terry win probability of the two ratings;
  - train pairs (one model version): P(image a beats image b) = σ(r_a − r_b) from the per-image
    scores of the project's latest reward model;
  - a model without a rating or an image without a score is maximally uncertain (u = 1).

Per-image reward scores live in the `reward_image_scores` table, one row per (reward model,
image): the train_reward job records the scores of the images in open train pairs in the same
transaction as the model's row, score_images jobs upsert theirs (`record_image_scores`; a later
score of the same image replaces the earlier). Ordering reads only the candidates' images.

The order only reorders candidates; the scheduler still locks each pair and re-checks its
capacity, so the guarantees (never past k, never a pair twice) are the scheduler's own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.storage import MediaStore
from app.images.models import Image
from app.pairs.ordering import Candidate, fewest_votes_first
from app.projects.models import Project
from app.projects.service import project_settings
from app.ratings.models import Rating, RewardImageScore, RewardModel
from app.ratings.scale import elo_to_logit_gap
from app.ratings.service import latest_fit
from app.users.models import User

# A 95 % interval spans 2 × 1.96 standard deviations.
_CI_WIDTH_IN_SD = 2 * 1.959963984540054
# Rows per upsert statement: three bound values each stays far below SQLite's variable limit.
_UPSERT_CHUNK = 1000


# --- reward models and their per-image scores -------------------------------------------------


def latest_reward_model(session: Session, project_id: int) -> RewardModel | None:
    """The project's highest reward-model version, or None before the first one."""
    return session.scalar(
        select(RewardModel)
        .where(RewardModel.project_id == project_id)
        .order_by(RewardModel.version.desc(), RewardModel.id.desc())
        .limit(1)
    )


def reward_model_dir(store: MediaStore, row: RewardModel) -> Path:
    """The saved model's folder; `row.path` is relative to the media root."""
    return store.root / row.path


def record_image_scores(
    session: Session, reward_model_id: int, scores: Mapping[str, float]
) -> None:
    """Insert or replace the model's scores of these images (concurrent scoring jobs lose none)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # Sorted keys: concurrent upserts lock rows in one order, so they cannot deadlock.
    rows = [
        {"reward_model_id": reward_model_id, "image_id": str(k), "score": float(scores[k])}
        for k in sorted(scores)
    ]
    for start in range(0, len(rows), _UPSERT_CHUNK):
        stmt = insert(RewardImageScore).values(rows[start : start + _UPSERT_CHUNK])
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["reward_model_id", "image_id"],
                set_={"score": stmt.excluded.score},
            )
        )


def image_scores(
    session: Session, reward_model_id: int, image_ids: Iterable[str] | None = None
) -> dict[str, float]:
    """The model's scores of these images (all of its scores when None); unscored ones absent."""
    stmt = select(RewardImageScore.image_id, RewardImageScore.score).where(
        RewardImageScore.reward_model_id == reward_model_id
    )
    if image_ids is not None:
        stmt = stmt.where(RewardImageScore.image_id.in_(sorted(set(image_ids))))
    return {image_id: score for image_id, score in session.execute(stmt)}


# --- uncertainty (pure) -------------------------------------------------------------------------


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def outcome_uncertainty(score_a: float, score_b: float) -> float:
    """1 − |2P − 1| with P = σ(score_a − score_b): 1 for equal scores, → 0 when far apart."""
    p = 0.5 * (1.0 + math.tanh(0.5 * (score_a - score_b)))
    return 1.0 - abs(2.0 * p - 1.0)


def rank_uncertainty(
    rating_a: float,
    interval_a: tuple[float, float],
    rating_b: float,
    interval_b: tuple[float, float],
) -> float:
    """1 − |2P − 1|, P = P(a above b) with each rating a normal of its 95 % interval.

    Ratings are on the Elo-like scale. Zero-width intervals fall back to the Bradley–Terry win
    probability of the two ratings.
    """
    sd_a = max(0.0, interval_a[1] - interval_a[0]) / _CI_WIDTH_IN_SD
    sd_b = max(0.0, interval_b[1] - interval_b[0]) / _CI_WIDTH_IN_SD
    spread = math.hypot(sd_a, sd_b)
    if spread == 0.0:
        return outcome_uncertainty(elo_to_logit_gap(rating_a, rating_b), 0.0)
    p = _normal_cdf((rating_a - rating_b) / spread)
    return 1.0 - abs(2.0 * p - 1.0)


# --- ordering ----------------------------------------------------------------------------------


def pair_uncertainties(
    session: Session, project: Project, candidates: Sequence[Candidate]
) -> dict[int, float]:
    """Uncertainty of each candidate pair's outcome under the project's latest fits."""
    image_ids = {c.image_a_id for c in candidates} | {c.image_b_id for c in candidates}
    model_of: dict[str, int | None] = dict(
        session.execute(
            select(Image.id, Image.model_version_id).where(Image.id.in_(sorted(image_ids)))
        ).all()
    )
    fit = latest_fit(session, project.id)
    ratings: dict[int, tuple[float, tuple[float, float]]] = {}
    if fit is not None:
        for model_id, rating, low, high in session.execute(
            select(Rating.model_version_id, Rating.rating, Rating.ci_low, Rating.ci_high).where(
                Rating.fit_id == fit.id
            )
        ):
            ratings[model_id] = (rating, (low, high))
    scores: dict[str, float] | None = None

    out: dict[int, float] = {}
    for cand in candidates:
        model_a, model_b = model_of.get(cand.image_a_id), model_of.get(cand.image_b_id)
        if model_a is not None and model_b is not None and model_a != model_b:
            if model_a in ratings and model_b in ratings:
                (ra, ia), (rb, ib) = ratings[model_a], ratings[model_b]
                out[cand.pair_id] = rank_uncertainty(ra, ia, rb, ib)
            else:
                out[cand.pair_id] = 1.0
            continue
        if scores is None:
            reward = latest_reward_model(session, project.id)
            scores = image_scores(session, reward.id, image_ids) if reward is not None else {}
        sa, sb = scores.get(cand.image_a_id), scores.get(cand.image_b_id)
        out[cand.pair_id] = 1.0 if sa is None or sb is None else outcome_uncertainty(sa, sb)
    return out


def most_uncertain_first(
    ordered: Sequence[Candidate], uncertainty: Mapping[int, float]
) -> list[Candidate]:
    """Highest uncertainty first; a stable sort, so equal ones keep their given order."""
    # Rounding keeps float noise from overriding the given order's tie-break.
    return sorted(ordered, key=lambda c: -round(uncertainty.get(c.pair_id, 1.0), 9))


class ActiveOrder:
    """The scheduler's order for active projects (a `CandidateOrder`); `rng` draws the floor."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def __call__(
        self,
        session: Session,
        project: Project,
        candidates: list[Candidate],
        annotator: User,
    ) -> list[Candidate]:
        if not candidates:
            return []
        if self.rng.random() < project_settings(project).random_floor:
            shuffled = list(candidates)
            self.rng.shuffle(shuffled)
            return shuffled
        uncertainty = pair_uncertainties(session, project, candidates)
        # Equal uncertainty (e.g. nothing fitted yet) falls back to the default order.
        base = fewest_votes_first(session, project, candidates, annotator)
        return most_uncertain_first(base, uncertainty)


# What `app.pairs.scheduler.order_for` serves projects with `active_sampling` on.
active_order = ActiveOrder()
