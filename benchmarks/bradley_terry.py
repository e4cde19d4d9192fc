"""Bradley–Terry speed: prefloop's Newton fit and batched bootstrap against the usual baselines.

(a) fitting: 1 M comparisons over 100 k items with prefloop alone (choix builds dense n×n
    matrices and cannot run there), then prefloop vs choix.ilsr_pairwise and choix.opt_pairwise
    on the same data at sizes choix handles, at equal log-likelihood. Goal ≥ 10× faster.
(b) bootstrap: 1 000 resamples of 100 k votes over 50 models, batched, vs a loop that refits
    each resample with scipy L-BFGS. Goal ≥ 20× faster.

Run: .venv/bin/python benchmarks/bradley_terry.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

# One BLAS thread for every method, set before numpy loads: the cores are shared, and OpenBLAS
# threads contending with other processes made L-BFGS-B's tiny solves ~100× slower here.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import choix  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize, stats  # noqa: E402

from app.ratings.bradley_terry import (  # noqa: E402
    OUTCOME_A,
    OUTCOME_B,
    OUTCOME_TIE,
    aggregate_comparisons,
    bootstrap_bradley_terry,
    fit_bradley_terry,
    log_likelihood,
)

T = TypeVar("T")
# choix.opt_pairwise's default: a N(0, 1/α) prior so weak that MAP ≈ ML; prefloop uses the same.
MATCHED_PRIOR = 1e-6


def timed(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """Median wall time over repeats (the machine is shared) and the last result."""
    times = []
    result: T
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def simulate(
    rng: np.random.Generator, n_items: int, n_votes: int, tie_rate: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Planted N(0, 1) scores; uniform random distinct pairs; BT outcomes, some ties."""
    scores = rng.normal(size=n_items)
    a = rng.integers(0, n_items, n_votes)
    b = (a + rng.integers(1, n_items, n_votes)) % n_items
    a_wins = rng.random(n_votes) < 1 / (1 + np.exp(-(scores[a] - scores[b])))
    outcome = np.where(a_wins, OUTCOME_A, OUTCOME_B)
    outcome[rng.random(n_votes) < tie_rate] = OUTCOME_TIE
    return scores, a, b, outcome


def fitting_at_scale(rng: np.random.Generator) -> None:
    print("(a1) 1 000 000 comparisons over 100 000 items, prefloop alone")
    truth, a, b, y = simulate(rng, 100_000, 1_000_000)

    def run() -> tuple:
        counts = aggregate_comparisons(a, b, y, 100_000)
        return counts, fit_bradley_terry(counts)

    seconds, (counts, fit) = timed(run, repeats=3)
    rho = stats.spearmanr(fit.scores, truth).statistic
    print(
        f"     {seconds:6.2f} s (aggregation + fit, median of 3), {counts.n_pairs:,} distinct "
        f"pairs, {fit.iterations} Newton iterations, converged={fit.converged}, "
        f"Spearman vs truth {rho:.3f} (about 20 votes per item)"
    )


def fitting_vs_choix(rng: np.random.Generator, n_items: int, n_votes: int) -> float:
    print(f"(a2) {n_votes:,} comparisons over {n_items:,} items: prefloop vs choix")
    _, a, b, y = simulate(rng, n_items, n_votes)
    winners = np.where(y == OUTCOME_A, a, b)
    losers = np.where(y == OUTCOME_A, b, a)
    choix_data = list(zip(winners.tolist(), losers.tolist(), strict=True))
    counts = aggregate_comparisons(a, b, y, n_items)

    def ours() -> np.ndarray:
        return fit_bradley_terry(
            aggregate_comparisons(a, b, y, n_items), prior=MATCHED_PRIOR
        ).scores

    ours_s, ours_scores = timed(ours, repeats=3)
    ilsr_s, ilsr_scores = timed(lambda: choix.ilsr_pairwise(n_items, choix_data))
    opt_s, opt_scores = timed(lambda: choix.opt_pairwise(n_items, choix_data, alpha=MATCHED_PRIOR))
    ll_ours = log_likelihood(counts, ours_scores)
    ll_ilsr = log_likelihood(counts, ilsr_scores)
    ll_opt = log_likelihood(counts, opt_scores)
    print(f"     prefloop Newton     {ours_s:7.2f} s  log-lik {ll_ours:,.4f}  (median of 3)")
    print(f"     choix.ilsr_pairwise {ilsr_s:7.2f} s  log-lik {ll_ilsr:,.4f}  (one run)")
    print(f"     choix.opt_pairwise  {opt_s:7.2f} s  log-lik {ll_opt:,.4f}  (one run)")
    print(
        f"     log-lik prefloop − ilsr {ll_ours - ll_ilsr:+.1e}, prefloop − opt "
        f"{ll_ours - ll_opt:+.1e} (relative to |log-lik|: "
        f"{max(abs(ll_ours - ll_ilsr), abs(ll_ours - ll_opt)) / abs(ll_ours):.0e})"
    )
    ratio = min(ilsr_s, opt_s) / ours_s
    print(
        f"     speed-up: {ilsr_s / ours_s:.1f}× vs ilsr, {opt_s / ours_s:.1f}× vs opt "
        f"(vs the faster choix: {ratio:.1f}×, goal ≥ 10×)"
    )
    return ratio


