"""Bradley–Terry / Davidson fits, bootstrap intervals and annotator-quality figures."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import optimize, stats

import app.ratings.bradley_terry as bt
from app.ratings.bradley_terry import (
    OUTCOME_A,
    OUTCOME_B,
    OUTCOME_TIE,
    DisconnectedComparisonsWarning,
    aggregate_comparisons,
    bootstrap_bradley_terry,
    fit_bradley_terry,
    log_likelihood,
    ranks_from_intervals,
)
from app.ratings.quality import agreement, annotator_quality, position_bias_test
from app.ratings.scale import elo_scale

TINY_PRIOR = 1e-10


def simulate(
    rng: np.random.Generator, scores: np.ndarray, n_votes: int, nu: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Votes between uniformly drawn distinct items under Davidson's model (ν = 0: plain BT)."""
    n = scores.shape[0]
    a = rng.integers(0, n, n_votes)
    b = (a + rng.integers(1, n, n_votes)) % n
    half = 0.5 * (scores[a] - scores[b])
    z = np.exp(half) + np.exp(-half) + nu
    u = rng.random(n_votes)
    p_a = np.exp(half) / z
    p_b = np.exp(-half) / z
    outcome = np.where(u < p_a, OUTCOME_A, np.where(u < p_a + p_b, OUTCOME_B, OUTCOME_TIE))
    return a, b, outcome


def counts_of(pairs: list[tuple[int, int, int]], n_items: int | None = None) -> bt.PairCounts:
    a, b, y = (np.array(col) for col in zip(*pairs, strict=True))
    return aggregate_comparisons(a, b, y, n_items)


# ---------------------------------------------------------------- aggregation


def test_aggregation_merges_duplicates_and_orientation() -> None:
    counts = counts_of(
        [(0, 1, OUTCOME_A), (1, 0, OUTCOME_A), (1, 0, OUTCOME_TIE), (2, 1, OUTCOME_B), (0, 1, 0)]
    )
    assert counts.n_items == 3
    assert counts.item_i.tolist() == [0, 1]
    assert counts.item_j.tolist() == [1, 2]
    # pair (0, 1): item 0 won twice, item 1 once (as model_a), one tie
    assert counts.wins_i.tolist() == [2.0, 1.0]
    assert counts.wins_j.tolist() == [1.0, 0.0]
    assert counts.ties.tolist() == [1.0, 0.0]
    assert counts.n_comparisons == 5


def test_aggregation_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="itself"):
        aggregate_comparisons(np.array([1]), np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="outcome"):
        aggregate_comparisons(np.array([0]), np.array([1]), np.array([3]))
    with pytest.raises(ValueError, match="prior"):
        fit_bradley_terry(counts_of([(0, 1, 0)]), prior=0.0)
    with pytest.raises(ValueError, match="ties"):
        fit_bradley_terry(counts_of([(0, 1, 0)]), ties="thirds")  # type: ignore[arg-type]


# ---------------------------------------------------------------- hand-computed fits

# Item 0 vs item 1: 3 wins, 1 loss, 2 ties.
TWO_ITEMS = [(0, 1, OUTCOME_A)] * 3 + [(0, 1, OUTCOME_B)] + [(0, 1, OUTCOME_TIE)] * 2


def test_two_items_ties_as_half_wins() -> None:
    # 4 vs 2 weighted wins: σ(s0 − s1) = 4/6, so s0 − s1 = ln 2, centred ±½ ln 2.
    fit = fit_bradley_terry(counts_of(TWO_ITEMS), ties="half", prior=TINY_PRIOR)
    assert fit.converged
    assert fit.tie_param is None
    np.testing.assert_allclose(fit.scores, [0.5 * math.log(2), -0.5 * math.log(2)], atol=1e-7)
    expected_ll = 4 * math.log(2 / 3) + 2 * math.log(1 / 3)
    assert fit.log_likelihood == pytest.approx(expected_ll, abs=1e-9)


def test_two_items_davidson() -> None:
    # Saturated: P(0) = 3/6, P(1) = 1/6, P(tie) = 2/6. P(0)/P(1) = e^{s0 − s1} = 3, and
    # ν = P(tie)/sqrt(P(0)·P(1)) = (1/3)/sqrt(1/12) = 2/√3.
    fit = fit_bradley_terry(counts_of(TWO_ITEMS), ties="davidson", prior=TINY_PRIOR)
    assert fit.converged
    np.testing.assert_allclose(fit.scores, [0.5 * math.log(3), -0.5 * math.log(3)], atol=1e-6)
    assert fit.tie_param == pytest.approx(2 / math.sqrt(3), rel=1e-6)
    expected_ll = 3 * math.log(1 / 2) + math.log(1 / 6) + 2 * math.log(1 / 3)
    assert fit.log_likelihood == pytest.approx(expected_ll, abs=1e-9)


