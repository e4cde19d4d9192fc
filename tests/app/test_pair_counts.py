"""The open-pairs counter (`PairCount`) against a recount, through every way a pair changes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, false, func, select, update
from sqlalchemy.orm import Session

from app.pairs import scheduler, service
from app.pairs.models import Pair, PairCount
from app.projects.models import Project
from app.votes import service as votes
from app.votes.models import Vote
from tests.factories import build_world


def recount(db: Session, project_id: int) -> int:
    return int(
        db.scalar(
            select(func.count())
            .select_from(Pair)
            .where(
                Pair.project_id == project_id,
                Pair.is_gold == false(),
                Pair.vote_count < Pair.votes_wanted,
            )
        )
    )


def counter(db: Session, project_id: int) -> int:
    db.flush()
    return int(
        db.scalar(select(PairCount.open_pairs).where(PairCount.project_id == project_id)) or 0
    )


def scanned_left(db: Session, project_id: int, annotator_id: int) -> int:
    voted = select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator_id)
    return int(
        db.scalar(
            select(func.count())
            .select_from(Pair)
            .where(
                Pair.project_id == project_id,
                Pair.is_gold == false(),
                Pair.vote_count < Pair.votes_wanted,
                ~voted.exists(),
            )
        )
    )


def test_counter_follows_votes_changes_gold_and_deletes(db: Session, make_user: Any) -> None:
    w = build_world(db, make_user, n_prompts=4, n_models=2, seeds=(0,), votes_per_pair=2)
    pid = w.project.id
    other = build_world(db, make_user, n_prompts=2, n_models=2, seeds=(0,), votes_per_pair=2)
    assert counter(db, pid) == recount(db, pid) == 4
    (a, _), (b, _) = w.annotators
    cast = []
    # Two annotators vote on everything: each pair closes at its second preference.
    for user in (a, b):
        while (served := scheduler.next_pair(db, project=w.project, annotator=user)) is not None:
            vote, _ = votes.record_vote(
                db,
                pair_id=served.pair_id,
                annotator=user,
                choice="left",
                left_image_id=served.left_image_id,
            )
            cast.append(vote)
            assert counter(db, pid) == recount(db, pid)
            for who in (a, b):
                assert scheduler.pairs_left(db, project=w.project, annotator=who) == scanned_left(
                    db, pid, who.id
                )
    assert counter(db, pid) == recount(db, pid) == 0
    # A preference changed to a skip frees a slot: the pair opens again.
    votes.change_last_vote(db, vote_id=cast[-1].id, annotator=b, choice="skip")
    assert counter(db, pid) == recount(db, pid) == 1
    # Gold pairs are not counted; a pair deleted is gone from the count.
    opened = db.scalar(select(Pair).where(Pair.project_id == pid, Pair.vote_count < 2))
    assert opened is not None
    service.mark_gold(db, pair=opened, expected="tie")
    assert counter(db, pid) == recount(db, pid) == 0
    db.execute(update(Pair).where(Pair.id == opened.id).values(is_gold=False, vote_count=0))
    assert counter(db, pid) == recount(db, pid) == 1
    db.execute(delete(Pair).where(Pair.id == opened.id))
    assert counter(db, pid) == recount(db, pid) == 0
    # The other project's count never moved; deleting a project deletes its row.
    assert counter(db, other.project.id) == recount(db, other.project.id) == 2
    db.execute(delete(Project).where(Project.id == other.project.id))
    assert db.scalar(select(PairCount).where(PairCount.project_id == other.project.id)) is None
