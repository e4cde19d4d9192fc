"""Annotator quality from votes: NoisyBT skill and side habit, agreement, position bias, gold
accuracy and speed, with the flags a lead reviews.

Pure numpy/scipy. Shapes: n items, V votes, A annotators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from app.ratings.bradley_terry import (
    OUTCOME_A,
    OUTCOME_B,
    OUTCOME_TIE,
    DisconnectedComparisonsWarning,
    aggregate_comparisons,
    fit_bradley_terry,
)
from app.votes.vocabulary import CHOICES, Choice, gold_correct


@dataclass(frozen=True)
class QualityThresholds:
    """When an annotator is flagged; each flag needs enough votes to mean something."""

    # "position_bias": binomial test of the left-rate on left/right votes against 1/2 rejects at
    # this level AND the left-rate is at least this far from 1/2 (a tiny bias over thousands of
    # votes is real but harmless).
    position_bias_pvalue: float = 1e-3
    position_bias_min_effect: float = 0.1
    # "low_skill": NoisyBT skill σ(γ), the probability of voting by the images rather than by
    # habit, is below this. "random" additionally has no side habit: |σ(q) − 1/2| < 0.1.
    min_skill: float = 0.5
    random_max_habit: float = 0.1
    min_votes_for_skill: int = 20
    # "low_gold_accuracy": below this on gold pairs, with at least min_gold_votes of them.
    min_gold_accuracy: float = 0.7
    min_gold_votes: int = 5
    # "too_fast": median latency below this, with at least min_timed_votes timed votes. The vote
    # page unlocks after min_view_ms (500 ms by default); a person comparing two images takes
    # about a second, while someone clicking as soon as the buttons unlock sits near 500–700 ms.
    # 1.5 s flagged attentive annotators of small images (whose every vote was then dropped).
    min_median_latency_ms: float = 800.0
    min_timed_votes: int = 5


@dataclass(frozen=True)
class NoisyBTFit:
    """NoisyBT: P(left wins) = σ(γ_a)·σ(s_left − s_right) + (1 − σ(γ_a))·σ(q_a)."""

    scores: np.ndarray  # (n,) item scores
    skill: np.ndarray  # (A,) σ(γ_a)
    left_habit: np.ndarray  # (A,) σ(q_a): P(left) when not voting by the images
    log_likelihood: float
    converged: bool


# Prior of the NoisyBT fit: λ/2·Σ s² + λ/2·Σ (γ − γ0)² + λ/2·Σ q². γ0 = 2 (σ ≈ 0.88) says an
# annotator with little data is presumed mostly attentive.
NOISY_BT_PRIOR = 0.1
NOISY_BT_SKILL_PRIOR_MEAN = 2.0


def fit_noisy_bt(
    annotator: np.ndarray,
    left_item: np.ndarray,
    right_item: np.ndarray,
    left_share: np.ndarray,
    n_items: int,
    n_annotators: int,
    *,
    prior: float = NOISY_BT_PRIOR,
    init_scores: np.ndarray | None = None,
) -> NoisyBTFit:
    """MAP NoisyBT over all parameters (s, γ, q) at once with L-BFGS.

    Votes (V,) give the annotator, the items shown left and right and left_share: 1 for left,
    0 for right, 1/2 for a tie. Votes are first summed per (annotator, left, right) cell.
    """
    keys, cell = np.unique(
        (np.asarray(annotator) * n_items + left_item) * n_items + right_item, return_inverse=True
    )  # (K,), (V,)
    n_cells = keys.shape[0]
    share = np.asarray(left_share, dtype=np.float64)
    lefts = np.bincount(cell, weights=share, minlength=n_cells)  # (K,) left-win mass
    rights = np.bincount(cell, weights=1.0 - share, minlength=n_cells)
    ann = keys // (n_items * n_items)  # (K,)
    li = (keys // n_items) % n_items
    ri = keys % n_items
    n, a_count = n_items, n_annotators

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return theta[:n], theta[n : n + a_count], theta[n + a_count :]

    def negative_objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        s, gamma, q = unpack(theta)
        d = s[li] - s[ri]  # (K,)
        sig_d = 0.5 * (1 + np.tanh(0.5 * d))
        sig_g = 0.5 * (1 + np.tanh(0.5 * gamma[ann]))
        sig_q = 0.5 * (1 + np.tanh(0.5 * q[ann]))
        p_left = np.clip(sig_g * sig_d + (1 - sig_g) * sig_q, 1e-12, 1 - 1e-12)  # (K,)
        loglik = np.sum(lefts * np.log(p_left) + rights * np.log1p(-p_left))
        dl_dp = lefts / p_left - rights / (1 - p_left)  # (K,)
        r_d = dl_dp * sig_g * sig_d * (1 - sig_d)
        r_g = dl_dp * sig_g * (1 - sig_g) * (sig_d - sig_q)
        r_q = dl_dp * (1 - sig_g) * sig_q * (1 - sig_q)
        g_s = np.bincount(li, r_d, n) - np.bincount(ri, r_d, n) - prior * s
        g_gamma = np.bincount(ann, r_g, a_count) - prior * (gamma - NOISY_BT_SKILL_PRIOR_MEAN)
        g_q = np.bincount(ann, r_q, a_count) - prior * q
        objective = loglik - 0.5 * prior * (
            s @ s + np.sum((gamma - NOISY_BT_SKILL_PRIOR_MEAN) ** 2) + q @ q
        )
        return -objective, -np.concatenate([g_s, g_gamma, g_q])

    theta0 = np.concatenate(
        [
            np.zeros(n) if init_scores is None else np.asarray(init_scores, dtype=np.float64),
            np.full(a_count, NOISY_BT_SKILL_PRIOR_MEAN),
            np.zeros(a_count),
        ]
    )
    res = optimize.minimize(
        negative_objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 2000}
    )
    s, gamma, q = unpack(res.x)
    sig = lambda x: 0.5 * (1 + np.tanh(0.5 * x))  # noqa: E731
    penalty = 0.5 * prior * (s @ s + np.sum((gamma - NOISY_BT_SKILL_PRIOR_MEAN) ** 2) + q @ q)
    return NoisyBTFit(
        scores=s,
        skill=sig(gamma),
        left_habit=sig(q),
        log_likelihood=float(-res.fun + penalty),
        converged=bool(res.success),
    )


@dataclass(frozen=True)
class Agreement:
    """Inter-annotator agreement on units (pairs) with at least two votes."""

    rate: float  # share of agreeing vote pairs within a unit
    alpha: float  # Krippendorff's α (nominal); nan when all votes share one category
    n_units: int
    n_votes: int


def agreement(unit: np.ndarray, label: np.ndarray) -> Agreement:
    """Pairwise agreement rate and nominal Krippendorff's α; units with one vote are ignored."""
    _, u = np.unique(np.asarray(unit), return_inverse=True)  # (V,)
    _, c = np.unique(np.asarray(label), return_inverse=True)  # (V,)
    n_units, n_cats = int(u.max(initial=-1) + 1), int(c.max(initial=-1) + 1)
    table = np.zeros((n_units, n_cats))  # votes per (unit, category)
    np.add.at(table, (u, c), 1.0)
    per_unit = table.sum(axis=1)  # (U,)
    keep = per_unit >= 2
    table, per_unit = table[keep], per_unit[keep]
    if table.shape[0] == 0:
        return Agreement(rate=math.nan, alpha=math.nan, n_units=0, n_votes=0)
    same = np.sum(table * (table - 1))  # ordered agreeing vote pairs
    rate = same / np.sum(per_unit * (per_unit - 1))
    # Coincidence matrix o_ck = Σ_u (n_uc n_uk − [c = k] n_uc)/(n_u − 1).
    coincidence = np.einsum("uc,uk->ck", table / (per_unit - 1)[:, None], table)
    coincidence -= np.diag((table / (per_unit - 1)[:, None]).sum(axis=0))
    n_c = coincidence.sum(axis=1)  # (C,)
    total = n_c.sum()
    observed = total - np.trace(coincidence)  # Σ_{c≠k} o_ck
    expected = total**2 - np.sum(n_c**2)  # Σ_{c≠k} n_c n_k
    alpha = 1.0 - (total - 1.0) * observed / expected if expected > 0 else math.nan
    return Agreement(
        rate=float(rate), alpha=float(alpha), n_units=int(table.shape[0]), n_votes=int(total)
    )


