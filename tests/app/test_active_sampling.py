"""Active pair sampling: uncertainty measures, the order, the random floor, and the scheduler."""

from __future__ import annotations

import datetime as dt
import io
import math
import random
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.pairs import active, service
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.projects.schemas import ProjectCreate, ProjectSettings
from app.projects.service import add_member, create_project
from app.ratings.models import Rating, RatingFit, RewardModel
from app.users.models import User
from app.votes.models import Vote
from app.votes.service import record_vote

# --- uncertainty (pure) ------------------------------------------------------------------------


def test_outcome_uncertainty_hand_values() -> None:
    assert active.outcome_uncertainty(0.3, 0.3) == pytest.approx(1.0)
    # σ(2) = 0.880797: 1 − |2·0.880797 − 1| = 0.238406, the same from either side.
    assert active.outcome_uncertainty(2.0, 0.0) == pytest.approx(0.238406, abs=1e-6)
    assert active.outcome_uncertainty(0.0, 2.0) == pytest.approx(0.238406, abs=1e-6)


def test_rank_uncertainty_hand_values() -> None:
    half = 1.959963984540054 * 20.0  # a 95 % interval of an sd of 20 points
    # z = 20 / sqrt(20² + 20²) = 0.70711, Φ(z) = 0.76025: u = 1 − 0.52050 = 0.47950.
    u = active.rank_uncertainty(
        1020.0, (1020 - half, 1020 + half), 1000.0, (1000 - half, 1000 + half)
    )
    assert u == pytest.approx(0.479500, abs=1e-5)
    assert active.rank_uncertainty(1000.0, (990, 1010), 1000.0, (990, 1010)) == pytest.approx(1.0)
    # Clearly separated intervals: almost certain.
    assert active.rank_uncertainty(1500.0, (1480, 1520), 1000.0, (980, 1020)) < 1e-6
    # Zero-width intervals: the Bradley–Terry win probability, one logit apart → σ(1) = 0.731059.
    one_logit = 400.0 / math.log(10.0)
    u = active.rank_uncertainty(
        1000.0 + one_logit, (1000.0 + one_logit,) * 2, 1000.0, (1000.0,) * 2
    )  # type: ignore[arg-type]
    assert u == pytest.approx(1 - abs(2 * 0.731059 - 1), abs=1e-6)


def _cand(pair_id: int, load: int = 0) -> service.Candidate:
    return service.Candidate(pair_id, 1, f"a{pair_id}", f"b{pair_id}", "eval", False, load, 3, 0)


def test_most_uncertain_first_is_stable_on_ties() -> None:
    ordered = [_cand(1), _cand(2), _cand(3), _cand(4)]
    got = active.most_uncertain_first(ordered, {1: 0.2, 2: 0.9, 3: 0.2, 4: 0.9 + 1e-12})
    assert [c.pair_id for c in got] == [2, 4, 1, 3]
    # Unknown pairs count as maximally uncertain.
    assert [c.pair_id for c in active.most_uncertain_first(ordered, {1: 0.5})] == [2, 3, 4, 1]


# --- a project with three models and a leaderboard ------------------------------------------------


def _png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = PILImage.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Arena:
    project: Project
    models: dict[str, ModelVersion]
    images: dict[str, Image]
    pairs: dict[frozenset[str], Pair]  # by the two model names
    annotators: list[User]

    def pair(self, x: str, y: str) -> Pair:
        return self.pairs[frozenset((x, y))]


def build_arena(db: Session, make_user: Any, **settings: Any) -> Arena:
    """Models near, close and far: near and close overlap on the leaderboard, far stands apart."""
    lead, _ = make_user("lead")
    project = create_project(
        db,
        data=ProjectCreate(
            name=f"active-{uuid.uuid4().hex[:6]}",
            settings=ProjectSettings(active_sampling=True, votes_per_second=100, **settings),
        ),
        creator=lead,
    )
    prompt = Prompt(project_id=project.id, text="a red circle")
    models = {
        n: ModelVersion(project_id=project.id, name=n, base="toy") for n in ("near", "close", "far")
    }
    db.add_all([prompt, *models.values()])
    db.flush()
    images = {
        name: store_image(
            db,
            get_media_store(),
            project_id=project.id,
            prompt_id=prompt.id,
            png=_png(hash((project.id, name)) % 10_000),
            model_version_id=model.id,
            seed=0,
        )
        for name, model in models.items()
    }
    service.make_pairs(db, project=project, images=list(images.values()))
    name_of = {img.id: name for name, img in images.items()}
    pairs = {
        frozenset((name_of[p.image_a_id], name_of[p.image_b_id])): p
        for p in db.scalars(select(Pair).where(Pair.project_id == project.id))
    }
    fit = RatingFit(project_id=project.id, method={}, annotators=[], vote_count=30)
    db.add(fit)
    db.flush()
    for name, (rating, low, high) in {
        "near": (1000.0, 960.0, 1040.0),
        "close": (1010.0, 970.0, 1050.0),
        "far": (1500.0, 1460.0, 1540.0),
    }.items():
        db.add(
            Rating(
                fit_id=fit.id,
                model_version_id=models[name].id,
                score=(rating - 1000) / (400 / math.log(10)),
                rating=rating,
                ci_low=low,
                ci_high=high,
                rank=1,
                votes=10,
            )
        )
    annotators = []
    for _ in range(4):
        user, _ = make_user("annotator")
        add_member(db, project=project, user=user, role="annotator")
        annotators.append(user)
    db.commit()
    return Arena(project, models, images, pairs, annotators)