def per_vote_objective(
    theta: np.ndarray, a: np.ndarray, b: np.ndarray, target: np.ndarray, prior: float
) -> tuple[float, np.ndarray]:
    """Negative penalised BT log-likelihood over raw votes (ties as 1/2), with its gradient."""
    n = theta.shape[0]
    d = theta[a] - theta[b]
    log_p = -np.logaddexp(0.0, -d)
    ll = np.sum(target * log_p + (1 - target) * (log_p - d))
    r = target - np.exp(log_p)
    grad = np.bincount(a, r, n) - np.bincount(b, r, n) - prior * theta
    return -(ll - 0.5 * prior * theta @ theta), -grad


def aggregated_objective(
    theta: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    wins: np.ndarray,
    total: np.ndarray,
    prior: float,
) -> tuple[float, np.ndarray]:
    """The same objective on per-pair counts (wins of item i incl. half ties, total votes)."""
    n = theta.shape[0]
    d = theta[i] - theta[j]
    log_p = -np.logaddexp(0.0, -d)
    ll = np.sum(total * log_p - (total - wins) * d)
    r = wins - total * np.exp(log_p)
    grad = np.bincount(i, r, n) - np.bincount(j, r, n) - prior * theta
    return -(ll - 0.5 * prior * theta @ theta), -grad


def lbfgs(fun: Callable, n: int, args: tuple) -> np.ndarray:
    res = optimize.minimize(
        fun, np.zeros(n), args=args, jac=True, method="L-BFGS-B", options={"gtol": 1e-8}
    )
    return res.x


def bootstrap_vs_loop(rng: np.random.Generator, n_loop: int) -> tuple[float, float]:
    n_models, n_votes, n_resamples = 50, 100_000, 1000
    print(
        f"(b) bootstrap, {n_resamples:,} resamples of {n_votes:,} votes (10 % ties) over "
        f"{n_models} models"
    )
    _, a, b, y = simulate(rng, n_models, n_votes, tie_rate=0.1)
    counts = aggregate_comparisons(a, b, y, n_models)
    prior = 0.01
    seed = 123

    ours_s, boot = timed(
        lambda: bootstrap_bradley_terry(counts, n_resamples, prior=prior, seed=seed), repeats=3
    )
    print(
        f"     prefloop batched Newton  {ours_s:7.2f} s for {n_resamples} "
        f"(median of 3; {boot.converged_fraction:.0%} converged)"
    )

    # Loop 1, the arena recipe: resample the raw rows, refit with L-BFGS.
    target = np.where(y == OUTCOME_A, 1.0, np.where(y == OUTCOME_B, 0.0, 0.5))
    loop_rng = np.random.default_rng(seed)

    def raw_loop() -> None:
        for _ in range(n_loop):
            pick = loop_rng.integers(0, n_votes, n_votes)
            lbfgs(per_vote_objective, n_models, (a[pick], b[pick], target[pick], prior))

    raw_s, _ = timed(raw_loop)
    raw_total = raw_s / n_loop * n_resamples
    print(
        f"     loop, raw rows + L-BFGS  {raw_total:7.2f} s for {n_resamples} "
        f"(timed on {n_loop} resamples, extrapolated ×{n_resamples / n_loop:.0f})"
    )

    # Loop 2, a stronger baseline: aggregate first, then per resample the same multinomial draw
    # of the pair counts as prefloop makes (same seed, same draws) and one L-BFGS refit.
    cells = counts.cells()
    probs = (cells / cells.sum()).ravel()
    draw_rng = np.random.default_rng(seed)
    refits = []

    def counts_loop() -> None:
        for _ in range(n_loop):
            draw = draw_rng.multinomial(n_votes, probs).reshape(-1, 3)  # (m, 3)
            wins = draw[:, 0] + 0.5 * draw[:, 2]
            total = draw.sum(axis=1).astype(np.float64)
            refits.append(
                lbfgs(
                    aggregated_objective,
                    n_models,
                    (counts.item_i, counts.item_j, wins, total, prior),
                )
            )

    agg_s, _ = timed(counts_loop)
    agg_total = agg_s / n_loop * n_resamples
    print(
        f"     loop, pair counts + L-BFGS {agg_total:5.2f} s for {n_resamples} "
        f"(timed on {n_loop} resamples, extrapolated ×{n_resamples / n_loop:.0f})"
    )
    # Same seed, same draws: the batched refits must equal the L-BFGS ones.
    gap = np.max(np.abs(np.array(refits) - boot.samples[:n_loop]))
    print(f"     max |score difference| batched Newton vs L-BFGS on the same resamples: {gap:.1e}")
    raw_ratio, agg_ratio = raw_total / ours_s, agg_total / ours_s
    print(
        f"     speed-up: {raw_ratio:.0f}× vs the raw-row loop (goal ≥ 20×); {agg_ratio:.1f}× vs "
        "the pair-count loop, which already has the aggregation and multinomial-draw savings "
        "and isolates batching alone"
    )
    return raw_ratio, agg_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="skip the 5 000-item choix size; loop on 10 resamples"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"BLAS threads: {os.environ['OPENBLAS_NUM_THREADS']} (OPENBLAS_NUM_THREADS)")
    fitting_at_scale(rng)
    ratios = [fitting_vs_choix(rng, 1_000, 100_000)]
    if not args.quick:
        ratios.append(fitting_vs_choix(rng, 5_000, 300_000))
    raw_ratio, agg_ratio = bootstrap_vs_loop(rng, n_loop=10 if args.quick else 40)
    print("summary")
    print(f"  fit vs the faster choix method: {', '.join(f'{r:.1f}×' for r in ratios)}")
    print(f"  bootstrap vs L-BFGS loops: {raw_ratio:.0f}× (raw rows), {agg_ratio:.1f}× (counts)")


if __name__ == "__main__":
    main()
