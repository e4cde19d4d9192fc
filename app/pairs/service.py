"""The pair scheduler: which images get compared, and which pair an annotator sees next.

Rules of `next_pair`:
- never a pair the annotator already voted on (a skip counts as seen);
- a pair takes at most `votes_wanted` (k) annotators: its votes plus the live reservations of
  other annotators must stay below k for it to be served; serving reserves a slot for
  `reservation_minutes`, with a random left image per assignment;
- pairs with the fewest votes + live reservations come first (the `order` hook lets active
  sampling reorder the candidates);
- gold pairs are served at the project's `gold_rate`, at most once per annotator, and are not
  capped at k: they measure annotators, so every annotator should meet them;
- asking again while holding a live reservation returns the same pair and side.

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
import io
import itertools
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFilter
from sqlalchemy import delete, false, func, or_, select, text, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.storage import MediaStore
from app.images.models import Image
from app.images.service import store_image
from app.pairs.models import Pair, Reservation
from app.projects.models import Project, Prompt
from app.projects.service import project_settings
from app.users.models import User
from app.votes.models import Vote

GOLD_KINDS = ("blur", "noise")
# How many candidate pairs one scheduling decision looks at (fewest votes first).
CANDIDATE_WINDOW = 64
# Candidates tried per look, and looks (with a short pause between) when all were locked.
MAX_TRIES = 24
LOOKS = 4
# Longest wait for a row lock in the scheduler and the vote path (Postgres).
LOCK_TIMEOUT_MS = 3000


class PairsBusy(Exception):
    """Every open pair was being handed out or voted on at that moment: ask again shortly."""


# --- building pairs -----------------------------------------------------------------------------


def _canonical(x: str, y: str) -> tuple[str, str]:
    # One stored order, so the (image_a_id, image_b_id) unique constraint also catches (b, a).
    return (x, y) if x < y else (y, x)


def _seed_key(image: Image) -> tuple[int, int, str]:
    return (image.seed is None, image.seed or 0, image.id)


def make_pairs(session: Session, *, project: Project, images: Sequence[Image]) -> list[Pair]:
    """Create the eval and train pairs that new images call for; returns the new pairs.

    Eval: each new image meets one image of every other model version for the same prompt,
    the same seed when there is one (common random numbers make the comparison fairer).
    Train: within one model version, images of different seeds, adjacent seeds first, up to
    `train_pairs_per_prompt` per prompt and model version. Existing pairs, in either order,
    are never created again.
    """
    new_ids = {img.id for img in images if img.project_id == project.id and img.model_version_id}
    created: list[Pair] = []
    for prompt_id in sorted({img.prompt_id for img in images if img.id in new_ids}):
        created += _pairs_for_prompt(session, project=project, prompt_id=prompt_id, new_ids=new_ids)
    session.flush()
    return created


def _pairs_for_prompt(
    session: Session, *, project: Project, prompt_id: int, new_ids: set[str]
) -> list[Pair]:
    from app.generators.models import ModelVersion

    settings = project_settings(project)
    prompt = session.get(Prompt, prompt_id)
    if prompt is None or prompt.archived_at is not None:
        return []
    pool = session.scalars(
        select(Image)
        .join(ModelVersion, ModelVersion.id == Image.model_version_id)
        .where(
            Image.project_id == project.id,
            Image.prompt_id == prompt_id,
            ModelVersion.archived_at.is_(None),
        )
        .order_by(Image.seed, Image.id)
    )
    by_model: dict[int, list[Image]] = defaultdict(list)
    for img in pool:
        by_model[img.model_version_id].append(img)  # type: ignore[index]
    existing: dict[tuple[str, str], str] = {
        _canonical(a, b): purpose
        for a, b, purpose in session.execute(
            select(Pair.image_a_id, Pair.image_b_id, Pair.purpose).where(
                Pair.prompt_id == prompt_id
            )
        )
    }
    created: list[Pair] = []

    def add(x: Image, y: Image, purpose: str) -> None:
        a, b = _canonical(x.id, y.id)
        existing[(a, b)] = purpose
        pair = Pair(
            project_id=project.id,
            prompt_id=prompt_id,
            image_a_id=a,
            image_b_id=b,
            purpose=purpose,
            is_gold=False,
            votes_wanted=settings.votes_per_pair,
            vote_count=0,
        )
        session.add(pair)
        created.append(pair)

    images = [img for imgs in by_model.values() for img in imgs]
    for x in sorted((img for img in images if img.id in new_ids), key=_seed_key):
        for model_id, others in by_model.items():
            if model_id == x.model_version_id:
                continue
            y = min(others, key=lambda o, x=x: (o.seed != x.seed, *_seed_key(o)))
            if _canonical(x.id, y.id) not in existing:
                add(x, y, "eval")

    for imgs in by_model.values():
        if not any(img.id in new_ids for img in imgs):
            continue
        ids = {img.id for img in imgs}
        have = sum(
            1
            for (a, b), purpose in existing.items()
            if purpose == "train" and a in ids and b in ids
        )
        room = settings.train_pairs_per_prompt - have
        ordered = sorted(imgs, key=_seed_key)
        # Adjacent seeds first, then wider gaps: spreads the pairs over the images.
        combos = sorted(
            itertools.combinations(range(len(ordered)), 2), key=lambda ij: (ij[1] - ij[0], ij)
        )
        for i, j in combos:
            if room <= 0:
                break
            x, y = ordered[i], ordered[j]
            if x.seed == y.seed or (x.id not in new_ids and y.id not in new_ids):
                continue
            if _canonical(x.id, y.id) in existing:
                continue
            add(x, y, "train")
            room -= 1
    return created


def degrade_png(png: bytes, kind: str, *, seed: int = 0) -> tuple[bytes, dict[str, Any]]:
    """A visibly worse copy of an image (for gold pairs); returns (png, what was done)."""
    with PILImage.open(io.BytesIO(png)) as src:
        img = src.convert("RGB")
    if kind == "blur":
        radius = max(2.0, min(img.size) / 12)
        out = img.filter(ImageFilter.GaussianBlur(radius))
        info: dict[str, Any] = {"kind": "blur", "radius": round(radius, 2)}
    elif kind == "noise":
        sigma = 64.0
        pixels = np.asarray(img, dtype=np.float32)  # (H, W, 3)
        noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
        out = PILImage.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
        info = {"kind": "noise", "sigma": sigma, "seed": seed}
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {GOLD_KINDS}")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), info


def create_gold_pairs(
    session: Session,
    store: MediaStore,
    *,
    project: Project,
    images: Sequence[Image],
    kind: str = "blur",
    seed: int = 0,
) -> list[Pair]:
    """Store a degraded copy of each image and a gold pair whose expected winner is the original."""
    settings = project_settings(project)
    pairs: list[Pair] = []
    for n, image in enumerate(images):
        png, info = degrade_png(store.read(image.storage_key), kind, seed=seed + n)
        copy = store_image(
            session,
            store,
            project_id=project.id,
            prompt_id=image.prompt_id,
            png=png,
            model_version_id=None,
            seed=None,
            provenance={"gold_of": image.id, "degradation": info},
        )
        a, b = _canonical(image.id, copy.id)
        pair = Pair(
            project_id=project.id,
            prompt_id=image.prompt_id,
            image_a_id=a,
            image_b_id=b,
            purpose="eval",
            is_gold=True,
            gold_expected=image.id,
            votes_wanted=settings.votes_per_pair,
            vote_count=0,
        )
        session.add(pair)
        pairs.append(pair)
    session.flush()
    return pairs


def gold_wanted(gold_rate: float, regular_pairs: int) -> int:
    """Gold pairs a project should hold: `gold_rate` of its pairs, at least one when the rate is on.

    Each annotator meets a gold pair at most once, so the pool grows with the pairs it is mixed in.
    """
    if gold_rate <= 0 or regular_pairs <= 0:
        return 0
    return max(1, math.ceil(gold_rate * regular_pairs))


def gold_count(session: Session, *, project_id: int) -> int:
    stmt = select(func.count()).select_from(Pair).where(Pair.project_id == project_id, Pair.is_gold)
    return int(session.scalar(stmt) or 0)


def top_up_gold(session: Session, store: MediaStore, *, project: Project) -> list[Pair]:
    """Create the gold pairs the project's `gold_rate` calls for and it does not have yet.

    Sources are generated images that sit in a regular pair and are not already the original
    of a gold pair; degradations alternate over `GOLD_KINDS`, picked in a fixed order so that
    a re-run makes the same choices.
    """
    settings = project_settings(project)
    counts = dict(
        session.execute(
            select(Pair.is_gold, func.count()).where(Pair.project_id == project.id).group_by(
                Pair.is_gold
            )
        ).all()
    )
    have = int(counts.get(True, 0))
    missing = gold_wanted(settings.gold_rate, int(counts.get(False, 0))) - have
    if missing <= 0:
        return []
    used = set(
        session.scalars(
            select(Pair.gold_expected).where(Pair.project_id == project.id, Pair.is_gold)
        )
    )
    in_pairs = (
        select(Pair.id)
        .where(
            Pair.project_id == project.id,
            Pair.is_gold == false(),
            (Pair.image_a_id == Image.id) | (Pair.image_b_id == Image.id),
        )
        .exists()
    )
    sources = [
        img
        for img in session.scalars(
            select(Image)
            .where(Image.project_id == project.id, Image.model_version_id.is_not(None), in_pairs)
            .order_by(Image.created_at, Image.id)
        )
        if img.id not in used
    ]
    rng = random.Random(project.id * 1_000_003 + have)
    picked = rng.sample(sources, min(missing, len(sources)))
    made: list[Pair] = []
    for n, image in enumerate(picked):
        kind = GOLD_KINDS[(have + n) % len(GOLD_KINDS)]
        made += create_gold_pairs(
            session, store, project=project, images=[image], kind=kind, seed=have + n
        )
    return made


def mark_gold(session: Session, *, pair: Pair, expected: str) -> Pair:
    """Make an existing pair a gold pair whose right answer is `expected` (an image id or "tie")."""
    if expected not in (pair.image_a_id, pair.image_b_id, "tie"):
        raise ValueError(f"expected must be one of the pair's image ids or 'tie', not {expected!r}")
    pair.is_gold = True
    pair.gold_expected = expected
    session.flush()
    return pair


# --- serving pairs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """An open pair as the scheduler sees it."""

    pair_id: int
    prompt_id: int
    image_a_id: str
    image_b_id: str
    purpose: str
    is_gold: bool
    vote_count: int
    votes_wanted: int
    reserved: int  # live reservations held by other annotators

    @property
    def load(self) -> int:
        return self.vote_count + self.reserved


@dataclass(frozen=True)
class ServedPair:
    """A pair reserved for one annotator. `is_gold` is internal: never send it to annotators."""

    pair_id: int
    prompt: str
    left_image_id: str
    right_image_id: str
    expires_at: dt.datetime
    is_gold: bool


# (session, project, candidates, annotator) -> the candidates in the order to try them.
CandidateOrder = Callable[[Session, Project, list[Candidate], User], list[Candidate]]


def _spread(pair_id: int, annotator_id: int) -> int:
    # A per-annotator shuffle that is stable between requests: annotators asking at the same
    # moment try different pairs first, and a peek predicts what the next request will serve.
    return ((pair_id * 2654435761) ^ (annotator_id * 40503 + 0x9E3779B9)) % 4294967291


def fewest_votes_first(
    session: Session, project: Project, candidates: list[Candidate], annotator: User
) -> list[Candidate]:
    """The default order: fewest votes + live reservations first, ties spread per annotator."""
    return sorted(candidates, key=lambda c: (c.load, _spread(c.pair_id, annotator.id)))


_active_order: CandidateOrder | None = None


def set_active_order(order: CandidateOrder | None) -> None:
    """Install the order used for projects with `active_sampling` on (None restores the default,
    `app.pairs.active.active_order`).

    The candidates given to it are already capacity-checked; it may reorder or drop them, and
    is expected to honour the project's `random_floor` itself.
    """
    global _active_order
    _active_order = order


def order_for(project: Project) -> CandidateOrder:
    if project_settings(project).active_sampling:
        if _active_order is not None:
            return _active_order
        from app.pairs.active import active_order  # imports this module: import when needed

        return active_order
    return fewest_votes_first


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _live_others(annotator_id: int, now: dt.datetime, pair_id: Any = Pair.id) -> Any:
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
    if _is_postgres(session):
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
    if not _is_postgres(session):
        return load_pair_for_update(session, pair_id) is not None
    stmt = (
        select(Pair.id).where(Pair.id == pair_id).with_for_update(key_share=True, skip_locked=True)
    )
    return session.scalar(stmt) is not None


def hidden_pairs_filter(session: Session, project_id: int) -> list[Any]:
    """Where-clauses leaving out pairs of archived prompts and of archived models' images."""
    from app.generators.models import ModelVersion

    clauses: list[Any] = []
    prompts = list(
        session.scalars(
            select(Prompt.id).where(
                Prompt.project_id == project_id, Prompt.archived_at.is_not(None)
            )
        )
    )
    if prompts:
        clauses.append(Pair.prompt_id.not_in(prompts))
    models = list(
        session.scalars(
            select(ModelVersion.id).where(
                ModelVersion.project_id == project_id, ModelVersion.archived_at.is_not(None)
            )
        )
    )
    if models:
        clauses.append(
            ~select(Image.id)
            .where(
                Image.model_version_id.in_(models),
                or_(Image.id == Pair.image_a_id, Image.id == Pair.image_b_id),
            )
            .exists()
        )
    return clauses


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
    reserved = _live_others(annotator_id, now)
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
        Pair.project_id == project_id,
        Pair.is_gold == gold,
        ~voted,
        *hidden_pairs_filter(session, project_id),
    )
    if not gold:
        stmt = stmt.where(
            Pair.vote_count < Pair.votes_wanted, Pair.vote_count + reserved < Pair.votes_wanted
        )
    if exclude:
        stmt = stmt.where(Pair.id.not_in(list(exclude)))
    stmt = stmt.order_by(Pair.vote_count).limit(window)
    return [Candidate(*row) for row in session.execute(stmt)]