def position_bias_test(n_left: int, n_right: int) -> float:
    """Two-sided binomial-test p-value of a left-rate n_left/(n_left + n_right) against 1/2."""
    if n_left + n_right == 0:
        return 1.0
    return float(stats.binomtest(int(n_left), int(n_left + n_right), 0.5).pvalue)


@dataclass(frozen=True)
class AnnotatorQuality:
    """One annotator's reliability figures and the flags they raise."""

    annotator: object
    n_votes: int  # all votes, skips included
    n_decisive: int  # left or right votes
    left_rate: float  # among decisive votes; nan without any
    position_bias_pvalue: float
    skill: float  # NoisyBT σ(γ); nan when the annotator has no usable vote
    left_habit: float  # NoisyBT σ(q)
    agreement: float  # share of this annotator's votes agreeing with co-voters; nan if none
    gold_accuracy: float  # nan without gold votes
    n_gold: int
    median_latency_ms: float  # nan without timings
    flags: tuple[str, ...]


def _outcome_code(choice: str) -> int:
    """A vote's outcome code; -1 for a skip (no data)."""
    outcome = Choice(choice).outcome
    return -1 if outcome is None else int(outcome)


def annotator_quality(
    annotator: Sequence[object] | np.ndarray,
    pair: Sequence[object] | np.ndarray,
    left_item: Sequence[object] | np.ndarray,
    right_item: Sequence[object] | np.ndarray,
    choice: Sequence[str] | np.ndarray,
    latency_ms: Sequence[float | None] | np.ndarray | None = None,
    gold: Sequence[str | None] | None = None,
    *,
    thresholds: QualityThresholds | None = None,
) -> list[AnnotatorQuality]:
    """Per-annotator quality from votes (V,), in order of first appearance.

    choice ∈ CHOICES as seen by the annotator; gold is the expected choice for gold pairs (None
    elsewhere). Skips are no data; "both_bad" counts as a tie. Agreement compares which item won
    (or tie), so the same pair shown in either order agrees.
    """
    th = thresholds or QualityThresholds()
    choice_arr = np.asarray(choice, dtype=object)
    bad = sorted({str(x) for x in choice_arr if x not in CHOICES})
    if bad:
        raise ValueError(f"unknown choice value(s) {bad}; expected one of {CHOICES}")
    n_votes = choice_arr.shape[0]
    if not (len(annotator) == len(pair) == len(left_item) == len(right_item) == n_votes):
        raise ValueError("annotator, pair, left_item, right_item and choice must align")
    annotators, first_seen, ann = np.unique(
        np.asarray(annotator, dtype=object), return_index=True, return_inverse=True
    )
    items, item_idx = np.unique(
        np.concatenate([np.asarray(left_item, dtype=object), np.asarray(right_item, dtype=object)]),
        return_inverse=True,
    )
    li, ri = item_idx[:n_votes], item_idx[n_votes:]  # (V,)
    n_ann, n_items = annotators.shape[0], items.shape[0]

    outcome_of = np.array([_outcome_code(c) for c in choice_arr], dtype=np.int64)  # (V,)
    is_left = outcome_of == OUTCOME_A
    is_right = outcome_of == OUTCOME_B
    is_tie = outcome_of == OUTCOME_TIE
    used = outcome_of >= 0  # (V,) skips are no data

    # NoisyBT on left/right/tie votes, started from a plain BT fit.
    skill = np.full(n_ann, np.nan)
    habit = np.full(n_ann, np.nan)
    if used.any() and n_items >= 2:
        share = np.where(is_left, 1.0, np.where(is_right, 0.0, 0.5))[used]
        outcome = np.where(is_left, OUTCOME_A, np.where(is_right, OUTCOME_B, OUTCOME_TIE))[used]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
            start = fit_bradley_terry(
                aggregate_comparisons(li[used], ri[used], outcome, n_items)
            ).scores
        noisy = fit_noisy_bt(
            ann[used], li[used], ri[used], share, n_items, n_ann, init_scores=start
        )
        has_votes = np.bincount(ann[used], minlength=n_ann) > 0
        skill = np.where(has_votes, noisy.skill, np.nan)
        habit = np.where(has_votes, noisy.left_habit, np.nan)

    # Agreement on the winning item: label 0 = lower item index won, 1 = higher won, 2 = tie.
    lower_won = np.where(is_left, li < ri, ri < li)
    label = np.where(is_tie, 2, np.where(lower_won, 0, 1))  # (V,)
    _, unit = np.unique(np.asarray(pair, dtype=object), return_inverse=True)  # (V,)
    n_units = int(unit.max(initial=-1) + 1)
    table = np.zeros((n_units, 3))
    np.add.at(table, (unit[used], label[used]), 1.0)
    agree_with = table[unit, label] - 1.0  # (V,) co-voters with my label
    others = table[unit].sum(axis=1) - 1.0  # (V,) co-voters
    agree_sum = np.bincount(ann[used], agree_with[used], n_ann)
    others_sum = np.bincount(ann[used], others[used], n_ann)

    gold_arr = np.asarray(gold if gold is not None else [None] * n_votes, dtype=object)
    hit = np.array([gold_correct(c, g) for c, g in zip(choice_arr, gold_arr, strict=True)])
    graded = np.array([h is not None for h in hit], dtype=bool)  # (V,)
    n_gold = np.bincount(ann[graded], minlength=n_ann)  # (A,)
    gold_hits = np.bincount(ann[graded], hit[graded].astype(bool), n_ann)
    latency = (
        np.full(n_votes, np.nan)
        if latency_ms is None
        else np.array([np.nan if x is None else float(x) for x in latency_ms])
    )  # (V,)
    timed = np.isfinite(latency)
    by_ann = np.lexsort((latency[timed], ann[timed]))  # timed votes grouped by annotator
    n_timed = np.bincount(ann[timed], minlength=n_ann)  # (A,)
    latency_groups = np.split(latency[timed][by_ann], np.cumsum(n_timed)[:-1])
    n_left = np.bincount(ann, is_left, n_ann).astype(int)  # (A,)
    n_right = np.bincount(ann, is_right, n_ann).astype(int)
    n_used = np.bincount(ann, used, n_ann).astype(int)
    n_all = np.bincount(ann, minlength=n_ann)

    results = []
    for a in np.argsort(first_seen):
        n_decisive = int(n_left[a] + n_right[a])
        left_rate = n_left[a] / n_decisive if n_decisive else math.nan
        pvalue = position_bias_test(int(n_left[a]), int(n_right[a]))
        gold_acc = gold_hits[a] / n_gold[a] if n_gold[a] else math.nan
        median_latency = float(np.median(latency_groups[a])) if n_timed[a] else math.nan
        agree = agree_sum[a] / others_sum[a] if others_sum[a] > 0 else math.nan

        flags = []
        if pvalue < th.position_bias_pvalue and abs(left_rate - 0.5) >= th.position_bias_min_effect:
            flags.append("position_bias")
        if n_used[a] >= th.min_votes_for_skill and skill[a] < th.min_skill:
            flags.append("low_skill")
            if abs(habit[a] - 0.5) < th.random_max_habit:
                flags.append("random")
        if n_gold[a] >= th.min_gold_votes and gold_acc < th.min_gold_accuracy:
            flags.append("low_gold_accuracy")
        if n_timed[a] >= th.min_timed_votes and median_latency < th.min_median_latency_ms:
            flags.append("too_fast")
        results.append(
            AnnotatorQuality(
                annotator=annotators[a],
                n_votes=int(n_all[a]),
                n_decisive=n_decisive,
                left_rate=float(left_rate),
                position_bias_pvalue=pvalue,
                skill=float(skill[a]),
                left_habit=float(habit[a]),
                agreement=float(agree),
                gold_accuracy=float(gold_acc),
                n_gold=int(n_gold[a]),
                median_latency_ms=median_latency,
                flags=tuple(flags),
            )
        )
    return results


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927); (nan, nan) when n = 0.

    Unlike p̂ ± z·se it stays inside [0, 1] and is honest for the few gold votes one annotator
    gives: 4 of 5 correct is (0.38, 0.96), which does not prove an accuracy below 0.7.
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def exclusion_reasons(
    *,
    gold_correct: int,
    gold_answered: int,
    median_latency_ms: float,
    timed_votes: int,
    min_gold_accuracy: float,
    thresholds: QualityThresholds | None = None,
) -> tuple[str, ...]:
    """Why an annotator's votes should be left out; empty when they are kept.

    "low_gold_accuracy": even the upper end of the 95 % Wilson interval of the gold accuracy is
    below `min_gold_accuracy` (so bad luck on a few gold pairs never excludes anyone);
    "too_fast": the median latency is below `thresholds.min_median_latency_ms`, with at least
    `thresholds.min_timed_votes` timed votes.
    """
    th = thresholds or QualityThresholds()
    reasons = []
    if gold_answered and wilson_interval(gold_correct, gold_answered)[1] < min_gold_accuracy:
        reasons.append("low_gold_accuracy")
    if timed_votes >= th.min_timed_votes and median_latency_ms < th.min_median_latency_ms:
        reasons.append("too_fast")
    return tuple(reasons)
