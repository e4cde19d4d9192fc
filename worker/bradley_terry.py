"""Bradley–Terry and Davidson ratings from pairwise votes, bootstrap intervals, annotator quality.

Pure numpy/scipy. Items and annotators are integer indices here; callers map names to indices.
Shapes: n items, m distinct unordered item pairs, B bootstrap resamples, V votes, A annotators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy import optimize, stats
from scipy.sparse.csgraph import connected_components

from app.ratings.scale import elo_scale
from app.votes.vocabulary import CHOICES, Choice, Outcome, gold_correct

TieMode = Literal["half", "davidson"]
TIE_MODES: tuple[str, ...] = ("half", "davidson")

# Outcome codes for a comparison between item_a and item_b (the vote vocabulary's).
OUTCOME_A = int(Outcome.A)
OUTCOME_B = int(Outcome.B)
OUTCOME_TIE = int(Outcome.TIE)

# A N(0, 1/λ) prior with λ = 0.01 is sd 10 on the logit scale (≈ 1 700 Elo points): it only
# matters for items whose record is one-sided or cut off from the rest of the graph.
DEFAULT_PRIOR = 0.01
# Stop when the Newton decrement gᵀH⁻¹g/2, an estimate of the gap to the optimum of the
# penalised log-likelihood, falls below this.
DEFAULT_TOL = 1e-9
# Resamples only feed percentiles; the last full Newton step after this tolerance still leaves
# scores within ~1e-10 of the optimum, one iteration sooner.
BOOTSTRAP_TOL = 1e-6
DEFAULT_MAX_ITER = 100
# Up to this many items the Newton system is solved densely (batched Cholesky); above it with
# Jacobi-preconditioned conjugate gradients on the sparse pair graph, O(m) per CG step.
DENSE_MAX_ITEMS = 300


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairCounts:
    """Vote counts per distinct unordered item pair (item_i < item_j)."""

    n_items: int
    item_i: np.ndarray  # (m,) int64
    item_j: np.ndarray  # (m,) int64
    wins_i: np.ndarray  # (m,) float64, votes where item_i won
    wins_j: np.ndarray  # (m,) float64
    ties: np.ndarray  # (m,) float64

    @property
    def n_pairs(self) -> int:
        return int(self.item_i.shape[0])

    @property
    def n_comparisons(self) -> float:
        return float(self.wins_i.sum() + self.wins_j.sum() + self.ties.sum())

    def cells(self) -> np.ndarray:
        """Counts as one (m, 3) array: wins_i, wins_j, ties."""
        return np.stack([self.wins_i, self.wins_j, self.ties], axis=1)


def aggregate_comparisons(
    item_a: np.ndarray,
    item_b: np.ndarray,
    outcome: np.ndarray,
    n_items: int | None = None,
    weights: np.ndarray | None = None,
) -> PairCounts:
    """Sum comparisons (outcome OUTCOME_A / OUTCOME_B / OUTCOME_TIE) per unordered item pair."""
    a = np.asarray(item_a, dtype=np.int64).ravel()  # (V,)
    b = np.asarray(item_b, dtype=np.int64).ravel()  # (V,)
    y = np.asarray(outcome).ravel()  # (V,)
    if not (a.shape == b.shape == y.shape):
        raise ValueError("item_a, item_b and outcome must have the same length")
    w = np.ones(a.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != a.shape:
        raise ValueError("weights must have the same length as item_a")
    if n_items is None:
        n_items = int(max(a.max(initial=-1), b.max(initial=-1)) + 1)
    if a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    if np.any(a == b):
        raise ValueError("an item cannot be compared with itself")
    if not np.all(np.isin(y, (OUTCOME_A, OUTCOME_B, OUTCOME_TIE))):
        raise ValueError("outcome values must be OUTCOME_A, OUTCOME_B or OUTCOME_TIE")

    lo = np.minimum(a, b)  # (V,)
    hi = np.maximum(a, b)  # (V,)
    keys, pair_index = np.unique(lo * n_items + hi, return_inverse=True)  # (m,), (V,)
    m = keys.shape[0]
    a_is_lo = a == lo
    lo_won = np.where(a_is_lo, y == OUTCOME_A, y == OUTCOME_B)
    hi_won = np.where(a_is_lo, y == OUTCOME_B, y == OUTCOME_A)
    tie = y == OUTCOME_TIE
    return PairCounts(
        n_items=int(n_items),
        item_i=(keys // n_items).astype(np.int64),
        item_j=(keys % n_items).astype(np.int64),
        wins_i=np.bincount(pair_index, weights=w * lo_won, minlength=m),
        wins_j=np.bincount(pair_index, weights=w * hi_won, minlength=m),
        ties=np.bincount(pair_index, weights=w * tie, minlength=m),
    )


def comparison_components(counts: PairCounts) -> list[list[int]]:
    """Connected components of the comparison graph, largest first (isolated items included)."""
    n = counts.n_items
    graph = sp.coo_matrix(
        (np.ones(counts.n_pairs), (counts.item_i, counts.item_j)), shape=(n, n)
    ).tocsr()
    n_comp, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(labels, minlength=n_comp))[:-1])
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return [g.tolist() for g in groups]


# --------------------------------------------------------------------------------------------
# Pair-level likelihood terms, batched over B rows of counts
# --------------------------------------------------------------------------------------------


@dataclass
class _PairTerms:
    """Per-pair log-likelihood and derivatives, each (B, m); Davidson fields None for "half"."""

    loglik: np.ndarray
    grad_d: np.ndarray  # dℓ/dd, d = s_i − s_j
    curv_d: np.ndarray  # −d²ℓ/dd² ≥ 0
    grad_eta: np.ndarray | None = None  # dℓ/dη, η = log ν
    curv_eta: np.ndarray | None = None  # −d²ℓ/dη²
    mixed: np.ndarray | None = None  # −d²ℓ/dd dη


def _softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) without overflow (np.logaddexp is several times slower)."""
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _davidson_log_z(half: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """log(e^{d/2} + e^{-d/2} + e^η) for half = d/2 (B, m) and eta (B, 1)."""
    top = np.maximum(np.abs(half), eta)  # (B, m) largest exponent; η may be −inf
    return top + np.log(np.exp(half - top) + np.exp(-half - top) + np.exp(eta - top))


def _pair_loglik(
    d: np.ndarray, wi: np.ndarray, wj: np.ndarray, t: np.ndarray, eta: np.ndarray | None
) -> np.ndarray:
    """Per-pair log-likelihood (B, m) at differences d = s_i − s_j (B, m)."""
    if eta is None:
        # A tie is half a win for each side; log σ(−d) = log σ(d) − d.
        total = wi + wj + t
        return -total * _softplus(-d) - (wj + 0.5 * t) * d
    half = 0.5 * d
    with np.errstate(invalid="ignore"):  # η is −inf on rows without any tie: 0·(−inf)
        t_eta = np.where(t > 0, t * eta, 0.0)
    return (wi - wj) * half + t_eta - (wi + wj + t) * _davidson_log_z(half, eta)


def _pair_terms(
    d: np.ndarray, wi: np.ndarray, wj: np.ndarray, t: np.ndarray, eta: np.ndarray | None
) -> _PairTerms:
    """Terms at differences d (B, m) for counts wi, wj, t (B, m); eta (B, 1) for Davidson."""
    if eta is None:
        total = wi + wj + t
        log_p = -_softplus(-d)  # log σ(d)
        p = np.exp(log_p)
        loglik = total * log_p - (wj + 0.5 * t) * d
        return _PairTerms(loglik, wi + 0.5 * t - total * p, total * p * (1.0 - p))
    # Davidson, dividing through by sqrt(π_i π_j): P(i wins) = e^{d/2}/Z, P(j wins) = e^{-d/2}/Z,
    # P(tie) = ν/Z with Z = e^{d/2} + e^{-d/2} + ν.
    total = wi + wj + t
    half = 0.5 * d
    log_z = _davidson_log_z(half, eta)  # (B, m)
    p_i = np.exp(half - log_z)
    p_j = np.exp(-half - log_z)
    p_t = np.exp(eta - log_z)
    with np.errstate(invalid="ignore"):
        t_eta = np.where(t > 0, t * eta, 0.0)
    loglik = (wi - wj) * half + t_eta - total * log_z
    # (d, η) are natural parameters of X ∈ {+½, −½, 0} and Y = 1[tie]: the gradient is
    # observed − N·E, the negated Hessian N·Cov.
    mean_x = 0.5 * (p_i - p_j)
    return _PairTerms(
        loglik=loglik,
        grad_d=0.5 * (wi - wj) - total * mean_x,
        curv_d=total * (0.25 * (p_i + p_j) - mean_x**2),
        grad_eta=t - total * p_t,
        curv_eta=total * p_t * (1.0 - p_t),
        mixed=-total * p_t * mean_x,
    )


class _Graph:
    """Incidence operator of the pair graph, (E s)_e = s_{i_e} − s_{j_e}, with E sparse (m, n)."""

    def __init__(self, item_i: np.ndarray, item_j: np.ndarray, n_items: int) -> None:
        m = item_i.shape[0]
        n = n_items
        rows = np.concatenate([np.arange(m), np.arange(m)])
        cols = np.concatenate([item_i, item_j])
        vals = np.concatenate([np.ones(m), -np.ones(m)])
        self.n = n
        self.item_i = item_i
        self.item_j = item_j
        self.inc = sp.csr_matrix((vals, (rows, cols)), shape=(m, n))  # E (m, n)
        self.inc_t = self.inc.T.tocsr()  # Eᵀ (n, m)
        self.abs_inc_t = abs(self.inc_t)
        # Sparsity pattern of the Laplacian Eᵀ diag(c) E + λI, assembled in O(m) per Newton
        # step: slot k of `_lap_order` says which of [c (i,j), c (j,i), diagonal] lands there.
        lap_rows = np.concatenate([item_i, item_j, np.arange(n)])
        lap_cols = np.concatenate([item_j, item_i, np.arange(n)])
        tags = np.arange(1, 2 * m + n + 1, dtype=np.float64)
        pattern = sp.csr_matrix((tags, (lap_rows, lap_cols)), shape=(n, n))
        self._lap_order = pattern.data.astype(np.int64) - 1
        self._lap_indices = pattern.indices
        self._lap_indptr = pattern.indptr

    def diff(self, s: np.ndarray) -> np.ndarray:
        """(B, n) scores → (B, m) differences."""
        return np.asarray(self.inc @ s.T).T

    def scatter(self, r: np.ndarray) -> np.ndarray:
        """(B, m) per-pair values → (B, n) Eᵀ r."""
        return np.asarray(self.inc_t @ r.T).T

    def laplacian_matvec(self, c: np.ndarray, v: np.ndarray) -> np.ndarray:
        """(B, m) weights, (B, n) vectors → (B, n) Eᵀ diag(c) E v."""
        return self.scatter(c * self.diff(v))

    def laplacian_diag(self, c: np.ndarray) -> np.ndarray:
        """(B, m) weights → (B, n) diagonal of Eᵀ diag(c) E."""
        return np.asarray(self.abs_inc_t @ c.T).T

    def sparse_laplacian(self, c: np.ndarray, shift: float) -> sp.csr_matrix:
        """(m,) weights → (n, n) CSR Eᵀ diag(c) E + shift·I."""
        diag = np.bincount(self.item_i, c, self.n) + np.bincount(self.item_j, c, self.n) + shift
        data = np.concatenate([-c, -c, diag])[self._lap_order]
        return sp.csr_matrix((data, self._lap_indices, self._lap_indptr), shape=(self.n, self.n))

    def dense_laplacian(self, c: np.ndarray) -> np.ndarray:
        """(B, m) weights → (B, n, n) Eᵀ diag(c) E."""
        n = self.n
        lap = np.zeros((c.shape[0], n, n))
        lap[:, self.item_i, self.item_j] = -c  # pairs are distinct: plain assignment
        lap[:, self.item_j, self.item_i] = -c
        diag = np.arange(n)
        lap[:, diag, diag] = -lap.sum(axis=2)  # Laplacian rows sum to zero
        return lap


def _pcg(
    matvec: Callable[[np.ndarray], np.ndarray],
    rhs: np.ndarray,
    diag: np.ndarray,
    rtol: np.ndarray | float = 1e-10,
    max_iter: int = 1000,
) -> np.ndarray:
    """Jacobi-preconditioned conjugate gradients, each row of rhs (B, n) solved independently.

    Row b stops once its residual is below rtol[b] times its right-hand side's norm.
    """
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / diag
    p = z.copy()
    rz = np.einsum("bn,bn->b", r, z)  # (B,)
    stop = rtol * np.linalg.norm(rhs, axis=1)  # (B,)
    for _ in range(max_iter):
        live = np.linalg.norm(r, axis=1) > stop  # (B,)
        if not live.any():
            break
        ap = matvec(p)  # (B, n)
        pap = np.einsum("bn,bn->b", p, ap)
        alpha = np.where(live, rz / np.where(pap > 0, pap, 1.0), 0.0)  # (B,)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r / diag
        rz_new = np.einsum("bn,bn->b", r, z)
        beta = np.where(live, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x


@dataclass
class _BatchResult:
    scores: np.ndarray  # (B, n)
    log_nu: np.ndarray | None  # (B,), −inf where a row has no ties
    log_likelihood: np.ndarray  # (B,)
    objective: np.ndarray  # (B,) log-likelihood − λ/2·Σ s²
    iterations: int
    converged: np.ndarray  # (B,) bool


def _fit_batch(
    graph: _Graph,
    cells: np.ndarray,
    ties: TieMode,
    prior: float,
    tol: float,
    max_iter: int,
    init_scores: np.ndarray | None = None,
    init_log_nu: float | None = None,
) -> _BatchResult:
    """Damped Newton on the penalised log-likelihood for B count sets at once.

    cells (B, m, 3) holds wins_i, wins_j, ties per pair. The objective is strictly concave in
    (s, η) when λ > 0, so Newton with an Armijo backtracking line search converges from any
    start. The optimum is centred: its gradient condition sums to λ·Σ s = 0.
    """
    bsz = cells.shape[0]
    n = graph.n
    wi, wj, t = cells[..., 0], cells[..., 1], cells[..., 2]  # (B, m) each
    davidson = ties == "davidson"
    s = np.zeros((bsz, n)) if init_scores is None else np.tile(init_scores, (bsz, 1))
    eta: np.ndarray | None = None
    eta_free = np.zeros(bsz, dtype=bool)
    if davidson:
        n_tie = t.sum(axis=1)  # (B,)
        eta_free = n_tie > 0  # without ties the MLE is ν = 0: η stays at −inf
        if init_log_nu is not None and np.isfinite(init_log_nu):
            start = np.full(bsz, init_log_nu)
        else:
            # P(tie) = ν/(2 + ν) at s = 0.
            start = np.log(
                2.0 * np.maximum(n_tie, 1e-12) / np.maximum(cells.sum((1, 2)) - n_tie, 1.0)
            )
        eta = np.where(eta_free, start, -np.inf)

    def evaluate(rows: np.ndarray, s_rows: np.ndarray, eta_rows: np.ndarray | None) -> _PairTerms:
        return _pair_terms(
            graph.diff(s_rows),
            wi[rows],
            wj[rows],
            t[rows],
            None if eta_rows is None else eta_rows[:, None],
        )

    def penalised(loglik: np.ndarray, s_rows: np.ndarray) -> np.ndarray:
        return loglik - 0.5 * prior * np.einsum("bn,bn->b", s_rows, s_rows)

    def loglik_at(rows: np.ndarray, s_rows: np.ndarray, eta_rows: np.ndarray | None) -> np.ndarray:
        eta_col = None if eta_rows is None else eta_rows[:, None]
        return _pair_loglik(graph.diff(s_rows), wi[rows], wj[rows], t[rows], eta_col).sum(axis=1)

    active = np.arange(bsz)
    converged = np.zeros(bsz, dtype=bool)
    first_g_norm: np.ndarray | None = None
    iterations = 0
    while active.size and iterations < max_iter:
        iterations += 1
        s_a = s[active]  # (b, n)
        eta_a = None if eta is None else eta[active]  # (b,)
        terms = evaluate(active, s_a, eta_a)
        objective = penalised(terms.loglik.sum(axis=1), s_a)  # (b,)
        g_s = graph.scatter(terms.grad_d) - prior * s_a  # (b, n)

        # Negated Hessian in s: A = Eᵀ diag(curv) E + λI (SPD); Davidson borders it with η.
        rhs = [g_s]
        if davidson:
            assert terms.mixed is not None
            border = graph.scatter(terms.mixed)  # (b, n) = −∂²ℓ/∂s∂η
            rhs.append(border)
        if n <= DENSE_MAX_ITEMS:
            mat = graph.dense_laplacian(terms.curv_d) + prior * np.eye(n)  # (b, n, n)
            sol = np.linalg.solve(mat, np.stack(rhs, axis=2))  # (b, n, k)
            solutions = [sol[..., k] for k in range(len(rhs))]
        else:
            # Inexact Newton: solve loosely while the gradient is large, tightly near the
            # optimum (forcing term ‖g‖/‖g₀‖ keeps the convergence superlinear).
            g_norm = np.linalg.norm(g_s, axis=1)  # (b,)
            if first_g_norm is None:
                first_g_norm = np.maximum(g_norm, 1e-300)
            rtol = np.clip(g_norm / first_g_norm[active], 1e-11, 0.1)
            if active.size == 1:
                # One system: assemble the sparse Laplacian once, one CSR product per CG step.
                lap = graph.sparse_laplacian(terms.curv_d[0], prior)  # (n, n)
                diag = np.tile(lap.diagonal(), (len(rhs), 1))  # (k, n)
                sol = _pcg(lambda v, a=lap: np.asarray(a @ v.T).T, np.concatenate(rhs), diag, rtol)
            else:
                curv = np.concatenate([terms.curv_d] * len(rhs), axis=0)  # (k·b, m)
                diag = graph.laplacian_diag(curv) + prior  # (k·b, n)
                sol = _pcg(
                    lambda v, c=curv: graph.laplacian_matvec(c, v) + prior * v,
                    np.concatenate(rhs, axis=0),
                    diag,
                    np.tile(rtol, len(rhs)),
                )
            solutions = np.split(sol, len(rhs), axis=0)
        step_s = solutions[0]  # (b, n) A⁻¹ g_s
        decrement = np.einsum("bn,bn->b", g_s, step_s)  # (b,) gᵀH⁻¹g ≥ 0
        step_eta = None
        if davidson:
            assert terms.grad_eta is not None and terms.curv_eta is not None
            free = eta_free[active]
            g_eta = terms.grad_eta.sum(axis=1)  # (b,)
            c_eta = terms.curv_eta.sum(axis=1)
            a_inv_border = solutions[1]  # (b, n)
            schur = c_eta - np.einsum("bn,bn->b", border, a_inv_border)  # (b,) > 0
            schur = np.where(free, np.maximum(schur, 1e-300), 1.0)
            step_eta = np.where(free, (g_eta - np.einsum("bn,bn->b", border, step_s)) / schur, 0)
            step_s = step_s - a_inv_border * step_eta[:, None]
            decrement = np.einsum("bn,bn->b", g_s, step_s) + np.where(free, g_eta * step_eta, 0)

        # Rows within tol still take this last full step: it squares their remaining error.
        done = 0.5 * decrement <= tol
        # Armijo backtracking, row by row; the slack absorbs rounding once the gap is tiny.
        step_len = np.ones(active.size)
        pending = ~done
        for _ in range(50):
            if not pending.any():
                break
            rows = np.flatnonzero(pending)
            s_try = s_a[rows] + step_len[rows, None] * step_s[rows]
            eta_try = None
            if davidson:
                assert eta_a is not None and step_eta is not None
                eta_try = np.where(
                    free[rows], eta_a[rows] + step_len[rows] * step_eta[rows], -np.inf
                )
            obj_try = penalised(loglik_at(active[rows], s_try, eta_try), s_try)
            slack = 1e-13 * np.abs(objective[rows])
            accept = obj_try >= objective[rows] + 0.25 * step_len[rows] * decrement[rows] - slack
            pending[rows[accept]] = False
            step_len[rows[~accept]] *= 0.5
        s[active] = s_a + step_len[:, None] * step_s
        if davidson:
            assert eta is not None and eta_a is not None and step_eta is not None
            eta[active] = np.where(free, eta_a + step_len * step_eta, -np.inf)
        converged[active[done]] = True
        active = active[~done]

    loglik = loglik_at(np.arange(bsz), s, eta)
    return _BatchResult(
        scores=s,
        log_nu=eta,
        log_likelihood=loglik,
        objective=penalised(loglik, s),
        iterations=iterations,
        converged=converged,
    )


# --------------------------------------------------------------------------------------------
# Public fits
# --------------------------------------------------------------------------------------------


class DisconnectedComparisonsWarning(UserWarning):
    """The comparison graph has several components: scores compare only within each one."""


@dataclass(frozen=True)
class BTFit:
    """A MAP Bradley–Terry (or Davidson) fit."""

    scores: np.ndarray  # (n,) logit scale, mean 0
    ties: str
    prior: float
    tie_param: float | None  # Davidson ν; None with ties="half"
    log_likelihood: float  # without the prior term
    objective: float  # log_likelihood − λ/2·Σ s²
    iterations: int
    converged: bool
    components: list[list[int]] = field(default_factory=list)  # largest first

    @property
    def ratings(self) -> np.ndarray:
        """(n,) scores on the Elo-like display scale."""
        return elo_scale(self.scores)


def _check_options(ties: str, prior: float) -> None:
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    if not prior > 0:
        raise ValueError("prior must be > 0: it is what keeps one-sided records finite")


def _warn_components(components: list[list[int]], item_names: Sequence[str] | None) -> None:
    def name(k: int) -> str:
        return str(item_names[k]) if item_names is not None else str(k)

    shown = []
    for comp in components[:5]:
        members = ", ".join(name(k) for k in comp[:10]) + (", …" if len(comp) > 10 else "")
        shown.append("{" + members + "}")
    more = f" and {len(components) - 5} more" if len(components) > 5 else ""
    warnings.warn(
        f"the comparison graph has {len(components)} connected components: "
        f"{' '.join(shown)}{more}; scores are comparable only within a component "
        "(the prior keeps them finite and centres each one)",
        DisconnectedComparisonsWarning,
        stacklevel=3,
    )


def fit_bradley_terry(
    counts: PairCounts,
    *,
    ties: TieMode = "half",
    prior: float = DEFAULT_PRIOR,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    item_names: Sequence[str] | None = None,
) -> BTFit:
    """MAP scores maximising Σ log-likelihood − λ/2·Σ s² by Newton's method.

    ties="half" counts a tie as half a win for each side; ties="davidson" fits Davidson's
    P(tie) ∝ ν·sqrt(π_i π_j) and estimates ν (ν = 0 when there are no ties). Warns with
    DisconnectedComparisonsWarning, naming the components, when the graph is not connected.
    """
    _check_options(ties, prior)
    components = comparison_components(counts)
    if len(components) > 1:
        _warn_components(components, item_names)
    graph = _Graph(counts.item_i, counts.item_j, counts.n_items)
    batch = _fit_batch(graph, counts.cells()[None], ties, prior, tol, max_iter)
    tie_param = None if batch.log_nu is None else float(np.exp(batch.log_nu[0]))
    return BTFit(
        scores=batch.scores[0],
        ties=ties,
        prior=prior,
        tie_param=tie_param,
        log_likelihood=float(batch.log_likelihood[0]),
        objective=float(batch.objective[0]),
        iterations=batch.iterations,
        converged=bool(batch.converged[0]),
        components=components,
    )


def log_likelihood(
    counts: PairCounts,
    scores: np.ndarray,
    *,
    ties: TieMode = "half",
    tie_param: float | None = None,
) -> float:
    """Log-likelihood of aggregated counts under scores (n,) (no prior term)."""
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    eta = None
    if ties == "davidson":
        if tie_param is None:
            raise ValueError("ties='davidson' needs tie_param")
        eta = np.full((1, 1), np.log(tie_param) if tie_param > 0 else -np.inf)
    s = np.asarray(scores, dtype=np.float64)
    d = (s[counts.item_i] - s[counts.item_j])[None]  # (1, m)
    terms = _pair_terms(d, counts.wins_i[None], counts.wins_j[None], counts.ties[None], eta)
    return float(terms.loglik.sum())


def ranks_from_intervals(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """(n,) bounds → (n,) ranks: 1 + number of items whose lower bound exceeds my upper bound."""
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    return 1 + (lower[None, :] > upper[:, None]).sum(axis=1)  # (n, n) → (n,)


@dataclass(frozen=True)
class BootstrapResult:
    """Point fit plus percentile intervals from refits on resampled votes."""

    fit: BTFit
    samples: np.ndarray  # (B, n) resampled scores
    tie_params: np.ndarray | None  # (B,) Davidson ν per resample
    lower: np.ndarray  # (n,) score percentile (1 − level)/2
    upper: np.ndarray  # (n,) score percentile (1 + level)/2
    ranks: np.ndarray  # (n,) from ranks_from_intervals
    level: float
    converged_fraction: float


def bootstrap_bradley_terry(
    counts: PairCounts,
    n_resamples: int = 1000,
    *,
    ties: TieMode = "half",
    prior: float = DEFAULT_PRIOR,
    level: float = 0.95,
    seed: int | np.random.Generator | None = 0,
    tol: float = BOOTSTRAP_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    chunk_size: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    item_names: Sequence[str] | None = None,
) -> BootstrapResult:
    """Bootstrap over votes: B multinomial resamples of the pair counts, all refitted batched.

    Resampling V votes with replacement is a multinomial draw of V over the 3m (pair, outcome)
    cells with probabilities count/V, so the raw rows are never touched. Resamples are refitted
    together in chunks (Newton warm-started at the point fit, tolerance `tol`); on_progress
    gets the number of resamples finished after each chunk.
    """
    _check_options(ties, prior)
    if n_resamples < 1:
        raise ValueError("n_resamples must be ≥ 1")
    if not 0 < level < 1:
        raise ValueError("level must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    fit = fit_bradley_terry(
        counts, ties=ties, prior=prior, max_iter=max_iter, item_names=item_names
    )
    graph = _Graph(counts.item_i, counts.item_j, counts.n_items)
    cells = counts.cells()  # (m, 3)
    n_votes = int(round(cells.sum()))
    probs = (cells / cells.sum()).ravel()  # (3m,)
    n, m = counts.n_items, counts.n_pairs
    if chunk_size is None:
        # Keep the batched dense Hessians (chunk, n, n) or CG work arrays (chunk, m) ~ 100 MB.
        per_row = n * n if n <= DENSE_MAX_ITEMS else 8 * max(m, n)
        chunk_size = int(np.clip(12_000_000 // max(per_row, 1), 1, 500))
    log_nu0 = None if fit.tie_param is None or fit.tie_param <= 0 else math.log(fit.tie_param)

    samples = np.empty((n_resamples, n))
    tie_params = np.empty(n_resamples) if ties == "davidson" else None
    n_converged = 0
    done = 0
    while done < n_resamples:
        size = min(chunk_size, n_resamples - done)
        draws = rng.multinomial(n_votes, probs, size=size).astype(np.float64)  # (b, 3m)
        batch = _fit_batch(
            graph, draws.reshape(size, m, 3), ties, prior, tol, max_iter, fit.scores, log_nu0
        )
        samples[done : done + size] = batch.scores
        if tie_params is not None and batch.log_nu is not None:
            tie_params[done : done + size] = np.exp(batch.log_nu)
        n_converged += int(batch.converged.sum())
        done += size
        if on_progress is not None:
            on_progress(done)

    lower, upper = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return BootstrapResult(
        fit=fit,
        samples=samples,
        tie_params=tie_params,
        lower=lower,
        upper=upper,
        ranks=ranks_from_intervals(lower, upper),
        level=level,
        converged_fraction=n_converged / n_resamples,
    )


# --------------------------------------------------------------------------------------------
# Annotator quality
# --------------------------------------------------------------------------------------------

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
    # "too_fast": median latency below this, with at least min_timed_votes timed votes.
    min_median_latency_ms: float = 1500.0
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
