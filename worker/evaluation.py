"""Child-vs-parent measurement that counts only perceptible changes (pure numpy).

A pixel-level score moves a little with any weight change, so a raw "child scored higher" is
mostly noise. Every figure here is therefore taken at a tolerance, and intervals respect the
clustering of the data:

- win-rate at tolerance: the child wins a (prompt, seed) comparison when its score exceeds the
  parent's by more than `tol`, loses when it falls short by more than `tol`; a difference within
  `tol` (a change nobody could see) is a tie and counts HALF a win. 0.5 therefore means "no
  visible change on average", not "no change".
- mean score change (child − parent), over comparisons where both scores are real;
- class-flip rate: the share of comparisons whose attribute class (size class, position cell,
  background class, ...) differs between child and parent: how often a change is visible as such;
- prompt-clustered bootstrap intervals: images of one prompt (all its seeds) are not
  independent, so the bootstrap resamples prompts with replacement and keeps all their seeds;
- the oracle best-of-N ceiling: the same win-rate for a "child" that is the judge's own pick of
  the best of N parent samples, against an independent parent sample — what the parent already
  contains, to read method gains against.

Wilson intervals (`win_rate_interval`) remain for independent comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class WinRate:
    rate: float  # share of comparisons the child won, ties counted half
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, float | int]:
        return {
            "win_rate": self.rate,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "n": self.n,
        }


def paired_outcomes(child: np.ndarray, parent: np.ndarray, tol: float) -> np.ndarray:
    """(N,) 1 where the child scored higher by more than tol, 0 lower by more, 0.5 within tol.

    `tol` has no default: the tolerance is a statement about what is perceptible for the score
    at hand, and tolerance 0 silently turns imperceptible changes into wins.
    """
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number ≥ 0, got {tol}")
    child = np.asarray(child, dtype=np.float64)  # (N,)
    parent = np.asarray(parent, dtype=np.float64)  # (N,)
    if child.shape != parent.shape:
        raise ValueError("child and parent scores must align")
    diff = child - parent
    return np.where(diff > tol, 1.0, np.where(diff < -tol, 0.0, 0.5))


def win_rate_interval(outcomes: np.ndarray, z: float = Z95) -> WinRate:
    """Wilson score interval for the win-rate, ties counted as half a win.

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest for the
    small n and extreme rates a good fine-tune produces. It assumes independent comparisons; for
    several seeds per prompt use `cluster_bootstrap_ci`.
    """
    y = _outcomes(outcomes)
    n = y.size
    p = float(y.mean())
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return WinRate(
        rate=p,
        ci_low=max(0.0, centre - half),
        ci_high=min(1.0, centre + half),
        wins=int((y == 1).sum()),
        ties=int((y == 0.5).sum()),
        losses=int((y == 0).sum()),
    )


def _outcomes(outcomes: np.ndarray) -> np.ndarray:
    y = np.asarray(outcomes, dtype=np.float64).ravel()  # (N,) in {0, 0.5, 1}
    if y.size == 0:
        raise ValueError("no comparisons")
    if np.any((y != 0) & (y != 0.5) & (y != 1)):
        raise ValueError("outcomes must be 0, 0.5 or 1")
    return y


def cluster_index(clusters: Sequence[Hashable] | np.ndarray) -> np.ndarray:
    """(N,) integer ids 0..C−1 for cluster labels (prompt ids or texts), in first-seen order."""
    seen: dict[Hashable, int] = {}
    return np.array([seen.setdefault(c, len(seen)) for c in list(clusters)], dtype=np.int64)


def cluster_bootstrap_ci(
    values: np.ndarray,
    clusters: Sequence[Hashable] | np.ndarray,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (N,), resampling whole clusters.

    Each bootstrap draw takes C clusters with replacement (C = number of clusters) and keeps
    every value of each; the statistic is the mean over all values drawn (clusters of unequal
    size weigh by their size, as in the point estimate).
    """
    y = np.asarray(values, dtype=np.float64).ravel()  # (N,)
    ids = cluster_index(clusters)  # (N,)
    if y.size == 0 or ids.size != y.size:
        raise ValueError(f"{y.size} values but {ids.size} cluster labels")
    if not 0 < level < 1:
        raise ValueError("level must be in (0, 1)")
    count = int(ids.max()) + 1
    sums = np.bincount(ids, weights=y, minlength=count)  # (C,)
    sizes = np.bincount(ids, minlength=count).astype(np.float64)  # (C,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, count, size=(samples, count))  # (B, C) cluster indices
    means = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)  # (B,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Child vs parent on the same (prompt, seed) images, by one score at one tolerance."""

    tolerance: float  # score units; differences within it are ties, counted half
    win_rate: float  # (wins + ties / 2) / n
    ci_low: float  # 95 % prompt-clustered bootstrap
    ci_high: float
    wins: int
    ties: int
    losses: int
    prompts: int  # clusters
    score_change: float  # mean child − parent over comparisons with both scores valid
    score_change_ci_low: float
    score_change_ci_high: float
    valid: int  # comparisons entering the score change
    class_flip_rate: float | None  # share whose attribute class differs; None if not given

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, float | int | None]:
        return {**asdict(self), "n": self.n}


def class_flip_rate(
    parent_classes: Sequence[Hashable], child_classes: Sequence[Hashable]
) -> float:
    """Share of paired images whose attribute class differs between child and parent."""
    if len(parent_classes) != len(child_classes):
        raise ValueError(f"{len(parent_classes)} parent classes but {len(child_classes)} child")
    if not parent_classes:
        raise ValueError("no comparisons")
    flips = sum(p != c for p, c in zip(parent_classes, child_classes, strict=True))
    return flips / len(parent_classes)


