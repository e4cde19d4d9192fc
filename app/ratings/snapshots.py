"""Vote snapshots: the frozen set of votes a training job used, and the pairs they make.

A training job (reward model, DPO) first calls `create_snapshot`, then reads its data only
through `snapshot_pairs(snapshot_id)`. Votes cast later never change what the job trained on,
and evaluation can tell which votes a model has already seen.

How a pair's votes become one training pair (`snapshot_pairs`):
- votes of annotators the project's reliability rule excludes (app/ratings/reliability.py) are
  left out; the snapshot's params record the rule, who was excluded and why, and how many
  votes each annotator contributed;
- skips are never in a snapshot; "both bad" says nothing about which image is better and is
  dropped; gold pairs are excluded (they measure annotators, and their images are degraded
  copies);
- "left"/"right" are resolved to the image shown there (`Vote.left_image_id`), so the side an
  annotator saw does not matter;
- tie votes: policy "drop" ignores them (p = wins / (wins + losses)); policy "soft" counts each
  as half a win for both images (p = (wins + ties / 2) / votes), the Pick-a-Pic convention;
- the image with more (weighted) wins comes first and p is its share, so p ∈ [0.5, 1]; an exact
  split is a tie: dropped under "drop", kept with p = 0.5 under "soft".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, insert, literal, select
from sqlalchemy.orm import Session, aliased

from app.images.models import Image
from app.pairs.models import PURPOSES, Pair
from app.projects.models import Project, Prompt
from app.ratings.models import Snapshot, SnapshotVote
from app.ratings.reliability import project_exclusion
from app.votes.models import Vote
from app.votes.vocabulary import DECISIVE, PREFERENCES, Choice

TiePolicy = Literal["drop", "soft"]
TIE_POLICIES: tuple[str, ...] = ("drop", "soft")
# A snapshot keeps the preference votes; "both_bad" is kept (ratings count it as a tie).
SNAPSHOT_CHOICES = PREFERENCES


@dataclass(frozen=True)
class TrainingPair:
    """One pair's aggregated verdict, winner first; `p` = P(winner preferred) ∈ [0.5, 1]."""

    pair_id: int
    purpose: str  # eval | train
    prompt_id: int
    prompt: str
    split: str  # the prompt's split: train | val | test
    winner_image_id: str
    loser_image_id: str
    winner_storage_key: str
    loser_storage_key: str
    winner_model_id: int | None
    loser_model_id: int | None
    p: float
    votes: int  # votes counted into p (ties included only under "soft")

    @property
    def is_tie(self) -> bool:
        return self.p == 0.5


def usable_vote_filter(
    project_id: int, purposes: Sequence[str] = PURPOSES
) -> list[ColumnElement[bool]]:
    """WHERE clauses (over Vote joined with Pair) selecting the votes a snapshot freezes."""
    return [
        Vote.project_id == project_id,
        Pair.project_id == project_id,
        Pair.is_gold.is_(False),
        Pair.purpose.in_(list(purposes)),
        Vote.choice.in_(SNAPSHOT_CHOICES),
    ]


def usable_vote_counts(
    session: Session, project_id: int, purposes: Sequence[str] = PURPOSES
) -> tuple[int, int]:
    """(decisive votes, distinct prompts among them): left/right votes on non-gold pairs."""
    decisive, prompts = session.execute(
        select(func.count(Vote.id), func.count(func.distinct(Pair.prompt_id)))
        .join(Pair, Pair.id == Vote.pair_id)
        .where(*usable_vote_filter(project_id, purposes), Vote.choice.in_(DECISIVE))
    ).one()
    return int(decisive), int(prompts)


def create_snapshot(
    session: Session,
    *,
    project_id: int,
    job_id: int | None,
    purposes: Sequence[str] = ("train", "eval"),
) -> Snapshot:
    """Freeze the project's current non-gold, non-skip votes on pairs of these purposes."""
    unknown = sorted(set(purposes) - set(PURPOSES))
    if unknown or not purposes:
        raise ValueError(f"purposes must be a non-empty subset of {PURPOSES}, got {purposes!r}")
    project = session.get(Project, project_id)
    if project is None:
        raise ValueError(f"project {project_id} not found")
    exclusion = project_exclusion(session, project)
    snapshot = Snapshot(
        project_id=project_id,
        job_id=job_id,
        vote_count=0,
        params={"purposes": sorted(set(purposes))},
    )
    session.add(snapshot)
    session.flush()
    where = usable_vote_filter(project_id, purposes)
    if exclusion.excluded:
        where.append(Vote.annotator_id.not_in(exclusion.annotator_ids))
    # One INSERT ... SELECT: a snapshot of 100 k votes never travels through Python.
    chosen = select(literal(snapshot.id), Vote.id).join(Pair, Pair.id == Vote.pair_id).where(*where)
    session.execute(
        insert(SnapshotVote).from_select(["snapshot_id", "vote_id"], chosen),
        execution_options={"synchronize_session": False},
    )
    by_annotator = dict(
        session.execute(
            select(Vote.annotator_id, func.count())
            .join(SnapshotVote, SnapshotVote.vote_id == Vote.id)
            .where(SnapshotVote.snapshot_id == snapshot.id)
            .group_by(Vote.annotator_id)
        ).all()
    )
    snapshot.vote_count = int(sum(by_annotator.values()))
    snapshot.params = {**snapshot.params, "reliability": exclusion.record(by_annotator)}
    session.flush()
    return snapshot


