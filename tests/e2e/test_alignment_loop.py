"""Votes improve the model: a reduced alignment loop through the real platform.

Simulated annotators vote through the HTTP API by a pixel preference; the reward model and a
DPO child are trained by a real worker; the child beats its parent on held-out prompts and
seeds, judged by that same preference (`benchmarks/alignment_loop.py` runs the full-size loop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.alignment_loop import (
    METHODS,
    LoopConfig,
    configs_from_args,
    dpo_params,
    judge,
    oracle_ceiling,
    parse_args,
    quick_config,
    run_loop,
    split_prompts,
)
from tests.support import Stack
from worker.toy.preferences import (
    IMAGE_PREFERENCES,
    NO_FOREGROUND,
    PREFERENCES,
    get_preference,
    in_named_cell,
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
    # A one-grey-level brighter copy: below the 2-level tolerance, a tie.
    dark_plus_one = (dark.astype(np.int16) + 1).clip(0, 255).astype(np.uint8)
    prompt = "a red square"
    parent = {(1, 0): (prompt, dark), (1, 1): (prompt, bright), (2, 0): (prompt, dark)}
    child = {(1, 0): (prompt, bright), (1, 1): (prompt, bright), (2, 0): (prompt, dark_plus_one)}
    result = judge(get_preference("brighter"), parent, child)
    c = result.comparison
    assert (c["wins"], c["ties"], c["losses"]) == (1, 2, 0)
    assert c["win_rate"] == pytest.approx(2 / 3) and c["prompts"] == 2
    assert c["class_flip_rate"] == pytest.approx(1 / 3)  # only black -> white changed class
    assert c["score_change"] > 0 and result.fidelity_drop == 0.0
    assert result.cell_share_parent is None  # no prompt names a position
    with pytest.raises(RuntimeError, match="pair up"):
        judge(get_preference("brighter"), parent, {(1, 0): child[(1, 0)]})


def test_judge_reports_the_named_cell_share_and_the_oracle_ceiling() -> None:
    prompt = "a red square at the top left"
    top_left, bottom_right = (
        _scene(horizontal="left", vertical="top"),
        _scene(horizontal="right", vertical="bottom"),
    )
    parent = {(1, s): (prompt, bottom_right) for s in range(4)}
    parent[(1, 4)] = (prompt, top_left)
    child = {(1, s): (prompt, top_left) for s in range(5)}
    pref = get_preference("prompted_position")
    result = judge(pref, parent, child)
    assert result.cell_share_both_axes_parent["value"] == pytest.approx(0.2)  # type: ignore[index]
    assert result.cell_share_both_axes_child["value"] == 1.0  # type: ignore[index]
    assert result.comparison["wins"] == 4 and result.comparison["ties"] == 1
    # Best of 4 parent samples vs one: for the 4 bottom-right baselines the other four hold the
    # top-left one (a win); for the top-left baseline all four others are worse (a loss).
    oracle = oracle_ceiling(pref, parent)
    assert oracle is not None and oracle["value"] == pytest.approx(0.8) and oracle["best_of"] == 4
    assert oracle_ceiling(pref, {k: parent[k] for k in list(parent)[:4]}) is None


def test_held_out_prompts_never_overlap_the_train_prompts() -> None:
    config = LoopConfig(preference="larger", train_prompts=80, test_prompts=40)
    train, test = split_prompts(config)
    assert len(train) == 80 and len(test) == 40
    assert not set(train) & set(test)
    # A prompt-conditional preference only gets prompts that name its attribute.
    prompted = LoopConfig(preference="prompted_position", train_prompts=30, test_prompts=20)
    for text in sum(split_prompts(prompted), []):
        assert in_named_cell(_scene(), text) is not None, text
    with pytest.raises(ValueError):
        LoopConfig(preference="larger", votes=2001)
    with pytest.raises(ValueError, match="methods"):
        LoopConfig(preference="larger", methods=("magic",))


def test_the_battery_covers_every_preference_and_the_planned_methods() -> None:
    configs = configs_from_args(parse_args(["--quick", "--method", "dpo_votes"]))
    assert [c.preference for c in configs] == list(PREFERENCES)
    assert {"prompted_position", "prompted_size"} <= set(PREFERENCES)
    methods = {"dpo_votes", "dpo_votes_reward", "iterative_x3", "best_of_4", "best_of_16", "rl"}
    assert methods <= set(METHODS)
    # Without overrides the loop trains DPO with the job's defaults: the lead's path.
    lead = configs_from_args(parse_args(["--preference", "left"]))[0]
    assert set(dpo_params(lead, 7)) == {"model_id", "seed", "closed_loop"}
    assert configs_from_args(parse_args(["--steps", "5"]))[0].dpo == {"steps": 5}


@pytest.mark.slow
@pytest.mark.long(160)
@pytest.mark.timeout(900)  # a DPO run of the default recipe: 3 min quiet, longer on a busy machine
def test_votes_through_the_api_train_a_child_that_beats_its_parent(tmp_path: Path) -> None:
    config = quick_config(FAST_PREFERENCE)
    with Stack(tmp_path) as stack:
        result = run_loop(stack, config, log=lambda line: None)
    votes = result["votes"]
    assert 0 < votes["votes"] <= config.votes
    method = result["methods"]["dpo_votes"]
    assert method["info"]["pairs"] > 0.8 * votes["votes"]
    c = method["comparison"]
    assert c["n"] == config.test_prompts * config.eval_images_per_prompt
    assert c["prompts"] == config.test_prompts
    # Judged by the preference itself on held-out prompts and seeds, counting only changes
    # beyond the just-noticeable tolerance, with a prompt-clustered interval.
    assert c["ci_low"] > 0.5, result
    assert c["score_change_ci_low"] > 0, result
    assert method["fidelity_drop"] <= 0.05, result
    assert result["reward"]["accuracy"] > 0.6, result
    assert method["oracle_best_of_n"]["value"] > 0.5
    assert method["cpu_minutes"] > 0