def test_one_sided_record_is_finite_through_the_prior() -> None:
    # 4 wins, no loss. Centred s0 = s, s1 = −s: maximise 4·log σ(2s) − λs², stationary at
    # 4·σ(−2s) = λs. For s = ½ ln 3, σ(−2s) = 1/4, so λ = 1/s = 2/ln 3.
    counts = counts_of([(0, 1, OUTCOME_A)] * 4)
    fit = fit_bradley_terry(counts, prior=2 / math.log(3))
    np.testing.assert_allclose(fit.scores, [0.5 * math.log(3), -0.5 * math.log(3)], atol=1e-9)
    # A weak prior still gives a finite score, at the root of 4σ(−2s) = λs.
    weak = fit_bradley_terry(counts, prior=1e-3)
    s = weak.scores[0]
    assert np.all(np.isfinite(weak.scores)) and 3 < s < 20
    assert 4 / (1 + math.exp(2 * s)) == pytest.approx(1e-3 * s, rel=1e-8)


def test_disconnected_graph_warns_and_stays_finite() -> None:
    counts = counts_of([(0, 1, OUTCOME_A), (0, 1, OUTCOME_A), (2, 3, OUTCOME_A), (3, 2, 2)])
    with pytest.warns(
        DisconnectedComparisonsWarning, match=r"2 connected components: \{a, b\} \{c, d\}"
    ):
        fit = fit_bradley_terry(counts, item_names=["a", "b", "c", "d"])
    assert fit.components == [[0, 1], [2, 3]]
    assert np.all(np.isfinite(fit.scores))
    # Each component is centred on its own: λ·Σ_component s = 0 at the optimum.
    assert fit.scores[:2].sum() == pytest.approx(0, abs=1e-9)
    assert fit.scores[2:].sum() == pytest.approx(0, abs=1e-9)
    assert fit.scores[0] > fit.scores[1] and fit.scores[2] > fit.scores[3]


def test_connected_graph_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_bradley_terry(counts_of([(0, 1, 0), (1, 2, 0), (2, 0, 2)]))
    assert fit.components == [[0, 1, 2]]


