"""Child-vs-parent win-rates with intervals (pure numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


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


def paired_outcomes(child: np.ndarray, parent: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(N,) 1 where the child scored higher, 0 lower, 0.5 within tol (same prompt and seed)."""
    child = np.asarray(child, dtype=np.float64)  # (N,)
    parent = np.asarray(parent, dtype=np.float64)  # (N,)
    if child.shape != parent.shape:
        raise ValueError("child and parent scores must align")
    diff = child - parent
    return np.where(diff > tol, 1.0, np.where(diff < -tol, 0.0, 0.5))


def win_rate_interval(outcomes: np.ndarray, z: float = Z95) -> WinRate:
    """Wilson score interval for the win-rate, ties counted as half a win.

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest for the
    small n and extreme rates a good fine-tune produces.
    """
    y = np.asarray(outcomes, dtype=np.float64).ravel()  # (N,) in {0, 0.5, 1}
    if y.size == 0:
        raise ValueError("no comparisons")
    if np.any((y != 0) & (y != 0.5) & (y != 1)):
        raise ValueError("outcomes must be 0, 0.5 or 1")
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
