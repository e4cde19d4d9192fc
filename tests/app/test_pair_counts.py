"""The open-pairs counter (`PairCount`) against a recount, through every way a pair changes:
votes, gold, deletes, and archiving and unarchiving the prompts and models that hide pairs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, false, func, select, update
from sqlalchemy.orm import Session

from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.generators.schemas import ModelUpdate
from app.generators.service import update_model
from app.images.models import Image
from app.pairs import scheduler, service
from app.pairs.models import Pair, PairCount
from app.projects.lifecycle import update_prompt
from app.projects.models import Project, Prompt
from app.projects.schemas import PromptUpdate
from app.votes import service as votes
from app.votes.models import Vote
from tests.factories import Backend, build_world, user_maker


def recount(db: Session, project_id: int) -> int:
    return int(
        db.scalar(
            select(func.count())
            .select_from(Pair)
            .where(
                Pair.project_id == project_id,
                Pair.is_gold == false(),
                Pair.hidden == false(),
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
                Pair.hidden == false(),
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


def _open_by_archive(db: Session, project_id: int) -> tuple[set[int], dict[int, set[int]]]:
    """(pairs an archive hides, open pairs each annotator has not voted on), worked out in
    Python from the archived prompts and models rather than from the stored flag."""
    prompts = set(db.scalars(select(Prompt.id).where(Prompt.archived_at.is_not(None))))
    models = set(db.scalars(select(ModelVersion.id).where(ModelVersion.archived_at.is_not(None))))
    model_of = {i: m for i, m in db.execute(select(Image.id, Image.model_version_id))}
    rows = db.execute(
        select(
            Pair.id,
            Pair.prompt_id,
            Pair.image_a_id,
            Pair.image_b_id,
            Pair.is_gold,
            Pair.vote_count,
            Pair.votes_wanted,
        ).where(Pair.project_id == project_id)
    )
    hidden, is_open = set(), set()
    for pair_id, prompt_id, a, b, is_gold, vote_count, votes_wanted in rows:
        if prompt_id in prompts or {model_of[a], model_of[b]} & models:
            hidden.add(pair_id)
        elif not is_gold and vote_count < votes_wanted:
            is_open.add(pair_id)
    left: dict[int, set[int]] = {}
    for annotator_id, pair_id in db.execute(
        select(Vote.annotator_id, Vote.pair_id).where(Vote.project_id == project_id)
    ):
        left.setdefault(annotator_id, set()).add(pair_id)
    return hidden, {who: is_open - voted for who, voted in left.items()} | {-1: is_open}


def test_archives_hide_pairs_and_the_count_follows(backend: Backend) -> None:
    db = backend.db
    w = build_world(db, user_maker(db), n_prompts=3, n_models=3, seeds=(0, 1), votes_per_pair=2,
                    votes_per_second=50)  # fmt: skip
    pid = w.project.id
    (a, _), (b, _) = w.annotators
    # Some votes first: closed pairs must not move the count when they are hidden or shown.
    for user, n in ((a, 6), (b, 4)):
        for _ in range(n):
            served = scheduler.next_pair(db, project=w.project, annotator=user)
            assert served is not None
            votes.record_vote(
                db,
                pair_id=served.pair_id,
                annotator=user,
                choice="left",
                left_image_id=served.left_image_id,
            )
    p0, p1, _ = w.prompts
    m0, m1, m2 = w.models

    def archive(thing: Any, archived: bool) -> None:
        if isinstance(thing, Prompt):
            update_prompt(db, prompt=thing, data=PromptUpdate(archived=archived))
        else:
            update_model(db, model=thing, data=ModelUpdate(archived=archived))
        db.flush()
        hidden, left = _open_by_archive(db, pid)
        stored = set(db.scalars(select(Pair.id).where(Pair.project_id == pid, Pair.hidden)))
        assert stored == hidden, (thing.id, archived)
        if backend.name == "postgres":
            assert counter(db, pid) == recount(db, pid) == len(left[-1])
        for user in (a, b):
            expected = len(left.get(user.id, left[-1]))
            assert scheduler.pairs_left(db, project=w.project, annotator=user) == expected

    steps = [
        (p0, True),
        (m1, True),
        (p1, True),  # overlaps m1 on p1's pairs
        (m1, False),  # p0's and p1's pairs with m1 stay hidden by their prompts
        (m2, True),
        (m1, True),  # m1 vs m2 pairs are hidden twice over
        (m2, False),
        (p0, False),  # p0's m1 pairs stay hidden by m1
        (m1, False),
        (p1, False),
    ]
    for thing, archived in steps:
        archive(thing, archived)
    assert not db.scalar(select(Pair.id).where(Pair.project_id == pid, Pair.hidden))
    # A hidden pair's votes and its return to the open count, while it stays hidden or not.
    archive(m0, True)
    hidden_pair = db.scalar(select(Pair).where(Pair.project_id == pid, Pair.hidden).limit(1))
    assert hidden_pair is not None
    db.execute(update(Pair).where(Pair.id == hidden_pair.id).values(vote_count=0))
    if backend.name == "postgres":
        assert counter(db, pid) == recount(db, pid)
    archive(m0, False)
    # Gold pairs of an archived model's image are hidden as its regular pairs are.
    archive(m2, True)
    source = w.images[(0, 2, 0)]
    (gold,) = service.create_gold_pairs(db, get_media_store(), project=w.project, images=[source])
    assert db.scalar(select(Pair.hidden).where(Pair.id == gold.id)) is True
    archive(m2, False)
    assert db.scalar(select(Pair.hidden).where(Pair.id == gold.id)) is False