def test_davidson_without_ties_is_plain_bt() -> None:
    counts = counts_of([(0, 1, 0), (0, 1, 0), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    half = fit_bradley_terry(counts)
    davidson = fit_bradley_terry(counts, ties="davidson")
    assert davidson.tie_param == 0.0
    np.testing.assert_allclose(davidson.scores, half.scores, atol=1e-9)


# ---------------------------------------------------------------- against an independent fit


def independent_negative_objective(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, y: np.ndarray, prior: float, ties: str
) -> tuple[float, np.ndarray]:
    """The same penalised objective written per raw vote, with its gradient."""
    n = int(max(a.max(), b.max()) + 1)
    s = theta[:n]
    d = s[a] - s[b]
    if ties == "half":
        target = np.where(y == OUTCOME_A, 1.0, np.where(y == OUTCOME_B, 0.0, 0.5))
        p = 1 / (1 + np.exp(-d))
        ll = np.sum(target * np.log(p) + (1 - target) * np.log(1 - p))
        r = target - p
        grad = np.bincount(a, r, n) - np.bincount(b, r, n) - prior * s
        return -(ll - 0.5 * prior * s @ s), -grad
    eta = theta[n]
    z = np.exp(d / 2) + np.exp(-d / 2) + np.exp(eta)
    numerator = np.where(y == OUTCOME_A, d / 2, np.where(y == OUTCOME_B, -d / 2, eta))
    ll = np.sum(numerator - np.log(z))
    dz_dd = (np.exp(d / 2) - np.exp(-d / 2)) / (2 * z)
    r = np.where(y == OUTCOME_A, 0.5, np.where(y == OUTCOME_B, -0.5, 0.0)) - dz_dd
    grad_s = np.bincount(a, r, n) - np.bincount(b, r, n) - prior * s
    grad_eta = np.sum((y == OUTCOME_TIE) - np.exp(eta) / z)
    return -(ll - 0.5 * prior * s @ s), -np.append(grad_s, grad_eta)


@pytest.mark.parametrize("ties", ["half", "davidson"])
def test_map_optimum_matches_lbfgs(ties: str) -> None:
    rng = np.random.default_rng(3)
    true = rng.normal(size=8)
    a, b, y = simulate(rng, true, 400, nu=0.6)
    prior = 0.05
    fit = fit_bradley_terry(aggregate_comparisons(a, b, y, 8), ties=ties, prior=prior)
    theta0 = np.zeros(8 if ties == "half" else 9)
    ref = optimize.minimize(
        independent_negative_objective,
        theta0,
        args=(a, b, y, prior, ties),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 10_000},
    )
    assert fit.converged
    assert fit.objective == pytest.approx(-ref.fun, abs=1e-6)
    assert fit.objective >= -ref.fun - 1e-9  # Newton is at least as good
    np.testing.assert_allclose(fit.scores, ref.x[:8], atol=1e-4)
    if ties == "davidson":
        assert fit.tie_param == pytest.approx(math.exp(ref.x[8]), rel=1e-4)
    assert log_likelihood(
        aggregate_comparisons(a, b, y, 8), fit.scores, ties=ties, tie_param=fit.tie_param
    ) == pytest.approx(fit.log_likelihood, abs=1e-9)


@pytest.mark.parametrize("ties", ["half", "davidson"])
def test_sparse_conjugate_gradient_path_matches_dense(
    ties: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(4)
    counts = aggregate_comparisons(*simulate(rng, rng.normal(size=30), 3000, nu=0.5), 30)
    dense = fit_bradley_terry(counts, ties=ties)
    monkeypatch.setattr(bt, "DENSE_MAX_ITEMS", 0)
    sparse = fit_bradley_terry(counts, ties=ties)
    assert sparse.converged
    np.testing.assert_allclose(sparse.scores, dense.scores, atol=1e-7)
    assert sparse.objective == pytest.approx(dense.objective, abs=1e-8)
    # Batched conjugate gradients (several resamples at once) agree with batched dense solves.
    sparse_boot = bootstrap_bradley_terry(counts, 6, ties=ties, seed=2)
    monkeypatch.setattr(bt, "DENSE_MAX_ITEMS", 300)
    dense_boot = bootstrap_bradley_terry(counts, 6, ties=ties, seed=2)
    np.testing.assert_allclose(sparse_boot.samples, dense_boot.samples, atol=1e-7)
    if ties == "davidson":
        np.testing.assert_allclose(sparse_boot.tie_params, dense_boot.tie_params, rtol=1e-7)


# ---------------------------------------------------------------- recovery on synthetic data


def test_recovers_planted_ranking() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=50)
    counts = aggregate_comparisons(*simulate(rng, true, 100_000), 50)
    fit = fit_bradley_terry(counts)
    assert fit.converged and fit.iterations < 20
    assert stats.spearmanr(fit.scores, true).statistic >= 0.99
    assert abs(fit.scores.mean()) < 1e-9


def test_davidson_recovers_planted_tie_parameter() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=50)
    counts = aggregate_comparisons(*simulate(rng, true, 100_000, nu=0.8), 50)
    fit = fit_bradley_terry(counts, ties="davidson")
    assert fit.tie_param == pytest.approx(0.8, rel=0.1)
    assert stats.spearmanr(fit.scores, true).statistic >= 0.99


# ---------------------------------------------------------------- bootstrap, ranks, scale


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(5)
    covered = []
    for _ in range(3):
        true = rng.normal(size=40)
        counts = aggregate_comparisons(*simulate(rng, true, 4000), 40)
        boot = bootstrap_bradley_terry(counts, 300, seed=rng)
        centred = true - true.mean()
        covered.extend((boot.lower <= centred) & (centred <= boot.upper))
    rate = np.mean(covered)  # 120 intervals at 95 %: sd of the rate ≈ 0.02
    assert 0.88 <= rate <= 0.995


def test_bootstrap_shapes_progress_and_seed() -> None:
    rng = np.random.default_rng(6)
    counts = aggregate_comparisons(*simulate(rng, rng.normal(size=6), 500, nu=0.5), 6)
    seen: list[int] = []
    boot = bootstrap_bradley_terry(
        counts, 25, ties="davidson", seed=7, chunk_size=10, on_progress=seen.append
    )
    again = bootstrap_bradley_terry(counts, 25, ties="davidson", seed=7)
    assert seen == [10, 20, 25]
    assert boot.samples.shape == (25, 6)
    assert boot.tie_params is not None and boot.tie_params.shape == (25,)
    assert boot.converged_fraction == 1.0
    np.testing.assert_allclose(boot.samples, again.samples, atol=1e-9)
    assert np.all(boot.lower <= boot.fit.scores) and np.all(boot.fit.scores <= boot.upper)
    np.testing.assert_allclose(boot.lower, np.percentile(boot.samples, 2.5, axis=0))