def test_overlapping_models_are_served_first(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.0)
    assert service.order_for(arena.project) is active.active_order
    uncertainty = active.pair_uncertainties(
        db, arena.project, [_as_candidate(p) for p in arena.pairs.values()]
    )
    # sd = 80 / 3.92 = 20.41 each, z = 10 / 28.86 = 0.3465, Φ(z) = 0.6355: u = 0.7290.
    assert uncertainty[arena.pair("near", "close").id] == pytest.approx(0.72899, abs=1e-4)
    assert uncertainty[arena.pair("near", "far").id] < 1e-6
    # Every annotator meets the overlapping pair first, though it carries more load each time.
    for user in arena.annotators[:3]:
        served = service.next_pair(db, project=arena.project, annotator=user)
        assert served is not None and served.pair_id == arena.pair("near", "close").id
    # k = 3 reached: the fourth gets a separated pair.
    served = service.next_pair(db, project=arena.project, annotator=arena.annotators[3])
    assert served is not None and served.pair_id != arena.pair("near", "close").id


def _as_candidate(pair: Pair) -> service.Candidate:
    return service.Candidate(
        pair.id,
        pair.prompt_id,
        pair.image_a_id,
        pair.image_b_id,
        pair.purpose,
        pair.is_gold,
        pair.vote_count,
        pair.votes_wanted,
        0,
    )


@pytest.mark.slow
def test_random_floor_is_honoured_in_proportion(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.3)
    candidates = [_as_candidate(p) for p in arena.pairs.values()]
    overlapping = arena.pair("near", "close").id
    order = active.ActiveOrder(rng=random.Random(0))
    n = 2000
    firsts = Counter(
        order(db, arena.project, candidates, arena.annotators[0])[0].pair_id for _ in range(n)
    )
    # Active draws (70 %) always lead with the overlapping pair; random ones (30 %) do a third
    # of the time: expected share 0.7 + 0.3 / 3 = 0.8, each other pair 0.1.
    assert firsts[overlapping] / n == pytest.approx(0.8, abs=0.025)
    for pair in arena.pairs.values():
        if pair.id != overlapping:
            assert firsts[pair.id] / n == pytest.approx(0.1, abs=0.02)
    # A floor of 1 is uniformly random; 0 is always active.
    arena.project.settings = {**arena.project.settings, "random_floor": 1.0}
    firsts = Counter(
        order(db, arena.project, candidates, arena.annotators[0])[0].pair_id for _ in range(n)
    )
    assert all(count / n == pytest.approx(1 / 3, abs=0.03) for count in firsts.values())
    arena.project.settings = {**arena.project.settings, "random_floor": 0.0}
    firsts = Counter(
        order(db, arena.project, candidates, arena.annotators[0])[0].pair_id for _ in range(200)
    )
    assert firsts == Counter({overlapping: 200})


def test_unrated_models_count_as_uncertain(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.0)
    newcomer = ModelVersion(project_id=arena.project.id, name="new", base="toy")
    db.add(newcomer)
    db.flush()
    image = store_image(
        db,
        get_media_store(),
        project_id=arena.project.id,
        prompt_id=arena.images["far"].prompt_id,
        png=_png(99_999),
        model_version_id=newcomer.id,
        seed=0,
    )
    new_pairs = service.make_pairs(db, project=arena.project, images=[image])
    candidates = [_as_candidate(p) for p in [*arena.pairs.values(), *new_pairs]]
    uncertainty = active.pair_uncertainties(db, arena.project, candidates)
    assert all(uncertainty[p.id] == 1.0 for p in new_pairs)
    ordered = active.ActiveOrder(rng=random.Random(1))(
        db, arena.project, candidates, arena.annotators[0]
    )
    assert {c.pair_id for c in ordered[: len(new_pairs)]} == {p.id for p in new_pairs}


