"""The pair scheduler: which pair an annotator sees next (building pairs: `app.pairs.building`;
gold pairs: `app.pairs.gold`; the order of candidates: `app.pairs.ordering`).

Rules of `next_pair`:
- never a pair the annotator already voted on (a skip counts as seen);
- a pair takes at most `votes_wanted` (k) annotators: its votes plus the live reservations of
  other annotators must stay below k for it to be served; serving reserves a slot for
  `reservation_minutes`, with a random left image per assignment;
- pairs with the fewest votes + live reservations come first; for projects with active
  sampling on, the active order (a parameter, default `app.pairs.active.active_order`)
  reorders the candidates;
- gold pairs are served at the project's `gold_rate`, at most once per annotator, and are not
  capped at k: they measure annotators, so every annotator should meet them;
- asking again while holding a live reservation returns the same pair and side;
- hidden pairs (of an archived prompt or model: `app.pairs.hiding`) are never served, and an
  archived project serves nothing.

Concurrency: on Postgres the candidate pair row is locked with `FOR NO KEY UPDATE SKIP LOCKED`
and the capacity is checked again, in a fresh statement, once the lock is held, so concurrent
annotators cannot push a pair past k. The scheduler never waits on a pair lock: when every
open candidate is locked by someone else it looks again a few times, then raises `PairsBusy`
(the API answers 503 with Retry-After) rather than block a web thread. Other lock waits are
bounded by `lock_timeout`, so a stalled request can never wedge the others. SQLite serialises
writers: the first write of the unit of work (deleting the annotator's expired reservations)
takes the database write lock.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, false, func, literal, select, text, update
from sqlalchemy.orm import Session, aliased

from app.core.db import LOCK_TIMEOUT_MS, is_postgres, utcnow
from app.images.models import Image
from app.pairs.models import Pair, PairCount, Reservation
from app.pairs.ordering import Candidate, CandidateOrder, fewest_votes_first
from app.projects.models import Project, Prompt
from app.projects.service import project_settings
from app.users.models import User
from app.votes.models import Vote

# How many candidate pairs one scheduling decision looks at (fewest votes first). The default
# order takes the first open one in it; 16 spreads concurrent annotators as well as 64 did and
# cost Postgres about a quarter less per vote cycle (benchmarks/vote_path.py's ceiling). Active
# sampling chooses among more.
CANDIDATE_WINDOW = 16
ACTIVE_WINDOW = 64
# Candidates tried per look, and looks (with a short pause between) when all were locked.
MAX_TRIES = 24
LOOKS = 4


class PairsBusy(Exception):
    """Every open pair was being handed out or voted on at that moment: ask again shortly."""


@dataclass(frozen=True)
class ServedPair:
    """A pair reserved for one annotator. `is_gold` is internal: never send it to annotators."""

    pair_id: int
    prompt: str
    left_image_id: str
    right_image_id: str
    expires_at: dt.datetime
    is_gold: bool
    # Content hashes of the images, for signed image URLs.
    left_sha256: str = ""
    right_sha256: str = ""


def order_for(project: Project, active: CandidateOrder | None = None) -> CandidateOrder:
    """The order for this project: `active` (default `app.pairs.active.active_order`) when the
    project has `active_sampling` on, else fewest votes first.

    An active order gets capacity-checked candidates; it may reorder or drop them, and is
    expected to honour the project's `random_floor` itself.
    """
    if project_settings(project).active_sampling:
        if active is not None:
            return active
        from app.pairs.active import active_order  # it builds on the scheduler's modules

        return active_order
    return fewest_votes_first


def window_for(project: Project) -> int:
    """How many candidates a scheduling decision in this project looks at."""
    return ACTIVE_WINDOW if project_settings(project).active_sampling else CANDIDATE_WINDOW


def _live_others(annotator_id: Any, now: Any, pair_id: Any = Pair.id) -> Any:
    # Values or bound parameters (the hot statements are built once with bindparams).
    return (
        select(func.count())
        .select_from(Reservation)
        .where(
            Reservation.pair_id == pair_id,
            Reservation.expires_at > now,
            Reservation.annotator_id != annotator_id,
        )
        .scalar_subquery()
    )


def live_reservations_by_others(
    session: Session, *, pair_id: int, annotator_id: int, now: dt.datetime
) -> int:
    return int(session.scalar(select(_live_others(annotator_id, now, pair_id))) or 0)


def load_pair_for_update(session: Session, pair_id: int) -> Pair | None:
    """The pair, locked against concurrent schedulers and votes until the transaction ends."""
    if is_postgres(session):
        # NO KEY UPDATE: does not block the key-share locks taken by inserts referencing the pair.
        return session.get(
            Pair, pair_id, with_for_update={"key_share": True}, populate_existing=True
        )
    # SQLite has no row locks: a write takes the database write lock for the transaction.
    session.execute(
        update(Pair).where(Pair.id == pair_id).values(vote_count=Pair.vote_count),
        execution_options={"synchronize_session": False},
    )
    return session.get(Pair, pair_id, populate_existing=True)


def _try_lock(session: Session, pair_id: int) -> bool:
    if not is_postgres(session):
        return load_pair_for_update(session, pair_id) is not None
    stmt = (
        select(Pair.id).where(Pair.id == pair_id).with_for_update(key_share=True, skip_locked=True)
    )
    return session.scalar(stmt) is not None


@lru_cache(maxsize=8)
def _candidates_stmt(gold: bool, exclude: bool) -> Any:
    # Built once per shape (the hot path pays for statement construction otherwise); the
    # values are bound parameters.
    annotator_id: Any = bindparam("annotator_id")
    reserved = _live_others(annotator_id, bindparam("now"))
    voted = (
        select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator_id).exists()
    )
    stmt = select(
        Pair.id,
        Pair.prompt_id,
        Pair.image_a_id,
        Pair.image_b_id,
        Pair.purpose,
        Pair.is_gold,
        Pair.vote_count,
        Pair.votes_wanted,
        reserved,
    ).where(
        Pair.project_id == bindparam("project_id"),
        Pair.is_gold == gold,
        Pair.hidden == false(),
        ~voted,
    )
    if not gold:
        stmt = stmt.where(
            Pair.vote_count < Pair.votes_wanted, Pair.vote_count + reserved < Pair.votes_wanted
        )
    if exclude:
        stmt = stmt.where(Pair.id.not_in(bindparam("exclude", expanding=True)))
    return stmt.order_by(Pair.vote_count).limit(bindparam("window"))


def _candidates(
    session: Session,
    *,
    project_id: int,
    annotator_id: int,
    gold: bool,
    now: dt.datetime,
    window: int,
    exclude: Sequence[int] = (),
) -> list[Candidate]:
    params: dict[str, Any] = {
        "annotator_id": annotator_id,
        "now": now,
        "project_id": project_id,
        "window": window,
    }
    if exclude:
        params["exclude"] = list(exclude)
    stmt = _candidates_stmt(gold, bool(exclude))
    return [Candidate(*row) for row in session.execute(stmt, params)]


def _still_open(
    session: Session, cand: Candidate, annotator_id: int, now: dt.datetime
) -> tuple[str, str, str] | None:
    """(prompt text, content hashes of images a and b) if the pair is still open for this
    annotator, else None.

    Runs as a fresh statement after the lock, so it sees what others have just committed.
    """
    voted = (
        select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator_id).exists()
    )
    image_a, image_b = aliased(Image), aliased(Image)
    row = session.execute(
        select(
            Pair.vote_count,
            Pair.votes_wanted,
            _live_others(annotator_id, now),
            voted,
            Prompt.text,
            image_a.sha256,
            image_b.sha256,
        )
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(image_a, image_a.id == Pair.image_a_id)
        .join(image_b, image_b.id == Pair.image_b_id)
        .where(Pair.id == cand.pair_id)
    ).one_or_none()
    if row is None:
        return None
    vote_count, votes_wanted, reserved, already_voted, prompt, sha_a, sha_b = row
    if already_voted or not (cand.is_gold or vote_count + reserved < votes_wanted):
        return None
    return prompt, sha_a, sha_b


def expired_reservations(annotator_id: Any, before: Any) -> Any:
    """The statement removing an annotator's reservations lapsed by `before` (values or bound
    parameters)."""
    return delete(Reservation).where(
        Reservation.annotator_id == annotator_id, Reservation.expires_at <= before
    )


def _drop_reservations(session: Session, annotator_id: int, *, expired_before: dt.datetime) -> None:
    session.execute(
        expired_reservations(annotator_id, expired_before),
        execution_options={"synchronize_session": False},
    )


@lru_cache(maxsize=2)
def _held_stmt(lock: bool) -> Any:
    image_a, image_b = aliased(Image), aliased(Image)
    stmt = (
        select(
            Reservation.pair_id,
            Reservation.left_image_id,
            Reservation.expires_at,
            Pair.image_a_id,
            Pair.image_b_id,
            Pair.is_gold,
            Prompt.text,
            image_a.sha256,
            image_b.sha256,
        )
        .select_from(User)
        .outerjoin(Reservation, Reservation.annotator_id == User.id)
        .outerjoin(
            Pair, (Pair.id == Reservation.pair_id) & (Pair.project_id == bindparam("project_id"))
        )
        .outerjoin(Prompt, Prompt.id == Pair.prompt_id)
        .outerjoin(image_a, image_a.id == Pair.image_a_id)
        .outerjoin(image_b, image_b.id == Pair.image_b_id)
        .where(User.id == bindparam("annotator_id"))
        .order_by(Reservation.created_at.desc())
    )
    return stmt.with_for_update(of=User, key_share=True) if lock else stmt


def _held(
    session: Session, *, project_id: int, annotator_id: int, now: dt.datetime
) -> tuple[ServedPair | None, list[int]]:
    """(the live reservation of this annotator in the project, pairs of its expired ones).

    On Postgres the same statement locks the annotator's row, which serialises the annotator's
    own concurrent requests (one live reservation each).
    """
    stmt = _held_stmt(is_postgres(session))
    params = {"project_id": project_id, "annotator_id": annotator_id}
    live = None
    expired = []
    for row in session.execute(stmt, params):
        pair_id, left, expires_at, a, b, is_gold, prompt, sha_a, sha_b = row
        if pair_id is None or a is None:  # no reservation, or one in another project
            continue
        if expires_at <= now:
            expired.append(pair_id)
        elif live is None:
            live = held_pair(pair_id, left, expires_at, a, b, is_gold, prompt, sha_a, sha_b)
    return live, expired


def held_pair(
    pair_id: int,
    left: str,
    expires_at: dt.datetime,
    a: str,
    b: str,
    is_gold: bool,
    prompt: str,
    sha_a: str,
    sha_b: str,
) -> ServedPair:
    """A live reservation served again: the same pair, with the side it was shown on."""
    on_a = left == a
    return ServedPair(
        pair_id,
        prompt,
        left,
        b if on_a else a,
        expires_at,
        is_gold,
        sha_a if on_a else sha_b,
        sha_b if on_a else sha_a,
    )


# Check again, on a pair just locked, that it is open for this annotator, and reserve it: one
# statement, whose snapshot is taken after the lock, so it sees what others committed before.
_RESERVE_IF_OPEN = text(
    """
    WITH still_open AS (
      SELECT p.id, pr.text, ia.sha256 AS sha_a, ib.sha256 AS sha_b
      FROM pairs p
      JOIN prompts pr ON pr.id = p.prompt_id
      JOIN images ia ON ia.id = p.image_a_id
      JOIN images ib ON ib.id = p.image_b_id
      WHERE p.id = :pair_id
        AND NOT EXISTS (
          SELECT 1 FROM votes v WHERE v.pair_id = p.id AND v.annotator_id = :annotator_id)
        AND (p.is_gold OR p.vote_count + (
          SELECT count(*) FROM reservations r
          WHERE r.pair_id = p.id AND r.expires_at > :now AND r.annotator_id <> :annotator_id
        ) < p.votes_wanted)
    ), reserved AS (
      INSERT INTO reservations (pair_id, annotator_id, left_image_id, created_at, expires_at)
      SELECT id, :annotator_id, :left_image_id, :now, :expires_at FROM still_open
    )
    SELECT text, sha_a, sha_b FROM still_open
    """
)


def _reserve_if_open(
    session: Session,
    cand: Candidate,
    *,
    annotator_id: int,
    minutes: float,
    now: dt.datetime,
    rng: random.Random,
) -> ServedPair | None:
    on_a = rng.random() < 0.5
    left, right = (cand.image_a_id, cand.image_b_id) if on_a else (cand.image_b_id, cand.image_a_id)
    expires_at = now + dt.timedelta(minutes=minutes)
    if not is_postgres(session):
        found = _still_open(session, cand, annotator_id, now)
        if found is None:
            return None
        session.add(
            Reservation(
                pair_id=cand.pair_id,
                annotator_id=annotator_id,
                left_image_id=left,
                created_at=now,
                expires_at=expires_at,
            )
        )
        session.flush()
    else:
        row = session.execute(
            _RESERVE_IF_OPEN,
            {
                "pair_id": cand.pair_id,
                "annotator_id": annotator_id,
                "left_image_id": left,
                "now": now,
                "expires_at": expires_at,
            },
        ).one_or_none()
        if row is None:
            return None
        found = (row[0], row[1], row[2])
    prompt, sha_a, sha_b = found
    return ServedPair(
        cand.pair_id,
        prompt,
        left,
        right,
        expires_at,
        cand.is_gold,
        sha_a if on_a else sha_b,
        sha_b if on_a else sha_a,
    )


def _serve_from(
    session: Session,
    ordered: list[Candidate],
    *,
    annotator_id: int,
    minutes: float,
    now: dt.datetime,
    rng: random.Random,
) -> tuple[ServedPair | None, int]:
    """Reserve the first candidate that can be locked and is still open; (served, locked)."""
    locked = 0
    for cand in ordered[:MAX_TRIES]:
        if not _try_lock(session, cand.pair_id):
            locked += 1
            continue
        served = _reserve_if_open(
            session, cand, annotator_id=annotator_id, minutes=minutes, now=now, rng=rng
        )
        if served is not None:
            return served, locked
    return None, locked


def bound_lock_waits(session: Session) -> None:
    """Cap row-lock waits for the rest of this transaction (Postgres; SQLite has busy_timeout).

    Connections of `get_engine` have the cap from the start: no statement then."""
    if not is_postgres(session):
        return
    if session.connection().get_execution_options().get("lock_timeout_ms") == LOCK_TIMEOUT_MS:
        return
    session.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))


def next_pair(
    session: Session,
    *,
    project: Project,
    annotator: User,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
    order: CandidateOrder | None = None,
    active_order: CandidateOrder | None = None,
    window: int | None = None,
) -> ServedPair | None:
    """Reserve and return the next pair for this annotator, or None when nothing is left.

    `order` reorders the capacity-checked candidates whatever the project's settings (default:
    `order_for(project, active_order)`: `active_order` for projects with active sampling on);
    `rng` picks gold-or-not and the left side.
    """
    if project.archived_at is not None:
        return None  # an archived project is history: nothing more to vote on
    now = now or utcnow()
    rng = rng or random.Random()
    settings = project_settings(project)
    bound_lock_waits(session)
    if not is_postgres(session):
        # The first write of the unit of work takes SQLite's write lock: schedulers queue here.
        _drop_reservations(session, annotator.id, expired_before=now)
    held, expired = _held(session, project_id=project.id, annotator_id=annotator.id, now=now)
    if held is not None:
        return held
    if expired:
        # Lapsed ones would collide with a new reservation of the same pair.
        _drop_reservations(session, annotator.id, expired_before=now)
    window = window or window_for(project)
    gold_first = settings.gold_rate > 0 and rng.random() < settings.gold_rate
    tiers = [True, False] if gold_first else [False]
    for look in range(LOOKS):
        locked = 0
        for gold in tiers:
            candidates = _candidates(
                session,
                project_id=project.id,
                annotator_id=annotator.id,
                gold=gold,
                now=now,
                window=window,
            )
            if not candidates:
                continue
            ordering = fewest_votes_first if gold else (order or order_for(project, active_order))
            served, skipped = _serve_from(
                session,
                ordering(session, project, candidates, annotator),
                annotator_id=annotator.id,
                minutes=settings.reservation_minutes,
                now=now,
                rng=rng,
            )
            if served is not None:
                return served
            locked += skipped
        if not locked:
            return None
        # Locks are held for a few milliseconds: look again rather than wait on one.
        time.sleep(0.005 * 2**look)
    raise PairsBusy("every open pair is being handed out right now; ask again in a second")


def peek_candidate(
    session: Session,
    *,
    project: Project,
    annotator: User,
    exclude: Sequence[int],
    now: dt.datetime | None = None,
    active_order: CandidateOrder | None = None,
) -> Candidate | None:
    """The pair likely to come next, without reserving it (for preloading its images)."""
    now = now or utcnow()
    candidates = _candidates(
        session,
        project_id=project.id,
        annotator_id=annotator.id,
        gold=False,
        now=now,
        window=window_for(project),
        exclude=exclude,
    )
    if not candidates:
        return None
    first = order_for(project, active_order)(session, project, candidates, annotator)
    return first[0] if first else None


def peek_next(
    session: Session,
    *,
    project: Project,
    annotator: User,
    exclude: Sequence[int],
    now: dt.datetime | None = None,
    active_order: CandidateOrder | None = None,
) -> tuple[str, str] | None:
    """The images of the pair likely to come next, without reserving it (for preloading)."""
    cand = peek_candidate(
        session,
        project=project,
        annotator=annotator,
        exclude=exclude,
        now=now,
        active_order=active_order,
    )
    return (cand.image_a_id, cand.image_b_id) if cand else None


def _is_open() -> Any:
    # What the counter's trigger counts (migration 0006).
    return (
        (Pair.is_gold == false()) & (Pair.hidden == false()) & (Pair.vote_count < Pair.votes_wanted)
    )


def counted_pairs_left(project_id: Any, annotator_id: Any) -> Any:
    """Postgres' `pairs_left` of a live project: its open pairs from the counter (`PairCount`)
    less those of them the annotator voted on. Values or bound parameters."""
    open_pairs = (
        select(PairCount.open_pairs).where(PairCount.project_id == project_id).scalar_subquery()
    )
    # Each of the annotator's votes looks its pair up (a subquery per vote): as a join,
    # Postgres chose to merge through every pair of the project, a cost that grew with it.
    pair_open = select(_is_open()).where(Pair.id == Vote.pair_id).scalar_subquery()
    voted_open = (
        select(func.count())
        .select_from(Vote)
        .where(Vote.annotator_id == annotator_id, Vote.project_id == project_id, pair_open)
        .scalar_subquery()
    )
    return func.coalesce(open_pairs, 0) - voted_open


def pairs_left_count(session: Session, *, project: Project, annotator: User) -> Any:
    """`pairs_left` as a scalar expression, for a statement that reads other figures with it."""
    if project.archived_at is not None:
        return literal(0)
    if is_postgres(session):
        return counted_pairs_left(project.id, annotator.id)
    voted = (
        select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator.id).exists()
    )
    return (
        select(func.count())
        .select_from(Pair)
        .where(Pair.project_id == project.id, _is_open(), ~voted)
        .scalar_subquery()
    )


def pairs_left(session: Session, *, project: Project, annotator: User) -> int:
    """Open non-gold pairs this annotator has not voted on (reservations of others ignored;
    hidden pairs, of archived prompts and models, are not open; an archived project has none).

    On Postgres: the project's open pairs from its counter (`PairCount`) less those of them
    this annotator voted on, so the cost follows the annotator's votes, not the project's size.
    SQLite counts the project's open pairs.
    """
    if project.archived_at is not None:
        return 0
    return int(
        session.scalar(select(pairs_left_count(session, project=project, annotator=annotator))) or 0
    )