def test_bootstrap_resamples_match_a_row_resampling_refit() -> None:
    # One resample by hand: draw votes with replacement, refit; the batched fit of the same
    # multinomial cell counts gives the same scores.
    rng = np.random.default_rng(8)
    a, b, y = simulate(rng, rng.normal(size=5), 300)
    pick = rng.integers(0, 300, 300)
    direct = fit_bradley_terry(aggregate_comparisons(a[pick], b[pick], y[pick], 5))
    cells = aggregate_comparisons(a, b, y, 5)
    resampled = aggregate_comparisons(a[pick], b[pick], y[pick], 5)
    graph = bt._Graph(cells.item_i, cells.item_j, 5)
    by_pair = {
        (i, j): (wi, wj, t)
        for i, j, wi, wj, t in zip(
            resampled.item_i,
            resampled.item_j,
            resampled.wins_i,
            resampled.wins_j,
            resampled.ties,
            strict=True,
        )
    }
    batch_cells = np.array(
        [[by_pair.get((i, j), (0, 0, 0)) for i, j in zip(cells.item_i, cells.item_j, strict=True)]]
    )
    batch = bt._fit_batch(graph, batch_cells, "half", bt.DEFAULT_PRIOR, 1e-12, 100)
    np.testing.assert_allclose(batch.scores[0], direct.scores, atol=1e-7)


def test_ranks_from_intervals_hand_example() -> None:
    lower = np.array([10.0, 5.0, 0.0, -1.0])
    upper = np.array([12.0, 9.0, 6.0, 4.0])
    # item 0: nobody's lower bound above 12; item 1: 10 > 9; item 2: 10 > 6 (5 is not);
    # item 3: 10 and 5 > 4.
    assert ranks_from_intervals(lower, upper).tolist() == [1, 2, 2, 3]


def test_elo_scale() -> None:
    np.testing.assert_allclose(
        elo_scale(np.array([0.0, math.log(10), -math.log(10)])), [1000, 1400, 600]
    )
    # 400 points apart means odds of 10 to 1.
    gap = (elo_scale(np.array([1.3])) - elo_scale(np.array([1.3 - math.log(10)])))[0]
    assert gap == pytest.approx(400)


# ---------------------------------------------------------------- agreement and annotators


def test_krippendorff_alpha_hand_example() -> None:
    # Units: (L, L), (L, R), (R, R), (L, L, T).
    # Coincidences: LL 2 + 1, LR = RL = 1, RR 2, LT = TL = 1 (the 3-vote unit weighs 1/2).
    # n_L = 5, n_R = 3, n_T = 1, n = 9; Σ_{c≠k} o = 4; Σ_{c≠k} n_c n_k = 2(15 + 5 + 3) = 46.
    # α = 1 − (n − 1)·4/46 = 1 − 32/46 = 7/23. Agreeing vote pairs: 1 + 0 + 1 + 1 of 6.
    unit = np.array([1, 1, 2, 2, 3, 3, 4, 4, 4])
    label = np.array(["L", "L", "L", "R", "R", "R", "L", "L", "T"])
    result = agreement(unit, label)
    assert result.alpha == pytest.approx(7 / 23)
    assert result.rate == pytest.approx(0.5)
    assert result.n_units == 4 and result.n_votes == 9


def test_agreement_ignores_single_vote_units_and_perfect_agreement() -> None:
    perfect = agreement(np.array([1, 1, 2, 2, 3]), np.array(["L", "L", "R", "R", "L"]))
    assert perfect.alpha == pytest.approx(1.0)
    assert perfect.rate == 1.0 and perfect.n_units == 2
    constant = agreement(np.array([1, 1]), np.array(["L", "L"]))
    assert math.isnan(constant.alpha) and constant.rate == 1.0


def test_position_bias_binomial_test() -> None:
    # 9 left of 10: two-sided p = 2·(C(10,9) + C(10,10))/2^10 = 22/1024.
    assert position_bias_test(9, 1) == pytest.approx(22 / 1024)
    assert position_bias_test(5, 5) == pytest.approx(1.0)
    assert position_bias_test(0, 0) == 1.0


