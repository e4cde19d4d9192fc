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

Per-image reward scores live beside the reward model, in `reward_models/<id>/image_scores.json`
under the media store (`{"reward_model_id": id, "scores": {image_id: score}}`): the train_reward
job writes the scores of the images in open train pairs, score_images jobs merge in theirs
(`record_image_scores`). Readers cache the file per process until it changes.

The order only reorders candidates; the scheduler still locks each pair and re-checks its
capacity, so the guarantees (never past k, never a pair twice) are the scheduler's own.
"""

from __future__ import annotations

import fcntl
import json
import math
import random
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.storage import MediaStore, get_media_store, write_atomic
from app.images.models import Image
from app.pairs.ordering import Candidate, fewest_votes_first
from app.projects.models import Project
from app.projects.service import project_settings
from app.ratings.models import Rating, RewardModel
from app.ratings.scale import elo_to_logit_gap
from app.ratings.service import latest_fit
from app.users.models import User

IMAGE_SCORES_FILE = "image_scores.json"
# A 95 % interval spans 2 × 1.96 standard deviations.
_CI_WIDTH_IN_SD = 2 * 1.959963984540054


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


def record_image_scores(store: MediaStore, row: RewardModel, scores: Mapping[str, float]) -> Path:
    """Merge per-image scores into the model's scores file (atomic, one writer at a time)."""
    directory = reward_model_dir(store, row)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / IMAGE_SCORES_FILE
    with open(directory / f".{IMAGE_SCORES_FILE}.lock", "a") as lock:
        # Read-merge-write under an exclusive lock: concurrent scoring jobs lose no scores.
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _read_scores_file(target)
        merged.update({str(k): float(v) for k, v in scores.items()})
        write_atomic(target, json.dumps({"reward_model_id": row.id, "scores": merged}))
    return target


def _read_scores_file(path: Path) -> dict[str, float]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {str(k): float(v) for k, v in document.get("scores", {}).items()}


_scores_cache: dict[str, tuple[tuple[int, int], dict[str, float]]] = {}
_scores_lock = threading.Lock()


def image_scores(store: MediaStore, row: RewardModel) -> dict[str, float]:
    """The model's per-image scores ({} when none were recorded); cached until the file changes."""
    path = reward_model_dir(store, row) / IMAGE_SCORES_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (stat.st_mtime_ns, stat.st_size)
    key = str(path)
    with _scores_lock:
        cached = _scores_cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    scores = _read_scores_file(path)
    with _scores_lock:
        _scores_cache[key] = (stamp, scores)
    return scores


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
    session: Session, project: Project, candidates: Sequence[Candidate], store: MediaStore
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
            scores = image_scores(store, reward) if reward is not None else {}
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

    def __init__(self, rng: random.Random | None = None, store: MediaStore | None = None) -> None:
        self.rng = rng or random.Random()
        self._store = store

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
        store = self._store or get_media_store()
        uncertainty = pair_uncertainties(session, project, candidates, store)
        # Equal uncertainty (e.g. nothing fitted yet) falls back to the default order.
        base = fewest_votes_first(session, project, candidates, annotator)
        return most_uncertain_first(base, uncertainty)


# What `app.pairs.scheduler.order_for` serves projects with `active_sampling` on.
active_order = ActiveOrder()
