"""The rating scale, defined once: Bradley–Terry logit scores shown Elo-like.

rating = 400 · s / ln 10 + 1000, so a 400-point gap is 10:1 odds and, with centred scores,
1000 is the average model.
"""

from __future__ import annotations

import math

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)  # rating points per logit
ELO_OFFSET = 1000.0  # the rating of a centred score of 0: the average model


def elo_scale(scores: np.ndarray) -> np.ndarray:
    """Logit-scale scores (any shape) → Elo-like ratings (same shape)."""
    return ELO_SCALE * np.asarray(scores, dtype=np.float64) + ELO_OFFSET


def elo_to_logit_gap(rating_a: float, rating_b: float) -> float:
    """The logit difference s_a − s_b between two ratings (the offset cancels)."""
    return (rating_a - rating_b) / ELO_SCALE
