"""Reliability used: flagged annotators are left out of ratings fits and vote snapshots."""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from app.core.db import utcnow
from app.core.storage import get_media_store
from app.images.models import Image
from app.pairs import service as pairs
from app.pairs.models import Pair
from app.ratings.bradley_terry import aggregate_comparisons, fit_bradley_terry
from app.ratings.quality import exclusion_reasons, wilson_interval
from app.ratings.reliability import project_exclusion
from app.ratings.service import evaluation_votes
from app.ratings.snapshots import create_snapshot
from app.votes.models import Vote
from app.votes.vocabulary import Choice
from tests.factories import build_world


def test_wilson_interval_by_hand() -> None:
    # p = 0.8, n = 5, z = 1.96: centre (0.8 + 0.38416)/1.76832 = 0.66966,
    # half 1.96·sqrt(0.032 + 0.038416)/1.76832 = 0.29412.
    low, high = wilson_interval(4, 5)
    assert low == pytest.approx(0.3755, abs=1e-4) and high == pytest.approx(0.9638, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_exclusion_reasons() -> None:
    kw: dict[str, Any] = {"median_latency_ms": 3000.0, "timed_votes": 20, "min_gold_accuracy": 0.7}
    # 3 of 5 wrong is bad luck as far as the interval can tell: kept.
    assert exclusion_reasons(gold_correct=2, gold_answered=5, **kw) == ()
    # 15 of 40 (upper bound 0.53) is surely below 0.7.
    assert exclusion_reasons(gold_correct=15, gold_answered=40, **kw) == ("low_gold_accuracy",)
    fast = {**kw, "median_latency_ms": 400.0}
    assert exclusion_reasons(gold_correct=40, gold_answered=40, **fast) == ("too_fast",)
    # Too few timed votes to judge speed.
    assert exclusion_reasons(gold_correct=0, gold_answered=0, **{**fast, "timed_votes": 2}) == ()


STRENGTH = (0.0, 0.8, 1.6)  # true scores of the three models


def _bt_scores(votes: list[Any], models: list[int]) -> np.ndarray:
    index = {m: i for i, m in enumerate(models)}
    counts = aggregate_comparisons(
        np.array([index[v.left_model] for v in votes]),
        np.array([index[v.right_model] for v in votes]),
        np.array([Choice(v.choice).outcome for v in votes]),
        n_items=len(models),
    )
    scores = fit_bradley_terry(counts).scores
    return scores - scores.mean()


@pytest.mark.slow
def test_careless_annotator_is_flagged_and_excluded(db, make_user) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(16)
    w = build_world(db, make_user, n_prompts=30, n_models=3, n_annotators=10, gold_rate=0.1)
    clean, careless = [u for u, _ in w.annotators[:9]], w.annotators[9][0]
    model_of = {img.id: m for (_, m, _), img in w.images.items()}
    strength = {w.models[m].id: STRENGTH[m] for m in range(3)}
    eval_pairs = list(
        db.scalars(select(Pair).where(Pair.project_id == w.project.id).order_by(Pair.id))
    )
    gold = pairs.create_gold_pairs(
        db, get_media_store(), project=w.project, images=[w.images[(p, 0, 0)] for p in range(30)]
    ) + pairs.create_gold_pairs(
        db, get_media_store(), project=w.project, images=[w.images[(p, 1, 0)] for p in range(10)]
    )
    t0 = utcnow() - dt.timedelta(days=1)
    n = 0

    def vote(user: Any, pair: Pair, choice: str, left: str) -> None:
        nonlocal n
        n += 1
        db.add(Vote(pair_id=pair.id, project_id=w.project.id, annotator_id=user.id,
                    left_image_id=left, choice=choice, latency_ms=rng.randint(1800, 4000),
                    created_at=t0 + dt.timedelta(seconds=n)))  # fmt: skip

    for user in clean:
        for pair in eval_pairs:
            left = rng.choice([pair.image_a_id, pair.image_b_id])
            right = pair.image_b_id if left == pair.image_a_id else pair.image_a_id
            d = strength[w.models[model_of[left]].id] - strength[w.models[model_of[right]].id]
            vote(user, pair, "left" if rng.random() < 1 / (1 + math.exp(-d)) else "right", left)
        for pair in gold:  # attentive: 95 % right
            left = rng.choice([pair.image_a_id, pair.image_b_id])
            right_answer = "left" if left == pair.gold_expected else "right"
            wrong = "right" if right_answer == "left" else "left"
            vote(user, pair, right_answer if rng.random() < 0.95 else wrong, left)
    # The careless annotator: random clicks, 10 % of the evaluation votes, and every gold pair.
    n_careless = len(eval_pairs) * len(clean) // 9
    for pair in rng.sample(eval_pairs, n_careless):
        vote(careless, pair, rng.choice(["left", "right"]), pair.image_a_id)
    # Left = the expected image, so the seeded coin alone decides which answers are right (image
    # ids are random strings: "image_a" is the original in some runs and the copy in others).
    for pair in gold:
        vote(careless, pair, rng.choice(["left", "right"]), pair.gold_expected)
    db.commit()

    exclusion = project_exclusion(db, w.project)
    assert exclusion.excluded == {careless.id: ("low_gold_accuracy",)}
    models = [m.id for m in w.models]
    everyone = evaluation_votes(db, w.project.id)
    assert sum(v.choice in ("left", "right") for v in everyone) == len(eval_pairs) * 9 + n_careless
    assert n_careless / (len(eval_pairs) * 9 + n_careless) == pytest.approx(0.1, abs=0.01)
    kept = evaluation_votes(db, w.project.id, exclude_annotators=exclusion.annotator_ids)
    clean_only = evaluation_votes(db, w.project.id, exclude_annotators=[careless.id])
    with_careless, without, reference = (
        _bt_scores(v, models) for v in (everyone, kept, clean_only)
    )
    d_with = float(np.abs(with_careless - reference).max())
    d_without = float(np.abs(without - reference).max())
    print(f"max |score − clean score|: with careless {d_with:.3f}, excluded {d_without:.3f}")
    assert d_without < d_with and d_with > 0.02

    # Snapshots for reward models and DPO leave the careless votes out and say so.
    snapshot = create_snapshot(db, project_id=w.project.id, job_id=None)
    record = snapshot.params["reliability"]
    assert record["rule"] == "exclude_flagged" and record["min_gold_accuracy"] == 0.7
    assert record["excluded"] == {str(careless.id): ["low_gold_accuracy"]}
    assert record["votes_by_annotator"] == {str(u.id): len(eval_pairs) for u in clean}
    assert snapshot.vote_count == 9 * len(eval_pairs)

    # A lead keeps the careless annotator by hand and leaves out a clean one.
    w.project.settings = {
        **w.project.settings,
        "included_annotators": [careless.id],
        "excluded_annotators": [clean[0].id],
    }
    db.flush()
    assert project_exclusion(db, w.project).excluded == {clean[0].id: ("lead",)}
    w.project.settings = {
        **w.project.settings, "included_annotators": [], "excluded_annotators": []
    }
    db.flush()

    # Turned off, every vote counts.
    w.project.settings = {**w.project.settings, "exclude_flagged": False}
    db.flush()
    assert project_exclusion(db, w.project).excluded == {}
    everything = create_snapshot(db, project_id=w.project.id, job_id=None)
    assert everything.vote_count == 9 * len(eval_pairs) + n_careless
    assert everything.params["reliability"]["rule"] == "all_votes"
    assert db.get(Image, gold[0].gold_expected) is not None
