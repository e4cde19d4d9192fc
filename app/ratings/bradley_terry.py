"""Bradley–Terry and Davidson ratings from pairwise votes, and bootstrap intervals.

Pure numpy/scipy. Items are integer indices here; callers map names to indices.
Shapes: n items, m distinct unordered item pairs, B bootstrap resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import connected_components

from app.ratings.scale import elo_scale
from app.votes.vocabulary import Outcome

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


def _solve_sparse(
    graph: _Graph, curv: np.ndarray, rhs: list[np.ndarray], prior: float, rtol: np.ndarray
) -> list[np.ndarray]:
    """Solve (Eᵀ diag(curv[b]) E + λI) x = r[b] for each row b and each r in rhs ((b, n) each).

    Jacobi-preconditioned conjugate gradients (scipy) on the sparse pair graph, O(m) per step;
    row b stops once its residual is below rtol[b] times its right-hand side's norm.
    """
    out = [np.zeros_like(r) for r in rhs]
    for row in range(curv.shape[0]):
        lap = graph.sparse_laplacian(curv[row], prior)  # (n, n) CSR
        jacobi = sp.diags(1.0 / lap.diagonal())
        for r, x in zip(rhs, out, strict=True):
            x[row], _ = spla.cg(
                lap, r[row], rtol=float(rtol[row]), atol=0.0, M=jacobi, maxiter=1000
            )
    return out


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
            solutions = _solve_sparse(graph, terms.curv_d, rhs, prior, rtol)
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
