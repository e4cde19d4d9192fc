"""The pairs package's public names, for callers that import them from one place.

Defined in `app.pairs.building` (which images get compared), `app.pairs.gold` (gold pairs),
`app.pairs.ordering` (the candidates' order) and `app.pairs.scheduler` (which pair an annotator
sees next).
"""

from __future__ import annotations

from app.pairs.building import canonical, make_pairs
from app.pairs.gold import (
    GOLD_KINDS,
    create_gold_pairs,
    degrade_png,
    gold_count,
    gold_wanted,
    mark_gold,
    top_up_gold,
)
from app.pairs.ordering import Candidate, CandidateOrder, fewest_votes_first
from app.pairs.scheduler import (
    CANDIDATE_WINDOW,
    LOCK_TIMEOUT_MS,
    LOOKS,
    MAX_TRIES,
    PairsBusy,
    ServedPair,
    bound_lock_waits,
    live_reservations_by_others,
    load_pair_for_update,
    next_pair,
    order_for,
    pairs_left,
    pairs_left_count,
    peek_next,
)

__all__ = [
    "CANDIDATE_WINDOW",
    "GOLD_KINDS",
    "LOCK_TIMEOUT_MS",
    "LOOKS",
    "MAX_TRIES",
    "Candidate",
    "CandidateOrder",
    "PairsBusy",
    "ServedPair",
    "bound_lock_waits",
    "canonical",
    "create_gold_pairs",
    "degrade_png",
    "fewest_votes_first",
    "gold_count",
    "gold_wanted",
    "live_reservations_by_others",
    "load_pair_for_update",
    "make_pairs",
    "mark_gold",
    "next_pair",
    "order_for",
    "pairs_left",
    "pairs_left_count",
    "peek_next",
    "top_up_gold",
]
