"""Simulated annotator preferences for the toy world: each one a score computed from pixels.

A preference says which of two images of the same prompt a simulated annotator picks: the one
with the higher score. They stand in for human taste in end-to-end runs of the alignment loop,
and the same score judges the result (child vs parent on held-out prompts and seeds), so
"the model learned the preference" is measured without a learned judge.

Every preference scores an RGB uint8 image (H, W, 3) *and its prompt*: `Preference.score(image,
prompt)`. The built-in global preferences (larger, left, brighter, ...) ignore the prompt; the
prompt-conditional ones (prompted_position, prompted_size, prompted_colour) reward the image that
follows what the prompt names, and give every image of a prompt that names nothing about their
attribute the same score (a tie: the annotator has nothing to judge). Images without a foreground
shape get the lowest score wherever the score reads the shape, so a preference never rewards
dropping the object the prompt asks for.

Each preference also carries what makes a difference *perceptible* (`tolerance`, in its score's
units: differences within it are ties for measurement) and a coarse class of its attribute
(`attribute_class`: size class, position cell, background class, ...) so a measurement can say
how often a change is visible as a change of class (`flip`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from worker.toy.world import (
    CELL_CENTRES,
    HORIZONTAL,
    PALETTE_HUES,
    SIZE_AREA,
    VERTICAL,
    _core_pixels,
    extract_area_fraction,
    extract_background,
    extract_box_centre,
    extract_centroid,
    extract_colour,
    extract_hue,
    extract_position,
    extract_shade,
    extract_shape,
    extract_size,
    foreground_mask,
    hue_distance,
    parse_prompt,
    position_cell,
)

Choice = Literal["left", "right", "tie"]
# Below every real score: an image without a foreground loses to any image with one.
NO_FOREGROUND = -1e9
# The score of every image of a prompt that names nothing about a prompted preference's attribute.
UNNAMED = 0.0

ImageScore = Callable[[np.ndarray], float]  # image (H, W, 3) uint8 -> score
PromptScore = Callable[[np.ndarray, str], float]  # (image, prompt) -> score
AttributeClass = Callable[[np.ndarray, str], Hashable]  # (image, prompt) -> class of the attribute

_SIDE = 32  # pixels per side of the toy world's images (tolerances are stated per pixel of it)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of colours (..., 3) in 0–255."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# --- image-only scores -----------------------------------------------------------------------


def score_larger(image: np.ndarray) -> float:
    """Foreground area fraction: the larger shape wins."""
    return extract_area_fraction(image)


def score_left(image: np.ndarray) -> float:
    """Minus the foreground's centroid x (fraction of the width): the shape further left wins."""
    centroid = extract_centroid(image)
    return NO_FOREGROUND if centroid is None else -centroid[0]


def score_centered(image: np.ndarray) -> float:
    """Minus the centroid's distance from the image centre: the more centred shape wins."""
    centroid = extract_centroid(image)
    if centroid is None:
        return NO_FOREGROUND
    return -math.hypot(centroid[0] - 0.5, centroid[1] - 0.5)


def score_brighter(image: np.ndarray) -> float:
    """Mean luma of the whole image over 255 (mostly the background): the brighter image wins."""
    return float(_luminance(image).mean()) / 255.0


def score_darker(image: np.ndarray) -> float:
    """Minus the mean luma over 255: the darker image wins."""
    return -score_brighter(image)


def score_lighter(image: np.ndarray) -> float:
    """Mean luma of the shape's core over 255: the lighter shade of the shape wins."""
    mask = foreground_mask(image)
    if not mask.any():
        return NO_FOREGROUND
    return float(_luminance(_core_pixels(image, mask)).mean()) / 255.0


# --- prompt-conditional scores ---------------------------------------------------------------


def named_cell_targets(prompt: str) -> dict[int, float]:
    """{axis (0 = x, 1 = y): centre of the named cell along it} for the axes the prompt names."""
    spec = parse_prompt(prompt)
    targets: dict[int, float] = {}
    if spec.horizontal is not None:
        targets[0] = CELL_CENTRES[HORIZONTAL.index(spec.horizontal)]
    if spec.vertical is not None:
        targets[1] = CELL_CENTRES[VERTICAL.index(spec.vertical)]
    return targets


