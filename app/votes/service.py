"""Recording votes: the one path used by the JSON API and the vote page.

Rules:
- a skip is stored (the annotator never sees the pair again) but is no preference and does not
  take one of the pair's k slots: `vote_count` counts left/right/tie/both_bad only, so a skipped
  pair goes on to another annotator;
- a vote needs a free slot: the annotator's live reservation holds one; without it (expired,
  or a vote posted without asking for the pair) the pair must still have room, else 409;
- replays (same idempotency key on the same pair, or an identical repeat without a key) answer
  with the stored vote and create nothing;
- a gold pair takes votes only from annotators it was served to (their reservation, live or
  lapsed but not yet replaced), 409 otherwise;
- with the project's `min_view_ms` above 0, a vote whose measured `latency_ms` is below it is
  refused (422); a vote without a measured latency (API clients that do not time) is accepted;
- the rate limit counts the annotator's votes in the database over the last second (or over
  1/rate seconds when the rate is below one), so it holds across several web workers.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from app.core.db import utcnow
from app.core.deps import membership_role, project_role
from app.core.health import VOTES
from app.pairs.models import Pair, Reservation
from app.pairs.scheduler import (
    bound_lock_waits,
    is_postgres,
    live_reservations_by_others,
    load_pair_for_update,
    pairs_left,
)
from app.projects.models import Membership, Project
from app.projects.schemas import ProjectSettings
from app.projects.service import project_settings
from app.users.models import User
from app.votes.models import Vote
from app.votes.vocabulary import (
    MAX_LATENCY_MS,
    Choice,
    gold_answer,
    parse_choice,
)
from app.votes.vocabulary import gold_correct as grade

log = logging.getLogger("prefloop.votes")


class VoteError(Exception):
    """A vote refused; `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class PairNotFound(VoteError):
    status = 404


class NotAMember(VoteError):
    status = 403


class InvalidVote(VoteError):
    status = 422


class VoteConflict(VoteError):
    status = 409


class RateLimited(VoteError):
    status = 429


def _is_replay(vote: Vote, *, pair_id: int, choice: str, left_image_id: str) -> bool:
    return vote.pair_id == pair_id and vote.choice == choice and vote.left_image_id == left_image_id


def _existing(
    session: Session, *, pair_id: int, annotator_id: int, idempotency_key: str | None
) -> tuple[Vote | None, Vote | None]:
    """(the vote with this idempotency key, this annotator's vote on the pair)."""
    cond = Vote.pair_id == pair_id
    if idempotency_key is not None:
        cond = or_(cond, Vote.idempotency_key == idempotency_key)
    rows = session.scalars(
        select(Vote)
        .where(Vote.annotator_id == annotator_id, cond)
        .execution_options(populate_existing=True)
    ).all()
    by_key = next(
        (v for v in rows if idempotency_key and v.idempotency_key == idempotency_key), None
    )
    on_pair = next((v for v in rows if v.pair_id == pair_id), None)
    return by_key, on_pair


def _replay_or_conflict(
    by_key: Vote | None, on_pair: Vote | None, *, pair_id: int, choice: str, left_image_id: str
) -> Vote | None:
    """The vote to answer with when this request repeats one already stored; raises on conflict."""
    if by_key is not None:
        if by_key.pair_id != pair_id:
            raise VoteConflict(f"idempotency key already used for vote {by_key.id} on another pair")
        # A retry of a vote that was changed since still answers with that vote.
        return by_key
    if on_pair is not None:
        if _is_replay(on_pair, pair_id=pair_id, choice=choice, left_image_id=left_image_id):
            return on_pair
        raise VoteConflict(
            f"you already voted {on_pair.choice!r} on pair {pair_id} (vote {on_pair.id}); "
            f"change it with PUT /api/v1/votes/{on_pair.id}"
        )
    return None


def _has_room(session: Session, pair: Pair, annotator_id: int, now: dt.datetime) -> bool:
    if pair.is_gold:
        return True
    others = live_reservations_by_others(
        session, pair_id=pair.id, annotator_id=annotator_id, now=now
    )
    return pair.vote_count + others < pair.votes_wanted


# Built once: constructing statements is a measurable share of a hot request's CPU.
_PAIR_IN_PROJECT = (
    select(Pair, Project, Membership.role)
    .join(Project, Project.id == Pair.project_id)
    .outerjoin(
        Membership,
        (Membership.project_id == Pair.project_id)
        & (Membership.user_id == bindparam("user_id"))
        & Membership.is_active.is_(True),
    )
    .where(Pair.id == bindparam("pair_id"))
    # NO KEY UPDATE: does not block the key-share locks taken by inserts referencing the pair.
    .with_for_update(of=Pair, key_share=True)
)


def _pair_in_project(
    session: Session, pair_id: int, annotator: User
) -> tuple[Pair, Project, str | None] | None:
    """(the pair, locked until commit; its project; the annotator's role there), one statement.

    Locked: concurrent votes and schedulers on this pair queue up behind us.
    """
    if not is_postgres(session):
        pair = load_pair_for_update(session, pair_id)
        if pair is None:
            return None
        project = session.get(Project, pair.project_id)
        assert project is not None
        return pair, project, membership_role(session, annotator, pair.project_id)
    bound_lock_waits(session)
    row = session.execute(
        _PAIR_IN_PROJECT,
        {"pair_id": pair_id, "user_id": annotator.id},
        execution_options={"populate_existing": True},
    ).one_or_none()
    if row is None:
        return None
    pair, project, member_role = row
    return pair, project, project_role(annotator, project.id, member_role)


@dataclass(frozen=True)
class Standing:
    """What a new vote is checked against, read in one statement."""

    seen: bool  # a vote on this pair, or with this idempotency key, exists
    recent: int  # the annotator's votes in the project within the rate window
    oldest: dt.datetime | None
    reservation_expires: dt.datetime | None
    has_reservation: bool


@lru_cache(maxsize=2)
def _standing_stmt(with_key: bool) -> Any:
    annotator_id: Any = bindparam("annotator_id")
    pair_id: Any = bindparam("pair_id")
    mine = Vote.annotator_id == annotator_id
    same = Vote.pair_id == pair_id
    if with_key:
        same = or_(same, Vote.idempotency_key == bindparam("idempotency_key"))
    recent = (
        Vote.project_id == bindparam("project_id"),
        Vote.created_at > bindparam("since"),
        mine,
    )
    reservation = (Reservation.pair_id == pair_id, Reservation.annotator_id == annotator_id)
    return select(
        select(Vote.id).where(mine, same).exists().label("seen"),
        # The (project_id, created_at) index bounds this by the project's recent votes.
        select(func.count()).select_from(Vote).where(*recent).scalar_subquery(),
        select(func.min(Vote.created_at)).where(*recent).scalar_subquery(),
        select(Reservation.expires_at).where(*reservation).scalar_subquery(),
        select(Reservation.pair_id).where(*reservation).exists(),
    )


def _standing(
    session: Session,
    *,
    pair_id: int,
    project_id: int,
    annotator_id: int,
    idempotency_key: str | None,
    since: dt.datetime,
) -> Standing:
    params: dict[str, Any] = {
        "pair_id": pair_id,
        "project_id": project_id,
        "annotator_id": annotator_id,
        "since": since,
    }
    if idempotency_key is not None:
        params["idempotency_key"] = idempotency_key
    row = session.execute(_standing_stmt(idempotency_key is not None), params).one()
    oldest = row[2]
    if oldest is not None and oldest.tzinfo is None:  # SQLite gives naive datetimes here
        oldest = oldest.replace(tzinfo=dt.UTC)
    expires = row[3]
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    return Standing(bool(row[0]), int(row[1]), oldest, expires, bool(row[4]))


def _rate_limited(per_second: float, standing: Standing, now: dt.datetime) -> RateLimited | None:
    window = max(1.0, 1.0 / per_second)
    allowed = max(1, math.floor(per_second * window))
    if standing.recent < allowed:
        return None
    oldest = standing.oldest
    wait = (oldest + dt.timedelta(seconds=window) - now).total_seconds() if oldest else window
    retry_after = max(1, math.ceil(wait))
    return RateLimited(
        f"too many votes: this project allows {per_second:g} per second; retry in {retry_after} s",
        retry_after=retry_after,
    )


# Vote and release in one statement: the vote (or nothing, when a concurrent identical request
# committed first), the pair's count when it is a preference, the annotator's reservation gone.
_VOTE_AND_RELEASE = text(
    """
    WITH v AS (
      INSERT INTO votes (pair_id, project_id, annotator_id, left_image_id, choice, latency_ms,
                         idempotency_key, created_at)
      VALUES (:pair_id, :project_id, :annotator_id, :left_image_id, :choice, :latency_ms,
              :idempotency_key, :created_at)
      ON CONFLICT DO NOTHING
      RETURNING id
    ), counted AS (
      UPDATE pairs SET vote_count = vote_count + :counts
      WHERE id = :pair_id AND :counts > 0 AND EXISTS (SELECT 1 FROM v)
      RETURNING vote_count
    ), released AS (
      DELETE FROM reservations
      WHERE pair_id = :pair_id AND annotator_id = :annotator_id AND EXISTS (SELECT 1 FROM v)
    )
    SELECT id, (SELECT vote_count FROM counted) FROM v
    """
)


def _insert(session: Session, vote: Vote, pair: Pair, *, counts: bool) -> bool:
    """Store the vote, count it on the pair, free the reservation; False if a concurrent
    identical request stored its vote first (nothing written then)."""
    if is_postgres(session):
        params = {
            c: getattr(vote, c)
            for c in (
                "pair_id",
                "project_id",
                "annotator_id",
                "left_image_id",
                "choice",
                "latency_ms",
                "idempotency_key",
                "created_at",
            )
        }
        row = session.execute(_VOTE_AND_RELEASE, {**params, "counts": int(counts)}).one_or_none()
        if row is None:
            return False
        vote.id = row[0]
        # The row is stored: make the object persistent without another round trip.
        make_transient_to_detached(vote)
        session.add(vote)
        if counts:
            set_committed_value(pair, "vote_count", row[1])
        _forget_reservation(session, vote)
        return True
    try:
        with session.begin_nested():
            session.add(vote)
            session.flush()
    except IntegrityError:
        return False
    if counts:
        pair.vote_count += 1
    session.execute(
        delete(Reservation).where(
            Reservation.pair_id == vote.pair_id, Reservation.annotator_id == vote.annotator_id
        ),
        execution_options={"synchronize_session": False},
    )
    _forget_reservation(session, vote)
    session.flush()
    return True


def _forget_reservation(session: Session, vote: Vote) -> None:
    # Deleted in SQL: a copy of the row loaded earlier in this session must not outlive it.
    key = session.identity_key(Reservation, (vote.pair_id, vote.annotator_id))
    held = session.identity_map.get(key)
    if held is not None:
        session.expunge(held)


def checked_input(choice: str, latency_ms: int | None, idempotency_key: str | None) -> Choice:
    """The vote's choice, if the request's own fields are valid; raises `InvalidVote`."""
    try:
        picked = parse_choice(choice)
    except ValueError as exc:
        raise InvalidVote(str(exc)) from None
    if latency_ms is not None and not 0 <= latency_ms <= MAX_LATENCY_MS:
        raise InvalidVote(f"latency_ms must be between 0 and {MAX_LATENCY_MS}")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 100:
        raise InvalidVote("idempotency_key must be 1 to 100 characters")
    return picked


def rate_window(settings: ProjectSettings) -> float:
    """Seconds over which the rate limit counts an annotator's votes."""
    return max(1.0, 1.0 / settings.votes_per_second)


def refusal(
    *,
    pair_id: int,
    is_gold: bool,
    votes_wanted: int,
    settings: ProjectSettings,
    standing: Standing,
    latency_ms: int | None,
    counts: bool,
    has_room: Callable[[], bool],
    now: dt.datetime,
) -> VoteError | None:
    """Why a new (not replayed) vote is refused, or None: the rules after the pair and the
    annotator's standing are known (the JSON API's fast lane applies the same ones).

    `has_room` is asked only when the vote takes a slot the annotator holds no reservation for.
    """
    limited = _rate_limited(settings.votes_per_second, standing, now)
    if limited is not None:
        return limited
    if latency_ms is not None and latency_ms < settings.min_view_ms:
        return InvalidVote(
            f"latency_ms {latency_ms} is below this project's minimum viewing time of "
            f"{settings.min_view_ms} ms: look at both images before voting"
        )
    if is_gold and not standing.has_reservation:
        # A gold pair's id must not be answerable by someone who was never shown it.
        return VoteConflict(f"pair {pair_id} was not served to you: ask for it with pairs/next")
    expires = standing.reservation_expires
    holds_slot = expires is not None and expires > now
    if counts and not holds_slot and not has_room():
        return VoteConflict(f"pair {pair_id} already has the {votes_wanted} votes it needs")
    return None


def record_vote(
    session: Session,
    *,
    pair_id: int,
    annotator: User,
    choice: str,
    left_image_id: str,
    latency_ms: int | None = None,
    idempotency_key: str | None = None,
    now: dt.datetime | None = None,
) -> tuple[Vote, bool]:
    """Store one vote; returns (vote, created). Raises a `VoteError` subclass when refused."""
    now = now or utcnow()
    picked = checked_input(choice, latency_ms, idempotency_key)
    choice = picked.value  # stored as the plain string
    found = _pair_in_project(session, pair_id, annotator)
    if found is None:
        raise PairNotFound(f"pair {pair_id} not found")
    pair, project, role = found
    if role is None:
        raise NotAMember("not a member of this pair's project")
    if left_image_id not in (pair.image_a_id, pair.image_b_id):
        raise InvalidVote(f"left_image_id {left_image_id!r} is not an image of pair {pair_id}")

    settings = project_settings(project)
    standing = _standing(
        session,
        pair_id=pair_id,
        project_id=project.id,
        annotator_id=annotator.id,
        idempotency_key=idempotency_key,
        since=now - dt.timedelta(seconds=rate_window(settings)),
    )
    if standing.seen:  # rare: a replay, or a second vote on the pair
        by_key, on_pair = _existing(
            session, pair_id=pair_id, annotator_id=annotator.id, idempotency_key=idempotency_key
        )
        replay = _replay_or_conflict(
            by_key, on_pair, pair_id=pair_id, choice=choice, left_image_id=left_image_id
        )
        if replay is not None:
            return replay, False

    counts = picked.is_preference
    refused = refusal(
        pair_id=pair_id,
        is_gold=pair.is_gold,
        votes_wanted=pair.votes_wanted,
        settings=settings,
        standing=standing,
        latency_ms=latency_ms,
        counts=counts,
        has_room=lambda: _has_room(session, pair, annotator.id, now),
        now=now,
    )
    if refused is not None:
        if isinstance(refused, RateLimited):
            log.info("votes.rate_limited annotator_id=%s project_id=%s", annotator.id, project.id)
        raise refused

    vote = Vote(
        pair_id=pair_id,
        project_id=pair.project_id,
        annotator_id=annotator.id,
        left_image_id=left_image_id,
        choice=choice,
        latency_ms=latency_ms,
        idempotency_key=idempotency_key,
        created_at=now,
    )
    if not _insert(session, vote, pair, counts=counts):
        # A concurrent identical request committed first: answer with its vote.
        by_key, on_pair = _existing(
            session, pair_id=pair_id, annotator_id=annotator.id, idempotency_key=idempotency_key
        )
        replay = _replay_or_conflict(
            by_key, on_pair, pair_id=pair_id, choice=choice, left_image_id=left_image_id
        )
        if replay is None:
            raise VoteConflict(f"vote on pair {pair_id} conflicts with one stored meanwhile")
        return replay, False
    VOTES.labels(choice).inc()
    return vote, True


def changeable_vote(
    session: Session, *, vote_id: int, annotator: User, now: dt.datetime | None = None
) -> Vote:
    """The vote, if this annotator may still change it; raises a `VoteError` otherwise.

    Only the annotator's most recent vote in its project, within `change_vote_seconds`.
    """
    now = now or utcnow()
    vote = session.get(Vote, vote_id)
    # Someone else's vote looks like no vote at all.
    if vote is None or vote.annotator_id != annotator.id:
        raise PairNotFound(f"vote {vote_id} not found")
    project = session.get(Project, vote.project_id)
    assert project is not None
    seconds = project_settings(project).change_vote_seconds
    last = last_vote(session, project_id=vote.project_id, annotator_id=annotator.id)
    if last is None or last.id != vote.id:
        raise VoteConflict("only your most recent vote can be changed")
    if (now - vote.created_at).total_seconds() > seconds:
        raise VoteConflict(f"too late: a vote can be changed within {seconds} s of casting it")
    return vote


def change_last_vote(
    session: Session,
    *,
    vote_id: int,
    annotator: User,
    choice: str,
    now: dt.datetime | None = None,
) -> Vote:
    """Change the annotator's most recent vote in its project, within `change_vote_seconds`."""
    now = now or utcnow()
    vote = changeable_vote(session, vote_id=vote_id, annotator=annotator, now=now)
    try:
        picked = parse_choice(choice)
    except ValueError as exc:
        raise InvalidVote(str(exc)) from None
    choice, becomes = picked.value, picked.is_preference
    if choice == vote.choice:
        return vote
    bound_lock_waits(session)
    pair = load_pair_for_update(session, vote.pair_id)
    assert pair is not None
    was = Choice(vote.choice).is_preference
    if becomes and not was:
        if not _has_room(session, pair, annotator.id, now):
            raise VoteConflict(f"pair {pair.id} already has the {pair.votes_wanted} votes it needs")
        pair.vote_count += 1
    elif was and not becomes:
        pair.vote_count -= 1
    vote.choice = choice
    vote.updated_at = now
    session.flush()
    return vote


@dataclass(frozen=True)
class AnnotatorStats:
    votes_today: int
    votes_total: int
    pairs_left: int
    gold_answered: int
    gold_correct: int
    reveal_gold: bool

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_answered if self.gold_answered else None


def gold_correct(
    *, choice: str, left_image_id: str, expected: str | None, image_a_id: str, image_b_id: str
) -> bool | None:
    """Whether a vote on a gold pair gave the known answer (None: a skip, not an answer)."""
    if expected is None:
        return None
    right_image_id = image_b_id if left_image_id == image_a_id else image_a_id
    return grade(choice, gold_answer(expected, left_image_id, right_image_id))


def annotator_stats(
    session: Session, *, project: Project, annotator: User, now: dt.datetime | None = None
) -> AnnotatorStats:
    now = now or utcnow()
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    mine = (Vote.project_id == project.id, Vote.annotator_id == annotator.id)
    total = session.scalar(select(func.count()).select_from(Vote).where(*mine)) or 0
    today = (
        session.scalar(
            select(func.count()).select_from(Vote).where(*mine, Vote.created_at >= midnight)
        )
        or 0
    )
    answered = correct = 0
    rows = session.execute(
        select(
            Vote.choice, Vote.left_image_id, Pair.gold_expected, Pair.image_a_id, Pair.image_b_id
        )
        .join(Pair, Pair.id == Vote.pair_id)
        .where(*mine, Pair.is_gold.is_(True))
    )
    for choice, left, expected, a, b in rows:
        ok = gold_correct(
            choice=choice, left_image_id=left, expected=expected, image_a_id=a, image_b_id=b
        )
        if ok is not None:
            answered += 1
            correct += int(ok)
    return AnnotatorStats(
        votes_today=int(today),
        votes_total=int(total),
        pairs_left=pairs_left(session, project=project, annotator=annotator),
        gold_answered=answered,
        gold_correct=correct,
        reveal_gold=project_settings(project).reveal_gold,
    )


def last_vote(session: Session, *, project_id: int, annotator_id: int) -> Vote | None:
    return session.scalar(
        select(Vote)
        .where(Vote.project_id == project_id, Vote.annotator_id == annotator_id)
        .order_by(Vote.created_at.desc(), Vote.id.desc())
        .limit(1)
    )
