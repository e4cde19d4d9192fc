from __future__ import annotations

import math

import numpy as np
import pytest

from worker.evaluation import paired_outcomes, win_rate_interval


def test_wilson_interval_matches_hand_computation() -> None:
    # 8 wins of 10: centre = (0.8 + z²/20) / (1 + z²/10),
    # half = z·sqrt(0.016 + z²/400) / (1 + z²/10)
    z = 1.959963984540054
    result = win_rate_interval(np.array([1.0] * 8 + [0.0] * 2))
    denom = 1 + z * z / 10
    centre = (0.8 + z * z / 20) / denom
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / denom
    assert result.rate == 0.8
    assert result.ci_low == pytest.approx(centre - half, abs=1e-12)
    assert result.ci_high == pytest.approx(centre + half, abs=1e-12)
    assert (result.wins, result.ties, result.losses, result.n) == (8, 0, 2, 10)
    assert result.ci_low == pytest.approx(0.4902, abs=1e-4)


def test_ties_count_half_and_bounds_stay_in_range() -> None:
    result = win_rate_interval(np.array([1.0, 0.5, 0.5, 0.0]))
    assert result.rate == 0.5 and result.ties == 2
    perfect = win_rate_interval(np.ones(50))
    assert perfect.ci_high == 1.0 and 0.9 < perfect.ci_low < 1.0


def test_paired_outcomes() -> None:
    out = paired_outcomes(np.array([1.0, 0.2, 0.5]), np.array([0.5, 0.3, 0.5]))
    assert out.tolist() == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        paired_outcomes(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError):
        win_rate_interval(np.array([]))
    with pytest.raises(ValueError):
        win_rate_interval(np.array([0.3]))