def score_prompted_position(image: np.ndarray, prompt: str) -> float:
    """Minus the distance (fraction of the side) of the shape's box centre from the centre of the
    cell the prompt names, on the axes it names: the shape sitting where the prompt says wins.

    The box centre, not the centroid, because it is what `extract_position` (the cell, and so
    `in_named_cell`) reads: the score's optimum lies inside the named cell for every shape.
    """
    targets = named_cell_targets(prompt)
    if not targets:
        return UNNAMED
    centre = extract_box_centre(image)
    if centre is None:
        return NO_FOREGROUND
    return -math.sqrt(sum((centre[axis] - t) ** 2 for axis, t in targets.items()))


def in_named_cell(image: np.ndarray, prompt: str) -> bool | None:
    """Whether the shape sits in the cell the prompt names on every axis it names.

    None when the prompt names no position; False without a foreground. The grammar's "on the
    left" names the horizontal axis only, "at the top left" both.
    """
    spec = parse_prompt(prompt)
    if spec.horizontal is None and spec.vertical is None:
        return None
    cell = extract_position(image)
    if cell is None:
        return False
    return (spec.horizontal is None or cell[0] == spec.horizontal) and (
        spec.vertical is None or cell[1] == spec.vertical
    )


def score_prompted_size(image: np.ndarray, prompt: str) -> float:
    """Minus |log(area / the named size class's area)|: the shape closest to the size named wins."""
    named = parse_prompt(prompt).size
    if named is None:
        return UNNAMED
    area = extract_area_fraction(image)
    if area <= 0:
        return NO_FOREGROUND
    return -abs(math.log(area / SIZE_AREA[named]))


def score_prompted_colour(image: np.ndarray, prompt: str) -> float:
    """Minus the hue distance (degrees) of the shape from the colour named: truer colour wins."""
    named = parse_prompt(prompt).colour
    if named is None:
        return UNNAMED
    hue = extract_hue(image)
    if hue is None:
        return NO_FOREGROUND
    return -hue_distance(hue, PALETTE_HUES[named])


# --- attribute classes (for the class-flip rate) ---------------------------------------------


def _size_class(image: np.ndarray, prompt: str) -> Hashable:
    return extract_size(image)


def _horizontal_class(image: np.ndarray, prompt: str) -> Hashable:
    centre = extract_box_centre(image)
    return None if centre is None else position_cell(centre[0], HORIZONTAL)


def _cell_class(image: np.ndarray, prompt: str) -> Hashable:
    return extract_position(image)


def _background_class(image: np.ndarray, prompt: str) -> Hashable:
    return extract_background(image)


def _shade_class(image: np.ndarray, prompt: str) -> Hashable:
    return extract_shade(image)


def _named_cell_class(image: np.ndarray, prompt: str) -> Hashable:
    """The cell on the axes the prompt names (None where it names none)."""
    spec = parse_prompt(prompt)
    if spec.horizontal is None and spec.vertical is None:
        return None
    cell = extract_position(image)
    if cell is None:
        return "no foreground"
    return (
        cell[0] if spec.horizontal is not None else None,
        cell[1] if spec.vertical is not None else None,
    )


def _named_size_class(image: np.ndarray, prompt: str) -> Hashable:
    return None if parse_prompt(prompt).size is None else extract_size(image)


def _named_colour_class(image: np.ndarray, prompt: str) -> Hashable:
    return None if parse_prompt(prompt).colour is None else extract_colour(image)


# --- the preferences -------------------------------------------------------------------------

