"""An annotator's current sitting, for the counter on the vote page.

A session is a run of votes with no pause longer than `SESSION_GAP` (the rule web analytics use
for visits), so it survives a reload or a second tab and needs no state in the browser. Its
length is worked out in SQL (`sitting_votes`), so the vote page reads it in the statement that
already counts the pairs left; the gold record is a small query of its own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.core.db import epoch_seconds
from app.pairs.models import Pair
from app.votes.models import Vote
from app.votes.vocabulary import gold_answer, gold_correct

# A pause this long ends a session (Google Analytics' default visit timeout).
SESSION_GAP = dt.timedelta(minutes=30)
# Nobody votes for a whole day without a half-hour pause: the look-back stops there.
LOOK_BACK = dt.timedelta(hours=24)


def sitting_votes(
    *, project_id: int, annotator_id: int, now: dt.datetime, gap: dt.timedelta = SESSION_GAP
) -> Any:
    """Votes of the annotator's current sitting, as a scalar subquery: 0 when the last vote is
    over `gap` old, else the votes since the latest pause longer than `gap` (within `LOOK_BACK`).
    """
    at = Vote.created_at
    recent = (
        select(at.label("at"), func.lag(at).over(order_by=at).label("before"))
        .where(
            Vote.project_id == project_id,
            Vote.annotator_id == annotator_id,
            at >= now - LOOK_BACK,
        )
        .subquery()
    )
    pause = epoch_seconds(recent.c.at) - epoch_seconds(recent.c.before) > gap.total_seconds()
    opens = recent.c.before.is_(None) | pause  # the first vote of a sitting
    marked = select(
        recent.c.at,
        func.max(case((opens, recent.c.at))).over().label("start"),
        func.max(recent.c.at).over().label("last"),
    ).subquery()
    return (
        select(func.count())
        .select_from(marked)
        .where(marked.c.at >= marked.c.start, marked.c.last >= now - gap)
        .scalar_subquery()
    )


def session_votes(
    session: Session,
    *,
    project_id: int,
    annotator_id: int,
    now: dt.datetime,
    gap: dt.timedelta = SESSION_GAP,
) -> int:
    """Votes of the annotator's current sitting: 0 when the last vote is over `gap` old."""
    count = sitting_votes(project_id=project_id, annotator_id=annotator_id, now=now, gap=gap)
    return int(session.scalar(select(count)) or 0)


@dataclass(frozen=True)
class GoldRecord:
    answered: int
    correct: int
    streak: int  # gold answers right in a row, counting back from the latest

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


def gold_record(session: Session, *, project_id: int, annotator_id: int) -> GoldRecord:
    """The annotator's answers on gold pairs (skips are no answer and do not break a streak).

    Each gold pair is served to an annotator at most once, so this reads at most one row per
    gold pair of the project.
    """
    rows = session.execute(
        select(
            Vote.choice, Vote.left_image_id, Pair.gold_expected, Pair.image_a_id, Pair.image_b_id
        )
        .join(Pair, Pair.id == Vote.pair_id)
        .where(
            Vote.project_id == project_id,
            Vote.annotator_id == annotator_id,
            Pair.is_gold.is_(True),
        )
        .order_by(Vote.created_at.desc(), Vote.id.desc())
    )
    answered = correct = streak = 0
    streak_open = True
    for choice, left, expected, image_a, image_b in rows:
        if expected is None:
            continue
        right = image_b if left == image_a else image_a
        ok = gold_correct(choice, gold_answer(expected, left, right))
        if ok is None:
            continue
        answered += 1
        correct += int(ok)
        if streak_open and ok:
            streak += 1
        else:
            streak_open = False
    return GoldRecord(answered=answered, correct=correct, streak=streak)
