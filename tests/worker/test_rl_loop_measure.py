"""The RL benchmark's measurement: preference scores as it calls them, the position share,
clustered CI."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.rl_loop import (
    clustered_win_rate,
    image_seed,
    named_cell,
    position_share,
    reward_kl_curve,
    scorer_for,
)
from worker.toy.preferences import PREFERENCES
from worker.toy.world import SceneSpec, render


def _at(horizontal: str, vertical: str) -> np.ndarray:
    spec = SceneSpec("square", "red", "medium", "plain", horizontal, vertical, "gray")
    return render(spec, rng=0)


def test_named_cell_reads_both_axes_and_defaults_the_unnamed_one_to_the_middle() -> None:
    assert named_cell("a red square at the top left") == ("left", "top")
    assert named_cell("a red square on the right") == ("right", "middle")
    assert named_cell("a red square at the bottom") == ("center", "bottom")
    assert named_cell("a red square") is None


def test_prompted_position_prefers_the_named_cell() -> None:
    # The benchmark's scorer takes (prompt, image): the preference's own score, reordered.
    score_prompted_position = scorer_for("prompted_position")
    prompt = "a red square at the top left"
    there, elsewhere = _at("left", "top"), _at("right", "bottom")
    assert score_prompted_position(prompt, there) > score_prompted_position(prompt, elsewhere)
    other = "a red square at the bottom right"
    assert score_prompted_position(other, elsewhere) > score_prompted_position(other, there)
    assert position_share([prompt, prompt], [there, elsewhere]) == 0.5
    # The two cells differ far beyond the just-noticeable tolerance (1 px of 32).
    gap = score_prompted_position(prompt, there) - score_prompted_position(prompt, elsewhere)
    assert gap > 10 * PREFERENCES["prompted_position"].tolerance


def test_clustered_interval_is_wider_when_outcomes_cluster_by_prompt() -> None:
    # 20 prompts × 10 images: either every image of a prompt agrees, or they are mixed.
    clustered = np.repeat(np.tile([1.0, 0.0], 10), 10)  # (200,)
    mixed = np.tile([1.0, 0.0], 100)  # (200,)
    prompts = [f"p{i // 10}" for i in range(200)]
    a = clustered_win_rate(clustered, prompts, seed=0)
    b = clustered_win_rate(mixed, prompts, seed=0)
    assert a["win_rate"] == b["win_rate"] == 0.5
    assert a["prompts"] == 20 and a["n"] == 200 and a["wins"] == 100
    assert b["ci_high"] - b["ci_low"] < 1e-9  # every prompt has rate 0.5: no spread
    assert a["ci_high"] - a["ci_low"] > 0.3


def test_training_seeds_differ_across_prompts() -> None:
    seeds = {image_seed(f"prompt {p}", i) for p in range(50) for i in range(6)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)


def test_reward_kl_curve_by_hand() -> None:
    run = {
        "history": [
            {"step": 1, "kl": 0.0, "reward_std": 2.0, "reward_mean": 0.0},
            {"step": 2, "kl": 0.2, "reward_std": 1.0, "reward_mean": 0.0},
            {"step": 3, "kl": 0.4, "reward_std": 1.0, "reward_mean": 0.0},
        ],
        "probes": [{"step": 0, "reward": 1.0}, {"step": 2, "reward": 2.0},
                   {"step": 3, "reward": 3.0}],
    }  # fmt: skip
    kl, gain = reward_kl_curve(run)
    np.testing.assert_allclose(kl, [0.0, 0.1, 0.4])
    np.testing.assert_allclose(gain, [0.0, 0.5, 1.0])


@pytest.mark.parametrize("name", sorted(PREFERENCES))
def test_the_benchmark_scores_every_preference_as_the_preference_does(name: str) -> None:
    image, prompt = _at("left", "top"), "a large red square at the top left"
    assert scorer_for(name)(prompt, image) == PREFERENCES[name].score(image, prompt)
