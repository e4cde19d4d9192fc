"""Simulated preferences: the uniform (image, prompt) interface, prompt-conditional scores against
hand-computed values, just-noticeable tolerances and attribute classes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.toy.preferences import (
    IMAGE_PREFERENCES,
    NO_FOREGROUND,
    PREFERENCES,
    PROMPTED_PREFERENCES,
    UNNAMED,
    get_preference,
    in_named_cell,
    named_cell_targets,
    score_prompted_colour,
    score_prompted_position,
    score_prompted_size,
)
from worker.toy.world import PALETTE, PALETTE_HUES, SceneSpec, hue_distance, render


def _block(x0: int, y0: int, side: int, colour: str = "red", bg: int = 128) -> np.ndarray:
    """A (32, 32, 3) grey image with a solid side × side block of a palette colour at (x0, y0)."""
    image = np.full((32, 32, 3), bg, dtype=np.uint8)
    image[y0 : y0 + side, x0 : x0 + side] = PALETTE[colour]
    return image


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


EMPTY = np.full((32, 32, 3), 128, dtype=np.uint8)


def test_prompted_position_is_minus_the_distance_to_the_named_cell_centre() -> None:
    # Block over pixels 2..9 on both axes: box centre (2 + 10) / 2 / 32 = 0.1875 on each axis;
    # the top-left cell's centre is (0.5 - 0.08) / 2 = 0.21 on each axis.
    image = _block(2, 2, 8)
    both = score_prompted_position(image, "a red square at the top left")
    assert both == pytest.approx(-math.sqrt(2) * (0.21 - 0.1875))
    # "on the left" names the horizontal axis only: the distance along x alone.
    assert score_prompted_position(image, "a red square on the left") == pytest.approx(
        -(0.21 - 0.1875)
    )
    # Right cell's centre (1.5 + 0.08) / 2 = 0.79.
    assert score_prompted_position(image, "a red square on the right") == pytest.approx(
        -(0.79 - 0.1875)
    )
    assert named_cell_targets("a red square at the bottom") == {1: pytest.approx(0.79)}
    assert named_cell_targets("a red square") == {}


def test_prompted_position_prefers_the_named_cell_and_ties_without_a_position() -> None:
    pref = get_preference("prompted_position")
    top_left, bottom_right = _scene(horizontal="left", vertical="top"), _scene(
        horizontal="right", vertical="bottom"
    )
    rng = np.random.default_rng(0)
    prompt = "a red square at the top left"
    assert pref.choose(top_left, bottom_right, rng, prompt=prompt) == "left"
    assert pref.choose(top_left, bottom_right, rng, prompt="a red square at the bottom right") == (
        "right"
    )
    # No position named: every image scores the same, even one without a shape.
    for image in (top_left, bottom_right, EMPTY):
        assert pref.score(image, "a red square") == UNNAMED
    assert pref.choose(top_left, bottom_right, rng, prompt="a red square") == "tie"
    assert pref.choose(top_left, bottom_right, rng) == "tie"  # the default prompt names nothing
    assert pref.score(EMPTY, prompt) == NO_FOREGROUND
    assert pref.flip(top_left, bottom_right, prompt)
    assert not pref.flip(top_left, _scene(horizontal="left", vertical="top", size="small"), prompt)


def test_in_named_cell_checks_every_named_axis() -> None:
    top_left = _scene(horizontal="left", vertical="top")
    bottom_left = _scene(horizontal="left", vertical="bottom")
    assert in_named_cell(top_left, "a red square at the top left") is True
    assert in_named_cell(bottom_left, "a red square at the top left") is False
    # Only the horizontal axis named: both rows count.
    assert in_named_cell(top_left, "a red square on the left") is True
    assert in_named_cell(bottom_left, "a red square on the left") is True
    assert in_named_cell(top_left, "a red square on the right") is False
    assert in_named_cell(_scene(), "a red square in the center") is True
    assert in_named_cell(top_left, "a red square") is None
    assert in_named_cell(EMPTY, "a red square on the left") is False


def test_prompted_size_is_minus_the_log_area_ratio_to_the_named_class() -> None:
    image = _block(5, 5, 10)  # 100 of 1 024 pixels
    area = 100 / 1024
    assert score_prompted_size(image, "a medium red square") == pytest.approx(
        -abs(math.log(area / 0.10))
    )
    assert score_prompted_size(image, "a large red square") == pytest.approx(
        -abs(math.log(area / 0.18))
    )
    assert score_prompted_size(image, "a red square") == UNNAMED
    assert score_prompted_size(EMPTY, "a small red square") == NO_FOREGROUND
    pref = get_preference("prompted_size")
    small, large = _scene(size="small"), _scene(size="large")
    assert pref.choose(small, large, np.random.default_rng(0), prompt="a small square") == "left"
    assert pref.choose(small, large, np.random.default_rng(0), prompt="a large square") == "right"
    assert pref.flip(small, large, "a large square")
    assert not pref.flip(small, large, "a red square")  # size not named: no class to change


def test_prompted_colour_is_minus_the_hue_distance_to_the_named_colour() -> None:
    red = _block(5, 5, 10, "red")
    assert score_prompted_colour(red, "a red square") == pytest.approx(0.0, abs=1e-9)
    expected = -hue_distance(PALETTE_HUES["red"], PALETTE_HUES["blue"])
    assert score_prompted_colour(red, "a blue square") == pytest.approx(expected)
    assert -180.0 <= expected < -90.0  # red and blue are far apart on the hue circle
    assert score_prompted_colour(red, "a large square") == UNNAMED
    assert score_prompted_colour(EMPTY, "a red square") == NO_FOREGROUND
    pref = get_preference("prompted_colour")
    blue = _block(5, 5, 10, "blue")
    assert pref.choose(red, blue, np.random.default_rng(0), prompt="a blue circle") == "right"
    assert pref.flip(red, blue, "a blue circle")


def test_tolerances_are_the_stated_just_noticeable_differences() -> None:
    assert get_preference("brighter").tolerance == pytest.approx(2 / 255)
    assert get_preference("darker").tolerance == pytest.approx(2 / 255)
    assert get_preference("left").tolerance == pytest.approx(1 / 32)
    assert get_preference("prompted_position").tolerance == pytest.approx(1 / 32)
    assert get_preference("larger").tolerance == pytest.approx(4 / 1024)
    for name, pref in PREFERENCES.items():
        assert pref.tolerance > 0, name
    # A one-grey-level change of the whole image is below the brightness tolerance; three are not.
    pref = get_preference("brighter")
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert abs(pref.score(grey + 1, "") - pref.score(grey, "")) < pref.tolerance
    assert abs(pref.score(grey + 3, "") - pref.score(grey, "")) > pref.tolerance
    # A one-pixel move of the shape is at the position tolerance.
    left = get_preference("left")
    moved = left.score(_block(4, 5, 8), "") - left.score(_block(5, 5, 8), "")
    assert moved == pytest.approx(left.tolerance)


def test_every_preference_scores_and_classes_any_image_and_prompt() -> None:
    assert set(IMAGE_PREFERENCES) | set(PROMPTED_PREFERENCES) == set(PREFERENCES)
    assert len(PROMPTED_PREFERENCES) >= 2
    image = _scene(horizontal="left")
    for name, pref in PREFERENCES.items():
        for prompt in ("", "a small dark blue circle at the top right on a black background"):
            assert math.isfinite(pref.score(image, prompt)), name
            pref.klass(image, prompt)
            pref.klass(EMPTY, prompt)
            assert not pref.flip(image, image, prompt), name
        assert pref.prompted == (name in PROMPTED_PREFERENCES)
        assert pref.prompted == bool(pref.mention), name
    with pytest.raises(ValueError, match="known"):
        get_preference("bluer")