def compare(
    child: np.ndarray,
    parent: np.ndarray,
    clusters: Sequence[Hashable] | np.ndarray,
    tol: float,
    *,
    valid: np.ndarray | None = None,
    parent_classes: Sequence[Hashable] | None = None,
    child_classes: Sequence[Hashable] | None = None,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> Comparison:
    """Win-rate at `tol` with a prompt-clustered interval, score change and class-flip rate.

    child, parent: (N,) scores of the same (prompt, seed); clusters: (N,) prompt labels;
    valid: (N,) bool, where both scores are real (e.g. both images show a foreground) — the
    score change averages over these only, while the win-rate counts every comparison (a lost
    foreground is a real loss).
    """
    child = np.asarray(child, dtype=np.float64)  # (N,)
    parent = np.asarray(parent, dtype=np.float64)  # (N,)
    outcomes = _outcomes(paired_outcomes(child, parent, tol))  # (N,)
    labels = cluster_index(clusters)  # (N,)
    if labels.size != outcomes.size:
        raise ValueError(f"{outcomes.size} comparisons but {labels.size} cluster labels")
    low, high = cluster_bootstrap_ci(outcomes, labels, samples=samples, seed=seed)
    keep = np.ones(child.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if keep.shape != child.shape:
        raise ValueError("valid must align with the scores")
    diff = (child - parent)[keep]  # (V,)
    if diff.size:
        change = float(diff.mean())
        change_low, change_high = cluster_bootstrap_ci(
            diff, labels[keep], samples=samples, seed=seed
        )
    else:
        change = change_low = change_high = float("nan")
    flips = None
    if parent_classes is not None or child_classes is not None:
        if parent_classes is None or child_classes is None:
            raise ValueError("give both parent and child classes, or neither")
        flips = class_flip_rate(parent_classes, child_classes)
    return Comparison(
        tolerance=tol,
        win_rate=float(outcomes.mean()),
        ci_low=low,
        ci_high=high,
        wins=int((outcomes == 1).sum()),
        ties=int((outcomes == 0.5).sum()),
        losses=int((outcomes == 0).sum()),
        prompts=int(labels.max()) + 1,
        score_change=change,
        score_change_ci_low=change_low,
        score_change_ci_high=change_high,
        valid=int(keep.sum()),
        class_flip_rate=flips,
    )


def best_of_n_outcomes(scores: np.ndarray, n: int, tol: float) -> np.ndarray:
    """(P, M) expected outcomes of the best of n parent samples against each parent sample.

    scores: (P, M) one score per prompt and sample (M ≥ n + 1 iid samples of the parent). For
    baseline sample j, the candidates are every n-subset of the other M − 1 samples, each
    equally likely; the pick is the subset's highest score. Exactly averaged over the subsets
    (a U-statistic, unbiased for best-of-n vs one sample):
        P(win)  = 1 − C(M − 1 − A, n) / C(M − 1, n)   A: others above baseline + tol
        P(loss) = C(L, n) / C(M − 1, n)               L: others below baseline − tol
    and the outcome is P(win) + ½ P(tie), ties within tol counted half as everywhere.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError("scores must be (prompts, samples)")
    prompts, m = s.shape
    if n < 1 or m < n + 1:
        raise ValueError(f"best-of-{n} needs at least {n + 1} samples per prompt, got {m}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number ≥ 0, got {tol}")
    diff = s[:, None, :] - s[:, :, None]  # (P, M, M): [p, j, k] = other k − baseline j
    off = ~np.eye(m, dtype=bool)[None]  # (1, M, M): exclude k == j
    above = ((diff > tol) & off).sum(axis=2)  # (P, M)
    below = ((diff < -tol) & off).sum(axis=2)  # (P, M)
    total = math.comb(m - 1, n)
    comb = np.vectorize(lambda k: math.comb(int(k), n))
    p_win = 1.0 - comb(m - 1 - above) / total  # (P, M)
    p_loss = comb(below) / total  # (P, M)
    return p_win + 0.5 * (1.0 - p_win - p_loss)


@dataclass(frozen=True)
class Estimate:
    """A mean with its prompt-clustered 95 % bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def oracle_best_of_n(
    scores: np.ndarray,
    n: int,
    tol: float,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> Estimate:
    """The win-rate ceiling of picking, by the judge itself, the best of n parent samples.

    scores: (P, M) parent scores per prompt and sample. Clustered by prompt like `compare`.
    """
    outcomes = best_of_n_outcomes(scores, n, tol)  # (P, M)
    prompts, m = outcomes.shape
    labels = np.repeat(np.arange(prompts), m)  # (P·M,)
    low, high = cluster_bootstrap_ci(outcomes.ravel(), labels, samples=samples, seed=seed)
    return Estimate(float(outcomes.mean()), low, high, int(outcomes.size))


def share(
    flags: Sequence[bool] | np.ndarray,
    clusters: Sequence[Hashable] | np.ndarray,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> Estimate:
    """The share of true flags (e.g. images in the prompt's named cell), prompt-clustered CI."""
    y = np.asarray(flags, dtype=np.float64).ravel()  # (N,)
    low, high = cluster_bootstrap_ci(y, clusters, samples=samples, seed=seed)
    return Estimate(float(y.mean()), low, high, int(y.size))


__all__ = [
    "BOOTSTRAP_SAMPLES",
    "Comparison",
    "Estimate",
    "WinRate",
    "Z95",
    "best_of_n_outcomes",
    "class_flip_rate",
    "cluster_bootstrap_ci",
    "cluster_index",
    "compare",
    "oracle_best_of_n",
    "paired_outcomes",
    "share",
    "win_rate_interval",
]