# Just-noticeable differences, in each score's units. A difference within the tolerance is not
# one an annotator (or a reader of the images) could see, so measurements count it as a tie.
# - Brightness (global mean luma / 255): 2 grey levels. The mean runs over 1 024 pixels, so
#   sampling noise on it is far below a level; 2 levels is near the smallest step of a uniform
#   field people tell apart on a display.
# - Shape lightness (mean luma of the shape's core, ≈ 20–90 pixels / 255): 4 grey levels, twice
#   the global figure, because a small patch's mean carries more pixel noise and small patches
#   are harder to compare.
# - Position (fractions of the side): one pixel of the 32-pixel image; the mask is pixel-quantised,
#   so anything smaller is not a visible move.
# - Area (fraction of the 1 024-pixel image): 4 pixels, ≈ 9 % of the smallest shape (46 px), the
#   Weber fraction for area, and above the 1–2 pixel jitter of the mask on blurred output.
# - Log-area for prompted size: 0.05 (a 5 % area change), the same Weber reasoning on the ratio.
# - Hue for prompted colour: 3 degrees, about the hue discrimination threshold for saturated
#   colours and below the renderer's own colour jitter (±12 per channel, ≈ ±5°).
GREY_LEVEL = 1.0 / 255.0
PIXEL = 1.0 / _SIDE
TOL_LUMA = 2 * GREY_LEVEL
TOL_SHADE = 4 * GREY_LEVEL
TOL_POSITION = PIXEL
TOL_AREA = 4 * PIXEL * PIXEL
TOL_LOG_AREA = 0.05
TOL_HUE = 3.0


def _image_only(fn: ImageScore) -> PromptScore:
    def score(image: np.ndarray, prompt: str) -> float:
        return fn(image)

    score.__name__ = fn.__name__
    score.__doc__ = fn.__doc__
    return score


@dataclass(frozen=True)
class Preference:
    """A simulated annotator's taste: of two images of one prompt, the higher `score` is preferred.

    `tolerance`: the just-noticeable difference in score units (see above); `attribute_class`:
    the visible class of the attribute the score reads; `prompted`: the score reads the prompt;
    `mention`: prompt-attribute mention probabilities (`worker.toy.world.sample_spec`) that make
    every sampled prompt name what a prompted preference judges.
    """

    name: str
    description: str
    scorer: PromptScore  # (image (H, W, 3) uint8, prompt) -> score, higher is preferred
    tolerance: float
    attribute_class: AttributeClass
    prompted: bool = False
    mention: dict[str, float] = field(default_factory=dict)

    def score(self, image: np.ndarray, prompt: str) -> float:
        """The score of an image generated for `prompt`."""
        return float(self.scorer(image, prompt))

    def choose(
        self,
        left: np.ndarray,
        right: np.ndarray,
        rng: np.random.Generator,
        flip_noise: float = 0.0,
        tie_tol: float = 0.0,
        prompt: str = "",
    ) -> Choice:
        """The vote on (left, right) of `prompt`; a decisive vote is reversed with flip_noise."""
        return vote_from_scores(
            self.score(left, prompt), self.score(right, prompt), rng, flip_noise, tie_tol
        )

    def klass(self, image: np.ndarray, prompt: str) -> Hashable:
        """The visible class of the attribute (size class, cell, background, ...)."""
        return self.attribute_class(image, prompt)

    def flip(self, image_a: np.ndarray, image_b: np.ndarray, prompt: str) -> bool:
        """Whether the attribute's class differs between two images of `prompt`."""
        return self.klass(image_a, prompt) != self.klass(image_b, prompt)


def vote_from_scores(
    left: float,
    right: float,
    rng: np.random.Generator,
    flip_noise: float = 0.0,
    tie_tol: float = 0.0,
) -> Choice:
    """left/right for the higher score, tie within tie_tol; decisive votes flip with flip_noise."""
    if not 0.0 <= flip_noise <= 1.0:
        raise ValueError(f"flip_noise must be in [0, 1], got {flip_noise}")
    if abs(left - right) <= tie_tol:
        return "tie"
    choice: Choice = "left" if left > right else "right"
    if flip_noise > 0 and rng.random() < flip_noise:
        choice = "right" if choice == "left" else "left"
    return choice


