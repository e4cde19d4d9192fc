"""Pure parts of reward amplification, best-of-N and the loop's stopping rule (hand-computed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image as PILImage

from worker.best_of import best_candidates, iter_best_of
from worker.best_of import candidate_seeds as best_of_seeds
from worker.generation import GeneratorSpec, SamplingPolicy, sampling_free_params
from worker.pairs_source import (
    RewardPairsConfig,
    candidate_seeds,
    margin_pairs,
    reward_pairs,
    uses_reward,
    uses_votes,
)
from worker.tasks.loop import RoundCheck, eval_seeds, stop_reason


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- margin-filtered pairs -------------------------------------------------------------------


def test_margin_pairs_best_vs_worst_then_inner_ranks() -> None:
    scores = np.array([[1.0, 3.0, 0.0, 2.0]])
    # Ranked 1 (3.0), 3 (2.0), 0 (1.0), 2 (0.0): best-vs-worst is (1, 2), margin 3.
    one = margin_pairs(scores, pairs_per_prompt=1, threshold=0.5001)
    assert [(p.row, p.winner, p.loser) for p in one] == [(0, 1, 2)]
    assert one[0].margin == 3.0
    assert one[0].p == pytest.approx(sigmoid(3.0)) == pytest.approx(0.9525741)
    # Two pairs per prompt: then (3, 0), margin 1, P = 0.7310586.
    two = margin_pairs(scores, pairs_per_prompt=2, threshold=0.7)
    assert [(p.winner, p.loser) for p in two] == [(1, 2), (3, 0)]
    assert two[1].p == pytest.approx(0.7310586)
    # The threshold drops the inner pair: σ(1) < 0.75 ≤ σ(3).
    assert [
        (p.winner, p.loser) for p in margin_pairs(scores, pairs_per_prompt=2, threshold=0.75)
    ] == [(1, 2)]
    assert margin_pairs(scores, pairs_per_prompt=2, threshold=0.96) == []


def test_margin_pairs_rows_ties_and_odd_counts() -> None:
    scores = np.array([[0.5, 0.5], [5.0, 1.0], [2.0, 2.0]])
    kept = margin_pairs(scores, pairs_per_prompt=3, threshold=0.5)
    # Equal scores give P = 0.5 and no preference: never a pair.
    assert [(p.row, p.winner, p.loser) for p in kept] == [(1, 0, 1)]
    # Three candidates make one disjoint pair (the middle one sits out).
    odd = margin_pairs(np.array([[5.0, 1.0, 3.0]]), pairs_per_prompt=2, threshold=0.6)
    assert [(p.winner, p.loser, p.margin) for p in odd] == [(0, 1, 4.0)]
    with pytest.raises(ValueError, match="threshold"):
        margin_pairs(scores, pairs_per_prompt=1, threshold=0.4)
    with pytest.raises(ValueError, match="shape"):
        margin_pairs(np.zeros(3), pairs_per_prompt=1, threshold=0.6)


def test_candidate_seeds_are_fresh_per_prompt_and_seed_and_reproducible() -> None:
    a = candidate_seeds("a red circle", 0, 8)
    assert a == candidate_seeds("a red circle", 0, 8)
    # Above every stored image's (32-bit) seed, below a torch generator's limit.
    assert len(set(a)) == 8 and all(2**31 <= s < 2**63 for s in a)
    assert not set(a) & set(candidate_seeds("a blue square", 0, 8))
    assert not set(a) & set(candidate_seeds("a red circle", 1, 8))
    # None of the small seeds that generate jobs use by default.
    assert not set(a) & set(range(1000))
    assert candidate_seeds("a red circle", 0, 3) == a[:3]


def test_data_sources() -> None:
    assert (uses_votes("votes"), uses_reward("votes")) == (True, False)
    assert (uses_votes("reward"), uses_reward("reward")) == (False, True)
    assert (uses_votes("votes+reward"), uses_reward("votes+reward")) == (True, True)


def _grey(value: int) -> PILImage.Image:
    return PILImage.new("RGB", (4, 4), (value, value, value))


def test_reward_pairs_pairs_the_best_and_worst_sample_of_each_prompt() -> None:
    values = {}

    def generate(prompts: list[str], seeds: list[int]) -> list[PILImage.Image]:
        # Candidate k of prompt "p<i>" is a flat grey of level 10 * i + 3 * k (prompt p1's all
        # equal, so its margin is 0).
        out = []
        for index, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            k = index % 4
            level = 0 if prompt == "p1" else 10 * int(prompt[1:]) + 3 * k
            values[seed] = level
            out.append(_grey(level))
        return out

    def score(prompts: list[str], images: list[np.ndarray]) -> np.ndarray:
        return np.array([img.mean() for img in images])  # (N,)

    config = RewardPairsConfig(reward_model_id=7, candidates=4, threshold=0.9)
    pairs, stats = reward_pairs(generate, score, ["p2", "p1", "p3"], config, batch_prompts=2)
    # p2: levels 20, 23, 26, 29 → best 29 vs worst 20 (σ(9) ≈ 0.9999); p1: no margin.
    assert [
        (p.prompt, np.asarray(p.winner)[0, 0, 0], np.asarray(p.loser)[0, 0, 0]) for p in pairs
    ] == [
        ("p2", 29, 20),
        ("p3", 39, 30),
    ]
    assert all(p.label == 1.0 for p in pairs)
    assert stats["pairs"] == 2 and stats["pairs_considered"] == 3 and stats["prompts"] == 3
    assert stats["reward_model_id"] == 7 and stats["threshold"] == 0.9
    assert stats["mean_margin"] == 9.0
    assert len(values) == 12  # every candidate its own seed


# --- best-of-N -------------------------------------------------------------------------------


def test_best_candidates_first_maximum_per_row() -> None:
    scores = np.array([[0.1, 0.9, 0.3], [2.0, 2.0, 1.0], [-1.0, -3.0, -0.5]])
    assert best_candidates(scores).tolist() == [1, 0, 2]
    with pytest.raises(ValueError):
        best_candidates(np.zeros(3))


def test_best_of_seeds_start_with_the_requested_seed() -> None:
    seeds = best_of_seeds(5, 4)
    assert seeds[0] == 5 and len(set(seeds)) == 4 and seeds == best_of_seeds(5, 4)
    assert all(2**31 <= s < 2**63 for s in seeds[1:])
    assert best_of_seeds(5, 1) == [5]
    assert not set(seeds[1:]) & set(best_of_seeds(6, 4))


def test_iter_best_of_keeps_the_highest_reward_per_request() -> None:
    calls = []

    def generate(items: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
        calls.append(len(items))
        for prompt, seed in items:
            yield prompt, seed, _grey(seed % 251)

    def score(prompts: list[str], images: list[np.ndarray]) -> np.ndarray:
        return np.array([float(img[0, 0, 0]) for img in images])

    items = [("a", 1), ("b", 2), ("c", 3)]
    out = list(iter_best_of(generate, score, items, 3, requests_per_round=2))
    assert [(p, s) for p, s, _, _ in out] == items
    assert calls == [6, 3]
    for _, seed, image, choice in out:
        levels = [s % 251 for s in best_of_seeds(seed, 3)]
        assert choice["seeds"] == best_of_seeds(seed, 3)
        assert choice["scores"] == [float(v) for v in levels]
        assert choice["chosen"] == int(np.argmax(levels))
        assert np.asarray(image)[0, 0, 0] == max(levels)


def test_iter_best_of_stops_with_the_generator() -> None:
    def generate(items: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
        for prompt, seed in items[:4]:  # cancelled after 4 candidates: one request complete
            yield prompt, seed, _grey(1)

    out = list(iter_best_of(generate, lambda p, i: np.zeros(len(p)), [("a", 1), ("b", 2)], 3))
    assert [(p, s) for p, s, _, _ in out] == [("a", 1)]


def test_sampling_policy_is_not_part_of_the_generator_spec() -> None:
    params = {"steps": 8, "best_of": 4, "reward_model_id": 3}
    assert sampling_free_params(params) == {"steps": 8}
    assert GeneratorSpec.from_params("toy", None, params) == GeneratorSpec(base="toy", steps=8)
    policy = SamplingPolicy.from_params(params)
    assert (policy.best_of, policy.reward_model_id, policy.active) == (4, 3, True)
    assert not SamplingPolicy.from_params({"steps": 8}).active
    with pytest.raises(ValueError):
        SamplingPolicy(best_of=0)


# --- the loop's stopping rule ----------------------------------------------------------------


def test_stop_reason() -> None:
    improving = RoundCheck(reward_reference=0.10, reward_child=0.25, fidelity_child=0.97)
    assert improving.gain == pytest.approx(0.15)
    assert stop_reason(improving, 0.98, min_reward_gain=0.0, max_fidelity_drop=0.02) is None
    # Gain 0.15 is not above a required 0.2.
    assert "stopped improving" in str(
        stop_reason(improving, 0.98, min_reward_gain=0.2, max_fidelity_drop=0.02)
    )
    flat = RoundCheck(0.3, 0.3, 0.98)
    assert "stopped improving" in str(
        stop_reason(flat, 0.98, min_reward_gain=0.0, max_fidelity_drop=0.02)
    )
    # 0.98 → 0.95 is a 0.03 drop: more than 0.02.
    worse = RoundCheck(0.1, 0.2, 0.95)
    assert "fidelity dropped 0.030" in str(
        stop_reason(worse, 0.98, min_reward_gain=0.0, max_fidelity_drop=0.02)
    )
    # Without a fidelity measure (not a toy model) only the reward decides.
    assert (
        stop_reason(RoundCheck(0.1, 0.2, None), None, min_reward_gain=0.0, max_fidelity_drop=0.0)
        is None
    )


def test_eval_seeds_are_disjoint_from_training_streams() -> None:
    from worker.seeds import prompt_seeds, seed_domain

    seeds = eval_seeds(12, 4)
    assert seeds == eval_seeds(12, 4) and len(set(seeds)) == 4
    assert all(seed_domain(s) == "eval" for s in seeds)
    assert not set(seeds) & set(prompt_seeds(12, 64, "train"))
    assert not set(seeds) & set(candidate_seeds("x", 0, 64))


# --- the lead's path: train_loop's defaults ----------------------------------------------------


def test_train_loop_defaults_are_the_documented_recipe() -> None:
    from app.jobs.kinds import TrainDPOParams, TrainLoopParams
    from worker.tasks.loop import dpo_fields

    loop = TrainLoopParams(model_id=1)
    # README "Amplifying votes": 3 rounds of votes + reward-labelled pairs, best vs worst of 8,
    # P ≥ 0.75; stop on no held-out reward gain or a fidelity drop above 2 points.
    assert (loop.rounds, loop.data, loop.retrain_reward) == (3, "votes+reward", True)
    assert (loop.reward_candidates, loop.reward_pairs_per_prompt) == (8, 1)
    assert (loop.reward_threshold, loop.min_reward_gain, loop.max_fidelity_drop) == (
        0.75,
        0.0,
        0.02,
    )
    # Every DPO setting of a round is train_dpo's own default (one recipe, defined once).
    dpo = TrainDPOParams(model_id=1).model_dump(mode="json")
    rounds = dpo_fields(loop)
    assert set(rounds) == set(dpo)
    assert {k: v for k, v in rounds.items() if k != "data"} == {
        k: v for k, v in dpo.items() if k != "data"
    }
