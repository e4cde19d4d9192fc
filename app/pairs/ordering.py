"""The order in which the scheduler tries open pairs (active sampling plugs in here).

Kept apart from the scheduler so that `app.pairs.active` can build on the default order and the
scheduler can take the active order as a parameter, without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.projects.models import Project
from app.users.models import User


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
    # Content hashes of the images, for signed image URLs (empty where not read).
    sha_a: str = ""
    sha_b: str = ""

    @property
    def load(self) -> int:
        return self.vote_count + self.reserved


# (session, project, candidates, annotator) -> the candidates in the order to try them.
CandidateOrder = Callable[[Session, Project, list[Candidate], User], list[Candidate]]


_SPREAD_MUL, _SPREAD_ANNOTATOR, _SPREAD_ADD, _SPREAD_MOD = 2654435761, 40503, 0x9E3779B9, 4294967291


def _spread(pair_id: int, annotator_id: int) -> int:
    # A per-annotator shuffle that is stable between requests: annotators asking at the same
    # moment try different pairs first, and a peek predicts what the next request will serve.
    mixed = (pair_id * _SPREAD_MUL) ^ (annotator_id * _SPREAD_ANNOTATOR + _SPREAD_ADD)
    return mixed % _SPREAD_MOD


def spread_sql(pair_id: str, annotator_id: str) -> str:
    """`_spread` as a Postgres expression over two integer expressions (`#` is XOR)."""
    return (
        f"((({pair_id})::bigint * {_SPREAD_MUL}) # (({annotator_id})::bigint * "
        f"{_SPREAD_ANNOTATOR} + {_SPREAD_ADD})) % {_SPREAD_MOD}"
    )


def fewest_votes_first(
    session: Session, project: Project, candidates: list[Candidate], annotator: User
) -> list[Candidate]:
    """The default order: fewest votes + live reservations first, ties spread per annotator."""
    return sorted(candidates, key=lambda c: (c.load, _spread(c.pair_id, annotator.id)))