def test_train_pairs_with_close_reward_scores_come_first(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.0)
    model = arena.models["near"]
    prompt_id = arena.images["near"].prompt_id
    extra = [
        store_image(
            db,
            get_media_store(),
            project_id=arena.project.id,
            prompt_id=prompt_id,
            png=_png(50_000 + seed),
            model_version_id=model.id,
            seed=seed,
        )
        for seed in (1, 2)
    ]
    base = arena.images["near"]
    train = {}
    for other in extra:
        a, b = sorted([base.id, other.id])
        train[other.seed] = Pair(
            project_id=arena.project.id,
            prompt_id=prompt_id,
            image_a_id=a,
            image_b_id=b,
            purpose="train",
            votes_wanted=3,
        )
    db.add_all(train.values())
    db.flush()
    candidates = [_as_candidate(p) for p in train.values()]
    # Before any reward model the two are equally (maximally) uncertain.
    assert set(active.pair_uncertainties(db, arena.project, candidates).values()) == {1.0}
    rows = []
    for version, scores in enumerate(
        # An old version ranks the pairs the other way round: only the latest counts.
        [
            {base.id: 0.0, extra[0].id: 0.1, extra[1].id: 3.0},
            {base.id: 0.0, extra[0].id: 3.0, extra[1].id: 0.1},
        ],
        start=1,
    ):
        row = RewardModel(
            project_id=arena.project.id,
            version=version,
            backbone="toyconv",
            path=f"reward_models/test-{uuid.uuid4().hex}",
            metrics={},
        )
        db.add(row)
        db.flush()
        active.record_image_scores(db, row.id, scores)
        rows.append(row)
    assert active.latest_reward_model(db, arena.project.id) is rows[1]
    uncertainty = active.pair_uncertainties(db, arena.project, candidates)
    assert uncertainty[train[2].id] == pytest.approx(active.outcome_uncertainty(0.0, 0.1))
    assert uncertainty[train[1].id] == pytest.approx(active.outcome_uncertainty(0.0, 3.0))
    ordered = active.ActiveOrder(rng=random.Random(0))(
        db, arena.project, candidates, arena.annotators[0]
    )
    assert [c.pair_id for c in ordered] == [train[2].id, train[1].id]


def test_image_scores_merge_and_read_back(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.0)
    a, b, c = sorted(db.scalars(select(Image.id).where(Image.project_id == arena.project.id)))[:3]
    row = RewardModel(
        project_id=arena.project.id, version=1, backbone="toyconv", path="reward_models/x"
    )
    other = RewardModel(
        project_id=arena.project.id, version=2, backbone="toyconv", path="reward_models/y"
    )
    db.add_all([row, other])
    db.flush()
    assert active.image_scores(db, row.id) == {}
    active.record_image_scores(db, row.id, {a: 1.0, b: 2.0})
    active.record_image_scores(db, other.id, {a: 9.0})
    assert active.image_scores(db, row.id) == {a: 1.0, b: 2.0}
    # A later score of the same image replaces the earlier one; the other model's stay.
    active.record_image_scores(db, row.id, {b: -1.0, c: 0.5})
    assert active.image_scores(db, row.id) == {a: 1.0, b: -1.0, c: 0.5}
    assert active.image_scores(db, row.id, [b, "unscored"]) == {b: -1.0}
    assert active.image_scores(db, other.id) == {a: 9.0}
    db.delete(other)
    db.flush()
    assert active.image_scores(db, other.id) == {}  # deleted with their model


def test_scheduler_guarantees_hold_with_active_sampling(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user, random_floor=0.5, votes_per_pair=2)
    now = utcnow()
    seen: dict[int, list[int]] = {u.id: [] for u in arena.annotators}
    for step in range(20):
        user = arena.annotators[step % len(arena.annotators)]
        at = now + dt.timedelta(seconds=step)
        served = service.next_pair(db, project=arena.project, annotator=user, now=at)
        if served is None:
            continue
        seen[user.id].append(served.pair_id)
        record_vote(
            db,
            pair_id=served.pair_id,
            annotator=user,
            choice="left",
            left_image_id=served.left_image_id,
            now=at,
        )
        db.commit()
    for pair_ids in seen.values():
        assert len(pair_ids) == len(set(pair_ids))  # never a pair twice
    counts = Counter(db.scalars(select(Vote.pair_id).where(Vote.project_id == arena.project.id)))
    # Three pairs × k = 2: every slot filled, none past k.
    assert sorted(counts.values()) == [2, 2, 2]


def test_default_order_without_active_sampling(db: Session, make_user: Any) -> None:
    arena = build_arena(db, make_user)
    arena.project.settings = {**arena.project.settings, "active_sampling": False}
    assert service.order_for(arena.project) is service.fewest_votes_first
    arena.project.settings = {**arena.project.settings, "active_sampling": True}

    def custom(session, project, candidates, annotator):  # type: ignore[no-untyped-def]
        return candidates

    assert service.order_for(arena.project, custom) is custom
    assert service.order_for(arena.project) is active.active_order