PREFERENCES: dict[str, Preference] = {
    p.name: p
    for p in (
        Preference(
            "larger", "the larger shape wins", _image_only(score_larger), TOL_AREA, _size_class
        ),
        Preference(
            "left",
            "the shape further left wins",
            _image_only(score_left),
            TOL_POSITION,
            _horizontal_class,
        ),
        Preference(
            "centered",
            "the shape closer to the centre wins",
            _image_only(score_centered),
            TOL_POSITION,
            _cell_class,
        ),
        Preference(
            "brighter",
            "the brighter image (mostly background) wins",
            _image_only(score_brighter),
            TOL_LUMA,
            _background_class,
        ),
        Preference(
            "darker",
            "the darker image (mostly background) wins",
            _image_only(score_darker),
            TOL_LUMA,
            _background_class,
        ),
        Preference(
            "lighter",
            "the lighter shade of the shape wins",
            _image_only(score_lighter),
            TOL_SHADE,
            _shade_class,
        ),
        Preference(
            "prompted_position",
            "the shape sitting in the cell the prompt names wins",
            score_prompted_position,
            TOL_POSITION,
            _named_cell_class,
            prompted=True,
            mention={"position": 1.0},
        ),
        Preference(
            "prompted_size",
            "the shape closest to the size the prompt names wins",
            score_prompted_size,
            TOL_LOG_AREA,
            _named_size_class,
            prompted=True,
            mention={"size": 1.0},
        ),
        Preference(
            "prompted_colour",
            "the shape closest in hue to the colour the prompt names wins",
            score_prompted_colour,
            TOL_HUE,
            _named_colour_class,
            prompted=True,
            mention={"colour": 1.0},
        ),
    )
}
# The preferences that ignore the prompt (a function of the pixels alone).
IMAGE_PREFERENCES: tuple[str, ...] = tuple(n for n, p in PREFERENCES.items() if not p.prompted)
PROMPTED_PREFERENCES: tuple[str, ...] = tuple(n for n, p in PREFERENCES.items() if p.prompted)


def get_preference(name: str) -> Preference:
    """The built-in preference called `name` (ValueError listing the names otherwise)."""
    try:
        return PREFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown preference {name!r}; known: {', '.join(PREFERENCES)}") from None


@dataclass(frozen=True)
class Fidelity:
    """How often images show the colour and shape their prompts name."""

    colour: float  # hit rate over images whose prompt names a colour
    shape: float  # hit rate over images whose prompt names a shape
    both: float  # hit rate over all (image, named colour or shape) checks
    checks: int  # number of such checks

    def as_dict(self) -> dict[str, float | int]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "both": self.both,
            "checks": self.checks,
        }


def prompt_fidelity(prompts: Sequence[str], images: Sequence[np.ndarray]) -> Fidelity:
    """Colour and shape match rates of images (H, W, 3) against their prompts."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    hits = {"colour": 0, "shape": 0}
    named = {"colour": 0, "shape": 0}
    for prompt, image in zip(prompts, images, strict=True):
        spec = parse_prompt(prompt)
        if spec.colour is not None:
            named["colour"] += 1
            hits["colour"] += extract_colour(image) == spec.colour
        if spec.shape is not None:
            named["shape"] += 1
            hits["shape"] += extract_shape(image) == spec.shape
    checks = named["colour"] + named["shape"]

    def rate(h: int, n: int) -> float:
        return h / n if n else float("nan")

    return Fidelity(
        colour=rate(hits["colour"], named["colour"]),
        shape=rate(hits["shape"], named["shape"]),
        both=rate(hits["colour"] + hits["shape"], checks),
        checks=checks,
    )


__all__ = [
    "IMAGE_PREFERENCES",
    "NO_FOREGROUND",
    "PREFERENCES",
    "PROMPTED_PREFERENCES",
    "UNNAMED",
    "Fidelity",
    "Preference",
    "get_preference",
    "in_named_cell",
    "named_cell_targets",
    "prompt_fidelity",
    "score_brighter",
    "score_centered",
    "score_darker",
    "score_larger",
    "score_left",
    "score_lighter",
    "score_prompted_colour",
    "score_prompted_position",
    "score_prompted_size",
    "vote_from_scores",
]