def _still_open(
    session: Session, cand: Candidate, annotator_id: int, now: dt.datetime
) -> str | None:
    """The prompt text if the pair is still open for this annotator, else None.

    Runs as a fresh statement after the lock, so it sees what others have just committed.
    """
    voted = (
        select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator_id).exists()
    )
    row = session.execute(
        select(
            Pair.vote_count, Pair.votes_wanted, _live_others(annotator_id, now), voted, Prompt.text
        )
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Pair.id == cand.pair_id)
    ).one_or_none()
    if row is None:
        return None
    vote_count, votes_wanted, reserved, already_voted, prompt = row
    if already_voted or not (cand.is_gold or vote_count + reserved < votes_wanted):
        return None
    return prompt


def _drop_reservations(session: Session, annotator_id: int, *, expired_before: dt.datetime) -> None:
    session.execute(
        delete(Reservation).where(
            Reservation.annotator_id == annotator_id, Reservation.expires_at <= expired_before
        ),
        execution_options={"synchronize_session": False},
    )


def _held(
    session: Session, *, project_id: int, annotator_id: int, now: dt.datetime
) -> tuple[ServedPair | None, list[int]]:
    """(the live reservation of this annotator in the project, pairs of its expired ones)."""
    rows = session.execute(
        select(
            Reservation.pair_id,
            Reservation.left_image_id,
            Reservation.expires_at,
            Pair.image_a_id,
            Pair.image_b_id,
            Pair.is_gold,
            Prompt.text,
        )
        .join(Pair, Pair.id == Reservation.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Reservation.annotator_id == annotator_id, Pair.project_id == project_id)
        .order_by(Reservation.created_at.desc())
    ).all()
    live = None
    expired = []
    for pair_id, left, expires_at, a, b, is_gold, prompt in rows:
        if expires_at <= now:
            expired.append(pair_id)
        elif live is None:
            live = ServedPair(pair_id, prompt, left, b if left == a else a, expires_at, is_gold)
    return live, expired