def snapshot_for_job(session: Session, job_id: int) -> Snapshot | None:
    """The snapshot a job made on an earlier attempt, so a retry trains on the same votes."""
    return session.scalar(
        select(Snapshot).where(Snapshot.job_id == job_id).order_by(Snapshot.id).limit(1)
    )


def aggregate_verdict(
    wins_a: int, wins_b: int, ties: int, tie_policy: TiePolicy
) -> tuple[bool, float, int] | None:
    """(a_is_winner, p, votes counted) for one pair's votes, or None when it yields no pair.

    None: no decisive information (only ties under "drop", or nothing at all), or an exact
    split under "drop". Under "soft" an exact split is (True, 0.5, n): a tie, image a first.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if tie_policy == "drop":
        n = wins_a + wins_b
        if n == 0 or wins_a == wins_b:
            return None
        share_a = wins_a / n
    else:
        n = wins_a + wins_b + ties
        if n == 0:
            return None
        share_a = (wins_a + 0.5 * ties) / n
    if share_a >= 0.5:
        return True, share_a, n
    return False, 1.0 - share_a, n


def snapshot_pairs(
    session: Session,
    snapshot_id: int,
    *,
    tie_policy: TiePolicy = "drop",
    split: str | Sequence[str] | None = None,
    purposes: Sequence[str] | None = None,
) -> list[TrainingPair]:
    """The snapshot's votes aggregated per pair, winner first (rules in the module docstring).

    `split` keeps pairs whose prompt is in that split (or splits); `purposes` keeps eval or
    train pairs only. Pairs come in pair-id order.
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    image_a = aliased(Image)
    image_b = aliased(Image)
    stmt = (
        select(
            Pair.id,
            Pair.purpose,
            Pair.prompt_id,
            Prompt.text,
            Prompt.split,
            Pair.image_a_id,
            Pair.image_b_id,
            image_a.storage_key,
            image_b.storage_key,
            image_a.model_version_id,
            image_b.model_version_id,
            Vote.choice,
            Vote.left_image_id,
        )
        .select_from(SnapshotVote)
        .join(Vote, Vote.id == SnapshotVote.vote_id)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(image_a, image_a.id == Pair.image_a_id)
        .join(image_b, image_b.id == Pair.image_b_id)
        # A pair marked gold after the snapshot was taken is excluded all the same.
        .where(SnapshotVote.snapshot_id == snapshot_id, Pair.is_gold.is_(False))
        .order_by(Pair.id, Vote.id)
    )
    if split is not None:
        stmt = stmt.where(Prompt.split.in_([split] if isinstance(split, str) else list(split)))
    if purposes is not None:
        stmt = stmt.where(Pair.purpose.in_(list(purposes)))

    pairs: list[TrainingPair] = []
    current: tuple[Any, ...] | None = None
    counts = [0, 0, 0]  # wins of image a, wins of image b, ties

    def flush() -> None:
        if current is None:
            return
        verdict = aggregate_verdict(counts[0], counts[1], counts[2], tie_policy)
        if verdict is None:
            return
        a_wins, p, n = verdict
        (pair_id, purpose, prompt_id, text, prompt_split, a, b, key_a, key_b, model_a, model_b) = (
            current
        )
        winner = (a, key_a, model_a)
        loser = (b, key_b, model_b)
        if not a_wins:
            winner, loser = loser, winner
        pairs.append(
            TrainingPair(
                pair_id=pair_id,
                purpose=purpose,
                prompt_id=prompt_id,
                prompt=text,
                split=prompt_split,
                winner_image_id=winner[0],
                loser_image_id=loser[0],
                winner_storage_key=winner[1],
                loser_storage_key=loser[1],
                winner_model_id=winner[2],
                loser_model_id=loser[2],
                p=p,
                votes=n,
            )
        )

    for row in session.execute(stmt):
        pair_fields = tuple(row[:11])
        if current is None or pair_fields[0] != current[0]:
            flush()
            current, counts = pair_fields, [0, 0, 0]
        choice, left_id = row[11], row[12]
        a_id, b_id = pair_fields[5], pair_fields[6]
        if choice == Choice.TIE:
            counts[2] += 1
        elif choice in DECISIVE:
            right_id = b_id if left_id == a_id else a_id
            picked = left_id if choice == Choice.LEFT else right_id
            counts[0 if picked == a_id else 1] += 1
        # both_bad: no preference between the two images.
    flush()
    return pairs
