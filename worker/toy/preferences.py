"""Simulated annotator preferences for the toy world: each one a score computed from pixels.

A preference says which of two images of the same prompt a simulated annotator picks: the one
with the higher score. They stand in for human taste in end-to-end runs of the alignment loop,
and the same score judges the result (child vs parent on held-out prompts and seeds), so
"the model learned the preference" is measured without a learned judge.

Every score is a plain function of an RGB uint8 image (H, W, 3). Images without a foreground
shape get the lowest score wherever the score reads the shape, so a preference never rewards
dropping the object the prompt asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.toy.world import (
    _core_pixels,
    extract_area_fraction,
    extract_centroid,
    extract_colour,
    extract_shape,
    foreground_mask,
    parse_prompt,
)

Choice = Literal["left", "right", "tie"]
# Below every real score: an image without a foreground loses to any image with one.
NO_FOREGROUND = -1e9


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of colours (..., 3) in 0–255."""
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


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


@dataclass(frozen=True)
class Preference:
    """A simulated annotator's taste: the image with the higher `score` is preferred."""

    name: str
    description: str
    score: Callable[[np.ndarray], float]

    def choose(
        self,
        left: np.ndarray,
        right: np.ndarray,
        rng: np.random.Generator,
        flip_noise: float = 0.0,
        tie_tol: float = 0.0,
    ) -> Choice:
        """The vote on (left, right); a decisive vote is reversed with probability flip_noise."""
        return vote_from_scores(self.score(left), self.score(right), rng, flip_noise, tie_tol)


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
        Preference("larger", "the larger shape wins", score_larger),
        Preference("left", "the shape further left wins", score_left),
        Preference("centered", "the shape closer to the centre wins", score_centered),
        Preference("brighter", "the brighter image (mostly background) wins", score_brighter),
        Preference("darker", "the darker image (mostly background) wins", score_darker),
        Preference("lighter", "the lighter shade of the shape wins", score_lighter),
    )
}


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
    "NO_FOREGROUND",
    "PREFERENCES",
    "Fidelity",
    "Preference",
    "get_preference",
    "prompt_fidelity",
    "score_brighter",
    "score_centered",
    "score_darker",
    "score_larger",
    "score_left",
    "score_lighter",
    "vote_from_scores",
]