def planted_annotators(rng: np.random.Generator) -> dict[str, list]:
    """Eight honest annotators (BT votes), one who always picks left, one who votes at random."""
    true = rng.normal(scale=1.5, size=20)
    votes: dict[str, list] = {"annotator": [], "pair": [], "left": [], "right": [], "choice": []}
    for k in range(10):
        left = rng.integers(0, 20, 500)
        right = (left + rng.integers(1, 20, 500)) % 20
        p_left = 1 / (1 + np.exp(-(true[left] - true[right])))
        if k == 8:
            choice = np.full(500, "left")
        elif k == 9:
            choice = np.where(rng.random(500) < 0.5, "left", "right")
        else:
            choice = np.where(rng.random(500) < p_left, "left", "right")
        votes["annotator"] += [f"ann{k}"] * 500
        votes["pair"] += [f"{min(x, y)}-{max(x, y)}" for x, y in zip(left, right, strict=True)]
        votes["left"] += left.tolist()
        votes["right"] += right.tolist()
        votes["choice"] += choice.tolist()
    return votes


def test_noisy_bt_finds_always_left_and_random_annotators() -> None:
    votes = planted_annotators(np.random.default_rng(11))
    quality = annotator_quality(
        votes["annotator"], votes["pair"], votes["left"], votes["right"], votes["choice"]
    )
    by_name = {q.annotator: q for q in quality}
    assert [q.annotator for q in quality] == [f"ann{k}" for k in range(10)]
    lefty, coin = by_name["ann8"], by_name["ann9"]
    assert "position_bias" in lefty.flags and "low_skill" in lefty.flags
    assert lefty.left_rate == 1.0 and lefty.left_habit > 0.95 and lefty.skill < 0.1
    assert "low_skill" in coin.flags and "random" in coin.flags
    assert "position_bias" not in coin.flags
    assert coin.skill < 0.3
    for k in range(8):
        honest = by_name[f"ann{k}"]
        assert honest.flags == (), honest
        assert honest.skill > 0.6
        assert honest.agreement > coin.agreement


def test_annotator_quality_gold_latency_and_orientation() -> None:
    # Annotator "fast" answers gold pairs wrongly and in 300 ms; "careful" is right and slow.
    # Pair p1 is shown both ways round; "careful" and "other" pick the same image there.
    annotator = ["careful"] * 6 + ["fast"] * 6 + ["other"]
    pair = ["p1"] + [f"g{k}" for k in range(5)] + ["p1"] + [f"g{k}" for k in range(5)] + ["p1"]
    left = ["x"] + ["a"] * 5 + ["x"] + ["a"] * 5 + ["y"]
    right = ["y"] + ["b"] * 5 + ["y"] + ["b"] * 5 + ["x"]
    choice = ["left"] + ["left"] * 5 + ["skip"] + ["right"] * 4 + ["tie"] + ["right"]
    latency = [4000.0] * 6 + [300.0] * 6 + [None]
    gold = [None] + ["left"] * 5 + [None] + ["left"] * 5 + [None]
    quality = {
        q.annotator: q
        for q in annotator_quality(annotator, pair, left, right, choice, latency, gold)
    }
    careful, fast, other = quality["careful"], quality["fast"], quality["other"]
    assert careful.gold_accuracy == 1.0 and careful.n_gold == 5
    assert careful.median_latency_ms == 4000.0 and careful.flags == ()
    assert fast.gold_accuracy == 0.0 and fast.n_gold == 5
    assert fast.median_latency_ms == 300.0
    assert "low_gold_accuracy" in fast.flags and "too_fast" in fast.flags
    assert fast.n_votes == 6 and fast.n_decisive == 4  # the skip and the tie are not decisive
    # On p1 "careful" (x on the left, picks x) and "other" (y on the left, picks right = x)
    # agree; on the gold pairs "careful" never agrees with "fast": 1 of 6.
    assert careful.agreement == pytest.approx(1 / 6) and other.agreement == 1.0
    assert math.isnan(other.median_latency_ms) and math.isnan(other.gold_accuracy)


def test_annotator_quality_rejects_unknown_choice() -> None:
    with pytest.raises(ValueError, match="unknown choice"):
        annotator_quality(["a"], ["p"], ["x"], ["y"], ["maybe"])


@pytest.mark.slow
def test_the_web_side_imports_neither_the_worker_nor_torch() -> None:
    # The rating maths, the importer and the whole web app are app-owned: no worker module
    # (and so no torch) is loaded by importing them.
    import subprocess
    import sys

    code = (
        "import sys, app.main, app.exports.importers, app.ratings.leaderboard, "
        "app.ratings.quality, app.jobs.kinds\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'torch')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
