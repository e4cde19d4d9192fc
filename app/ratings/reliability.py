"""Which annotators' votes a project leaves out of ratings, reward models and DPO snapshots.

The rule (`exclusion_reasons` in app/ratings/quality.py): an annotator is excluded when the
95 % Wilson interval of their gold accuracy lies entirely below the project's
`min_gold_accuracy`, or when their median latency is "too fast". It applies only while the
project's `exclude_flagged` is on. A lead's decisions by hand come on top, whatever the rule
says: `excluded_annotators` are always left out ("lead"), `included_annotators` always kept.
The figures come from two reads of the project's votes, cheap enough for every fit and snapshot.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.pairs.models import Pair
from app.projects.models import Project
from app.projects.service import project_settings
from app.ratings.quality import QualityThresholds, exclusion_reasons
from app.votes.models import Vote
from app.votes.vocabulary import gold_answer, gold_correct


@dataclass(frozen=True)
class Exclusion:
    """The rule applied and the annotators it leaves out ({annotator id: reasons})."""

    rule: dict[str, Any]
    excluded: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def annotator_ids(self) -> list[int]:
        return sorted(self.excluded)

    def record(self, votes_by_annotator: dict[int, int]) -> dict[str, Any]:
        """What a snapshot or fit stores: the rule, who was left out and why, vote counts."""
        return {
            **self.rule,
            "excluded": {str(a): list(r) for a, r in sorted(self.excluded.items())},
            "votes_by_annotator": {str(a): n for a, n in sorted(votes_by_annotator.items())},
        }


def project_exclusion(session: Session, project: Project) -> Exclusion:
    """The exclusion this project's settings call for, over its votes so far."""
    settings = project_settings(project)
    th = QualityThresholds()
    rule = {
        "rule": "exclude_flagged" if settings.exclude_flagged else "all_votes",
        "min_gold_accuracy": settings.min_gold_accuracy,
        "gold_interval": "wilson_95_upper",
        "too_fast_median_ms": th.min_median_latency_ms,
    }
    by_hand: dict[int, tuple[str, ...]] = {int(a): ("lead",) for a in settings.excluded_annotators}
    kept = set(settings.included_annotators)
    if not settings.exclude_flagged:
        return Exclusion(rule, by_hand)
    answered: dict[int, int] = defaultdict(int)
    correct: dict[int, int] = defaultdict(int)
    gold_rows = session.execute(
        select(
            Vote.annotator_id,
            Vote.choice,
            Vote.left_image_id,
            Pair.gold_expected,
            Pair.image_a_id,
            Pair.image_b_id,
        )
        .join(Pair, Pair.id == Vote.pair_id)
        .where(Vote.project_id == project.id, Pair.is_gold.is_(True))
    )
    for annotator, choice, left, expected, a, b in gold_rows:
        if expected is None:
            continue
        right = b if left == a else a
        ok = gold_correct(choice, gold_answer(expected, left, right))
        if ok is not None:
            answered[annotator] += 1
            correct[annotator] += int(ok)
    latencies: dict[int, list[int]] = defaultdict(list)
    for annotator, ms in session.execute(
        select(Vote.annotator_id, Vote.latency_ms).where(
            Vote.project_id == project.id, Vote.latency_ms.is_not(None)
        )
    ):
        if ms is not None:  # filtered out above; the column itself is nullable
            latencies[annotator].append(ms)
    excluded: dict[int, tuple[str, ...]] = {}
    for annotator in set(answered) | set(latencies):
        times = latencies.get(annotator, [])
        reasons = exclusion_reasons(
            gold_correct=correct[annotator],
            gold_answered=answered[annotator],
            median_latency_ms=statistics.median(times) if times else float("nan"),
            timed_votes=len(times),
            min_gold_accuracy=settings.min_gold_accuracy,
            thresholds=th,
        )
        if reasons and annotator not in kept:
            excluded[int(annotator)] = reasons
    return Exclusion(rule, {**excluded, **by_hand})