def _reserve(
    session: Session,
    cand: Candidate,
    prompt: str,
    *,
    annotator_id: int,
    minutes: float,
    now: dt.datetime,
    rng: random.Random,
) -> ServedPair:
    left = cand.image_a_id if rng.random() < 0.5 else cand.image_b_id
    right = cand.image_b_id if left == cand.image_a_id else cand.image_a_id
    expires_at = now + dt.timedelta(minutes=minutes)
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
    return ServedPair(cand.pair_id, prompt, left, right, expires_at, cand.is_gold)


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
        prompt = _still_open(session, cand, annotator_id, now)
        if prompt is not None:
            served = _reserve(
                session, cand, prompt, annotator_id=annotator_id, minutes=minutes, now=now, rng=rng
            )
            return served, locked
    return None, locked


def bound_lock_waits(session: Session) -> None:
    """Cap row-lock waits for the rest of this transaction (Postgres; SQLite has busy_timeout)."""
    if _is_postgres(session):
        session.execute(text(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}"))


def next_pair(
    session: Session,
    *,
    project: Project,
    annotator: User,
    now: dt.datetime | None = None,
    rng: random.Random | None = None,
    order: CandidateOrder | None = None,
    window: int = CANDIDATE_WINDOW,
) -> ServedPair | None:
    """Reserve and return the next pair for this annotator, or None when nothing is left.

    `order` reorders the capacity-checked candidates (default: `order_for(project)`, which is
    where active sampling plugs in); `rng` picks gold-or-not and the left side.
    """
    if project.archived_at is not None:
        return None  # an archived project is history: nothing more to vote on
    now = now or utcnow()
    rng = rng or random.Random()
    settings = project_settings(project)
    bound_lock_waits(session)
    if _is_postgres(session):
        # Serialises this annotator's own concurrent requests (one live reservation each).
        session.execute(
            select(User.id).where(User.id == annotator.id).with_for_update(key_share=True)
        )
    else:
        # The first write of the unit of work takes SQLite's write lock: schedulers queue here.
        _drop_reservations(session, annotator.id, expired_before=now)
    held, expired = _held(session, project_id=project.id, annotator_id=annotator.id, now=now)
    if held is not None:
        return held
    if expired:
        # Lapsed ones would collide with a new reservation of the same pair.
        _drop_reservations(session, annotator.id, expired_before=now)
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
            ordering = fewest_votes_first if gold else (order or order_for(project))
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


def peek_next(
    session: Session,
    *,
    project: Project,
    annotator: User,
    exclude: Sequence[int],
    now: dt.datetime | None = None,
) -> tuple[str, str] | None:
    """The images of the pair likely to come next, without reserving it (for preloading)."""
    now = now or utcnow()
    candidates = _candidates(
        session,
        project_id=project.id,
        annotator_id=annotator.id,
        gold=False,
        now=now,
        window=CANDIDATE_WINDOW,
        exclude=exclude,
    )
    if not candidates:
        return None
    first = order_for(project)(session, project, candidates, annotator)
    return (first[0].image_a_id, first[0].image_b_id) if first else None


def pairs_left(session: Session, *, project: Project, annotator: User) -> int:
    """Open non-gold pairs this annotator has not voted on (reservations of others ignored)."""
    voted = (
        select(Vote.id).where(Vote.pair_id == Pair.id, Vote.annotator_id == annotator.id).exists()
    )
    return int(
        session.scalar(
            select(func.count())
            .select_from(Pair)
            .where(
                Pair.project_id == project.id,
                Pair.is_gold == false(),
                Pair.vote_count < Pair.votes_wanted,
                ~voted,
                *hidden_pairs_filter(session, project.id),
            )
        )
        or 0
    )
