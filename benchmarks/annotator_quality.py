"""Does reliability handling undo careless annotators? Ratings and reward accuracy, side by side.

Simulated annotators (20 % click at random, 10 % always press "left", the rest vote by a
Bradley–Terry model of the true utilities) rate the same pairs; every annotator also answers
`--gold` gold pairs (the original must beat a degraded copy; random and always-left annotators are
right half the time). Three data sets are compared:
- clean: the attentive annotators' votes only (the ceiling);
- all votes: everything, as before reliability handling;
- reliability: the project rule of app/ratings/reliability.py — annotators whose gold accuracy
  is surely below `min_gold_accuracy` (upper end of the 95 % Wilson interval) are left out.

Measured:
- ratings: a Bradley–Terry fit of `--models` models with known strengths from votes on eval
  pairs; max |fitted − true| score (both centred) and whether the order is right;
- reward accuracy: a linear reward model (logistic regression on feature differences, the toy
  analogue of the reward model) trained on votes on train pairs, scored on held-out pairs of
  held-out images whose true utilities differ perceptibly (> `--tolerance`); the goal is that
  reliability handling recovers ≥ 90 % of the clean accuracy.

Repeated over `--repeats` seeds; mean and range printed. CPU only, a few seconds.

    python benchmarks/annotator_quality.py [--annotators 20] [--repeats 5]
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from app.ratings.bradley_terry import (
    OUTCOME_A,
    OUTCOME_B,
    DisconnectedComparisonsWarning,
    aggregate_comparisons,
    fit_bradley_terry,
)
from app.ratings.quality import exclusion_reasons

KINDS = ("clean", "random", "left")


@dataclass
class Votes:
    annotator: np.ndarray  # (V,)
    left: np.ndarray  # (V,) item shown left
    right: np.ndarray  # (V,)
    left_won: np.ndarray  # (V,) bool


def annotator_kinds(n: int, rng: np.random.Generator) -> np.ndarray:
    """(A,) kind per annotator: 20 % random, 10 % always-left, the rest clean."""
    n_random, n_left = round(0.2 * n), round(0.1 * n)
    n_clean = n - n_random - n_left
    kinds = np.array(["random"] * n_random + ["left"] * n_left + ["clean"] * n_clean)
    return rng.permutation(kinds)


def simulate(
    utility: np.ndarray, pairs: np.ndarray, kinds: np.ndarray, k: int, rng: np.random.Generator
) -> Votes:
    """k distinct annotators per pair (P, 2); each sees a random side order."""
    n_ann = kinds.shape[0]
    ann = np.stack([rng.choice(n_ann, size=k, replace=False) for _ in range(len(pairs))])  # (P, k)
    ann = ann.ravel()  # (V,)
    pair_idx = np.repeat(np.arange(len(pairs)), k)
    flip = rng.random(ann.shape[0]) < 0.5
    left = np.where(flip, pairs[pair_idx, 1], pairs[pair_idx, 0])
    right = np.where(flip, pairs[pair_idx, 0], pairs[pair_idx, 1])
    p_left = 1 / (1 + np.exp(-(utility[left] - utility[right])))
    kind = kinds[ann]
    p_left = np.where(kind == "random", 0.5, np.where(kind == "left", 1.0, p_left))
    return Votes(ann, left, right, rng.random(ann.shape[0]) < p_left)


def gold_scores(kinds: np.ndarray, n_gold: int, rng: np.random.Generator) -> np.ndarray:
    """(A,) gold pairs answered correctly: clean 95 %, random and always-left 50 %."""
    p = np.where(kinds == "clean", 0.95, 0.5)
    return rng.binomial(n_gold, p)


def excluded_by_rule(correct: np.ndarray, n_gold: int, min_gold_accuracy: float) -> np.ndarray:
    return np.array(
        [
            bool(
                exclusion_reasons(
                    gold_correct=int(c),
                    gold_answered=n_gold,
                    median_latency_ms=float("nan"),
                    timed_votes=0,
                    min_gold_accuracy=min_gold_accuracy,
                )
            )
            for c in correct
        ]
    )


def rating_error(votes: Votes, keep: np.ndarray, strength: np.ndarray) -> tuple[float, bool]:
    m = keep[votes.annotator]
    outcome = np.where(votes.left_won[m], OUTCOME_A, OUTCOME_B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
        fit = fit_bradley_terry(
            aggregate_comparisons(votes.left[m], votes.right[m], outcome, strength.shape[0])
        )
    scores = fit.scores - fit.scores.mean()
    truth = strength - strength.mean()
    return float(np.abs(scores - truth).max()), bool(
        (np.argsort(scores) == np.argsort(truth)).all()
    )


def train_reward(features: np.ndarray, votes: Votes, keep: np.ndarray, l2: float) -> np.ndarray:
    """Logistic regression of the winner on x_left − x_right, no intercept: (D,) weights."""
    m = keep[votes.annotator]
    diff = features[votes.left[m]] - features[votes.right[m]]  # (V, D)
    y = votes.left_won[m].astype(np.float64)  # (V,)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diff @ w
        p = 1 / (1 + np.exp(-z))
        nll = np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * w @ w
        return float(nll), diff.T @ (p - y) + l2 * w

    return optimize.minimize(loss, np.zeros(features.shape[1]), jac=True, method="L-BFGS-B").x


def reward_accuracy(w: np.ndarray, features: np.ndarray, utility: np.ndarray, tol: float,
                    rng: np.random.Generator, n_pairs: int = 4000) -> float:  # fmt: skip
    a, b = rng.integers(0, features.shape[0], size=(2, n_pairs))
    gap = utility[a] - utility[b]
    keep = np.abs(gap) > tol  # perceptible differences only
    predicted = (features[a] - features[b]) @ w
    return float(np.mean(np.sign(predicted[keep]) == np.sign(gap[keep])))


def run(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    kinds = annotator_kinds(args.annotators, rng)
    correct = gold_scores(kinds, args.gold, rng)
    rules = {
        "clean": kinds == "clean",
        "all votes": np.ones_like(kinds, dtype=bool),
        "reliability": ~excluded_by_rule(correct, args.gold, args.min_gold_accuracy),
    }
    # Ratings: models of known strength, every pair of models compared on many prompts.
    strength = np.linspace(0.0, 1.2, args.models)
    model_pairs = np.array([(i, j) for i in range(args.models) for j in range(i + 1, args.models)])
    eval_pairs = np.repeat(model_pairs, args.eval_pairs // len(model_pairs), axis=0)
    eval_votes = simulate(strength, eval_pairs, kinds, args.k, rng)
    # Reward model: images with features, utility linear in them.
    dim = 16
    w_true = rng.normal(size=dim)
    w_true *= 2.0 / np.linalg.norm(w_true)
    train_x = rng.normal(size=(args.images, dim))
    test_x = rng.normal(size=(args.images, dim))
    train_pairs = rng.integers(0, args.images, size=(args.train_pairs, 2))
    train_pairs = train_pairs[train_pairs[:, 0] != train_pairs[:, 1]]
    train_votes = simulate(train_x @ w_true, train_pairs, kinds, args.k, rng)
    out = {}
    for name, keep in rules.items():
        err, order_ok = rating_error(eval_votes, keep, strength)
        w = train_reward(train_x, train_votes, keep, l2=1.0)
        acc = reward_accuracy(w, test_x, test_x @ w_true, args.tolerance, rng)
        out[name] = {
            "rating_err": err,
            "order_ok": float(order_ok),
            "reward_acc": acc,
            "kept_random": float(np.sum(keep & (kinds == "random"))),
            "kept_left": float(np.sum(keep & (kinds == "left"))),
            "dropped_clean": float(np.sum(~keep & (kinds == "clean"))),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--k", type=int, default=3, help="votes per pair")
    parser.add_argument("--gold", type=int, default=30, help="gold pairs per annotator")
    parser.add_argument("--min-gold-accuracy", type=float, default=0.7)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--eval-pairs", type=int, default=600)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--train-pairs", type=int, default=600)
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [run(args, seed) for seed in range(args.repeats)]
    print(
        f"{args.annotators} annotators (20 % random, 10 % always-left), k={args.k}, "
        f"{args.gold} gold pairs each, min_gold_accuracy={args.min_gold_accuracy}, "
        f"{args.repeats} seeds; mean [min, max]"
    )
    header = f"{'data':<12} {'rating max err':>22} {'order right':>12} {'reward acc':>22}"
    print(header + f" {'kept bad':>9} {'dropped clean':>14}")
    clean_acc = np.mean([r["clean"]["reward_acc"] for r in runs])
    for name in ("clean", "all votes", "reliability"):
        err = np.array([r[name]["rating_err"] for r in runs])
        acc = np.array([r[name]["reward_acc"] for r in runs])
        order = np.mean([r[name]["order_ok"] for r in runs])
        bad = np.mean([r[name]["kept_random"] + r[name]["kept_left"] for r in runs])
        dropped = np.mean([r[name]["dropped_clean"] for r in runs])
        print(
            f"{name:<12} {err.mean():>8.3f} [{err.min():.3f}, {err.max():.3f}] {order:>12.0%} "
            f"{acc.mean():>8.3f} [{acc.min():.3f}, {acc.max():.3f}] {bad:>9.1f} {dropped:>14.1f}"
        )
    rel_acc = np.mean([r["reliability"]["reward_acc"] for r in runs])
    all_acc = np.mean([r["all votes"]["reward_acc"] for r in runs])
    print(
        f"reward accuracy recovered: reliability {rel_acc / clean_acc:.1%} of clean, "
        f"all votes {all_acc / clean_acc:.1%} (goal ≥ 90 %)"
    )


if __name__ == "__main__":
    main()
