"""Votes improve the model: a reduced alignment loop through the real platform.

Simulated annotators vote through the HTTP API by a pixel preference; the reward model and a
DPO child are trained by a real worker; the child beats its parent on held-out prompts and
seeds, judged by that same preference (`benchmarks/alignment_loop.py` runs the full-size loop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.alignment_loop import LoopConfig, judge, quick_config, run_loop, split_prompts
from tests.support import Stack
from worker.toy.preferences import (
    IMAGE_PREFERENCES,
    NO_FOREGROUND,
    get_preference,
    prompt_fidelity,
    vote_from_scores,
)
from worker.toy.world import SceneSpec, render

# The preference the reduced loop learns fastest (see the benchmark's figures).
FAST_PREFERENCE = "brighter"


def _scene(**attrs: str) -> np.ndarray:
    full = {
        "shape": "square",
        "colour": "red",
        "size": "medium",
        "shade": "plain",
        "horizontal": "center",
        "vertical": "middle",
        "background": "gray",
    }
    return render(SceneSpec(**{**full, **attrs}), rng=0)


def test_each_preference_orders_scenes_that_differ_in_its_attribute() -> None:
    pairs = {
        "larger": (_scene(size="large"), _scene(size="small")),
        "left": (_scene(horizontal="left"), _scene(horizontal="right")),
        "centered": (_scene(), _scene(horizontal="left", vertical="top")),
        "brighter": (_scene(background="white"), _scene(background="black")),
        "darker": (_scene(background="black"), _scene(background="white")),
        "lighter": (_scene(shade="light"), _scene(shade="dark")),
    }
    assert set(pairs) == set(IMAGE_PREFERENCES)
    for name, (better, worse) in pairs.items():
        pref = get_preference(name)
        # Image-only preferences read no prompt: any prompt gives the same scores.
        for prompt in ("", "a small blue circle at the top right"):
            assert pref.score(better, prompt) > pref.score(worse, prompt) + pref.tolerance, name
        assert pref.choose(better, worse, np.random.default_rng(0)) == "left", name
        assert pref.choose(worse, better, np.random.default_rng(0)) == "right", name
        assert pref.flip(better, worse, "a red square"), name


def test_an_empty_image_loses_wherever_the_shape_is_read() -> None:
    empty = np.full((32, 32, 3), 128, dtype=np.uint8)
    small = _scene(size="small", horizontal="right")
    for name in ("larger", "left", "centered", "lighter"):
        pref = get_preference(name)
        assert pref.score(empty, "") < pref.score(small, ""), name
    assert get_preference("left").score(empty, "") == NO_FOREGROUND


def test_flip_noise_reverses_decisive_votes_at_its_rate() -> None:
    rng = np.random.default_rng(1)
    votes = [vote_from_scores(2.0, 1.0, rng, flip_noise=0.2) for _ in range(4000)]
    assert abs(votes.count("right") / 4000 - 0.2) < 0.025
    assert vote_from_scores(1.0, 1.0, rng, flip_noise=0.5) == "tie"
    assert vote_from_scores(1.0, 1.05, rng, tie_tol=0.1) == "tie"
    with pytest.raises(ValueError):
        vote_from_scores(1.0, 0.0, rng, flip_noise=1.5)
    with pytest.raises(ValueError, match="known"):
        get_preference("bluer")


def test_fidelity_counts_colour_and_shape_hits() -> None:
    red_square = _scene()
    prompts = ["a red square", "a blue square", "a red circle", "a large shape"]
    fid = prompt_fidelity(prompts, [red_square] * 4)
    # colour named 3 times (2 hits), shape named 3 times (2 hits).
    assert (fid.colour, fid.shape, fid.checks) == (2 / 3, 2 / 3, 6)
    assert fid.both == pytest.approx(4 / 6)


def test_judge_pairs_child_and_parent_by_prompt_and_seed() -> None:
    dark, bright = _scene(background="black"), _scene(background="white")
    parent = {(1, 0): ("a red square", dark), (1, 1): ("a red square", bright)}
    child = {(1, 0): ("a red square", bright), (1, 1): ("a red square", bright)}
    result = judge(get_preference("brighter"), parent, child)
    assert (result.win["wins"], result.win["ties"], result.win["losses"]) == (1, 1, 0)
    assert result.win["win_rate"] == 0.75 and result.fidelity_drop == 0.0
    with pytest.raises(RuntimeError, match="pair up"):
        judge(get_preference("brighter"), parent, {(1, 0): child[(1, 0)]})


def test_held_out_prompts_never_overlap_the_train_prompts() -> None:
    config = LoopConfig(preference="larger", train_prompts=80, test_prompts=40)
    train, test = split_prompts(config)
    assert len(train) == 80 and len(test) == 40
    assert not set(train) & set(test)
    with pytest.raises(ValueError):
        LoopConfig(preference="larger", votes=2001)


@pytest.mark.slow
def test_votes_through_the_api_train_a_child_that_beats_its_parent(tmp_path: Path) -> None:
    config = quick_config(FAST_PREFERENCE)
    with Stack(tmp_path) as stack:
        result = run_loop(stack, config, log=lambda line: None)
    votes = result["votes"]
    assert 0 < votes["votes"] <= config.votes
    assert result["dpo"]["pairs"] > 0.8 * votes["votes"]
    win = result["win_rate"]
    assert win["n"] == config.test_prompts * len(config.eval_seeds)
    # Judged by the preference itself on held-out prompts and seeds.
    assert win["ci_low"] > 0.5, result
    assert result["fidelity_drop"] <= 0.05, result
    assert result["reward"]["val_accuracy"] > 0.6, result
