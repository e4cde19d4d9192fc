from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from worker.evaluation import (
    best_of_n_outcomes,
    class_flip_rate,
    cluster_bootstrap_ci,
    compare,
    oracle_best_of_n,
    paired_outcomes,
    share,
    win_rate_interval,
)


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


def test_paired_outcomes_count_only_changes_beyond_the_tolerance() -> None:
    child, parent = np.array([1.0, 0.52, 0.2, 0.5]), np.array([0.5, 0.5, 0.3, 0.5])
    assert paired_outcomes(child, parent, 0.05).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert paired_outcomes(child, parent, 0.0).tolist() == [1.0, 1.0, 0.0, 0.5]
    with pytest.raises(TypeError):
        paired_outcomes(child, parent)  # type: ignore[call-arg]  # no silent tolerance 0
    with pytest.raises(ValueError, match="tol"):
        paired_outcomes(child, parent, -0.1)
    with pytest.raises(ValueError):
        paired_outcomes(np.zeros(2), np.zeros(3), 0.0)
    with pytest.raises(ValueError):
        win_rate_interval(np.array([]))
    with pytest.raises(ValueError):
        win_rate_interval(np.array([0.3]))


def test_cluster_bootstrap_resamples_whole_prompts() -> None:
    # Identical prompts: every resample has the same mean.
    assert cluster_bootstrap_ci([1.0, 0.0, 1.0, 0.0], ["a", "a", "b", "b"]) == (0.5, 0.5)
    # Two prompts, one all wins, one all losses: resampled means are 0, ½, 1 with chances
    # ¼, ½, ¼, so the 2.5 % and 97.5 % quantiles are 0 and 1 — however many seeds each has.
    assert cluster_bootstrap_ci([1.0] * 5 + [0.0] * 5, [1] * 5 + [2] * 5) == (0.0, 1.0)
    # Seeds perfectly correlated within prompts: the interval is as wide as 20 independent
    # comparisons (half-width ≈ 1.96·√(¼ / 20) ≈ 0.219), not 200 (Wilson: ≈ 0.069).
    values = np.repeat([1.0, 0.0] * 10, 10)  # (200,)
    prompts = np.repeat(np.arange(20), 10)  # (200,)
    low, high = cluster_bootstrap_ci(values, prompts)
    assert (high - low) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 20), rel=0.15)
    wilson = win_rate_interval(values)
    assert (wilson.ci_high - wilson.ci_low) < 0.4 * (high - low)
    with pytest.raises(ValueError):
        cluster_bootstrap_ci([1.0, 0.0], [1])


def test_compare_matches_hand_computed_figures() -> None:
    # Prompt 1: a clear win, an imperceptible change; prompt 2: a clear loss, a small one.
    child = np.array([0.9, 0.5, 0.1, 0.3])
    parent = np.array([0.5, 0.5, 0.2, 0.31])
    result = compare(
        child,
        parent,
        ["p1", "p1", "p2", "p2"],
        0.05,
        parent_classes=["a", "a", "b", "b"],
        child_classes=["a", "c", "b", "b"],
    )
    assert (result.wins, result.ties, result.losses, result.n) == (1, 2, 1, 4)
    assert result.win_rate == 0.5  # (1 + 2 · ½) / 4
    assert result.prompts == 2 and result.tolerance == 0.05
    assert result.score_change == pytest.approx((0.4 + 0.0 - 0.1 - 0.01) / 4)
    assert result.class_flip_rate == 0.25
    assert result.ci_low <= result.win_rate <= result.ci_high
    # Prompt means 0.75 and 0.25: resamples give 0.25, 0.5, 0.75.
    assert (result.ci_low, result.ci_high) == (0.25, 0.75)
    # The score change skips comparisons without two real scores (a lost foreground).
    masked = compare(child, parent, [1, 1, 2, 2], 0.05, valid=np.array([1, 1, 0, 1], bool))
    assert masked.score_change == pytest.approx((0.4 + 0.0 - 0.01) / 3) and masked.valid == 3
    assert masked.class_flip_rate is None
    assert masked.as_dict()["n"] == 4
    with pytest.raises(ValueError):
        compare(child, parent, [1, 1, 2, 2], 0.05, parent_classes=["a"] * 4)


def test_class_flip_rate_counts_changed_classes() -> None:
    assert class_flip_rate(["left", "left", None], ["left", "right", "left"]) == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError):
        class_flip_rate(["a"], [])


def test_best_of_n_against_one_sample_matches_hand_computation() -> None:
    scores = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    # n = 4 of the 4 others: the pick is their maximum, which beats every baseline but 5.
    assert best_of_n_outcomes(scores, 4, 0.0).tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0]]
    # n = 2 of 4 others (6 subsets): baseline 3 loses only to {1, 2} (1/6) → 5/6; baseline 4
    # wins with any subset holding 5 (3/6) → ½; baseline 5 never wins.
    two = best_of_n_outcomes(scores, 2, 0.0)
    assert two[0] == pytest.approx([1.0, 1.0, 5 / 6, 0.5, 0.0])
    # Within tolerance: a tie, counted half.
    assert best_of_n_outcomes(np.array([[1.0, 1.0, 1.02]]), 2, 0.05).tolist() == [[0.5] * 3]
    with pytest.raises(ValueError, match="at least 5"):
        best_of_n_outcomes(np.zeros((2, 4)), 4, 0.0)


def test_best_of_n_equals_brute_force_over_subsets() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(3, 6)), 1)  # rounding makes ties
    tol = 0.15
    fast = best_of_n_outcomes(scores, 3, tol)
    for p, j in itertools.product(range(3), range(6)):
        others = [k for k in range(6) if k != j]
        outcomes = []
        for subset in itertools.combinations(others, 3):
            best = max(scores[p, k] for k in subset)
            diff = best - scores[p, j]
            outcomes.append(1.0 if diff > tol else 0.0 if diff < -tol else 0.5)
        assert fast[p, j] == pytest.approx(np.mean(outcomes))
    oracle = oracle_best_of_n(scores, 3, tol)
    assert oracle.value == pytest.approx(fast.mean()) and oracle.n == 18
    assert oracle.ci_low <= oracle.value <= oracle.ci_high


def test_share_with_clustered_interval() -> None:
    result = share([True, False, True, True], [1, 1, 2, 2])
    assert result.value == 0.75 and result.n == 4
    assert (result.ci_low, result.ci_high) == (0.5, 1.0)
