"""Fit → Elo-like scale → intervals → ranked rows: the one leaderboard builder behind the
`prefloop rate` command, the `fit_ratings` job and the FastChat importer."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app.ratings.bradley_terry import (
    DEFAULT_PRIOR,
    BTFit,
    DisconnectedComparisonsWarning,
    PairCounts,
    TieMode,
    bootstrap_bradley_terry,
    fit_bradley_terry,
    ranks_from_intervals,
)
from app.ratings.scale import elo_scale


@dataclass(frozen=True)
class LeaderboardRow:
    """One model on the Elo-like scale (rating = 400·s/ln 10 + 1000)."""

    index: int  # the model's item index in the counts
    model: str
    score: float  # the Bradley–Terry logit score
    rating: float
    ci_low: float | None  # None without bootstrap
    ci_high: float | None
    rank: int
    votes: int  # comparisons the model took part in (ties included)

    def public(self) -> dict[str, object]:
        """The fields `prefloop rate` writes."""
        return {
            "model": self.model,
            "rating": self.rating,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "rank": self.rank,
        }


@dataclass(frozen=True)
class Leaderboard:
    rows: list[LeaderboardRow]  # best rating first (ties in rating: by name)
    fit: BTFit
    level: float | None  # the bootstrap intervals' coverage; None without bootstrap
    warnings: list[str]  # e.g. comparisons that split into disconnected groups


def leaderboard(
    counts: PairCounts,
    names: Sequence[str],
    *,
    ties: TieMode = "half",
    n_bootstrap: int = 1000,
    prior: float = DEFAULT_PRIOR,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> Leaderboard:
    """Rate the n items of `counts` (named by `names`, (n,)).

    With n_bootstrap ≥ 1 the interval is the 2.5–97.5 % bootstrap percentile range and the rank
    counts the models whose interval lies wholly above; with 0 there is no interval and the
    rank counts the models with a higher point rating.
    """
    n = len(names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DisconnectedComparisonsWarning)
        if n_bootstrap > 0:
            boot = bootstrap_bradley_terry(
                counts,
                n_bootstrap,
                ties=ties,
                prior=prior,
                seed=seed,
                on_progress=on_progress,
                item_names=list(names),
            )
            fit, level, ranks = boot.fit, boot.level, boot.ranks
            lows: list[float | None] = [float(x) for x in elo_scale(boot.lower)]
            highs: list[float | None] = [float(x) for x in elo_scale(boot.upper)]
        else:
            fit = fit_bradley_terry(counts, ties=ties, prior=prior, item_names=list(names))
            level, ranks = None, ranks_from_intervals(fit.scores, fit.scores)
            lows = highs = [None] * n
    ratings = elo_scale(fit.scores)  # (n,)
    votes = np.bincount(
        np.concatenate([counts.item_i, counts.item_j]),
        weights=np.concatenate([counts.cells().sum(1)] * 2),
        minlength=n,
    )  # (n,)
    rows = [
        LeaderboardRow(
            index=k,
            model=name,
            score=float(fit.scores[k]),
            rating=float(ratings[k]),
            ci_low=lows[k],
            ci_high=highs[k],
            rank=int(ranks[k]),
            votes=int(votes[k]),
        )
        for k, name in enumerate(names)
    ]
    rows.sort(key=lambda row: (-row.rating, row.model))
    return Leaderboard(rows, fit, level, [str(w.message) for w in caught])
