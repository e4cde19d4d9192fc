"""Simulated preference data for reward models in the toy world.

Pairs are two images of the same prompt from a *loose* generator: it draws the shape and colour
the prompt names but leaves size, shade, position and background to chance, as an untrained
model does. So every preference of `worker.toy.preferences` sees real differences between the
two images, including prompt-conditional ones (the prompt names a position, the images put the
shape anywhere). A noise-free simulated annotator labels each pair with its score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from worker.toy import world

if TYPE_CHECKING:
    from worker.reward_model import PreferenceDataset, RewardTrainResult

# Attributes the loose generator draws at random whatever the prompt says.
LOOSE_ATTRIBUTES: tuple[str, ...] = ("size", "shade", "horizontal", "vertical", "background")

PromptScore = Callable[[np.ndarray, str], float]  # (image (H, W, 3) uint8, prompt) -> score


def loose_image(
    prompt: str,
    rng: np.random.Generator,
    loose: Sequence[str] = LOOSE_ATTRIBUTES,
    degraded: bool = True,
) -> np.ndarray:
    """(32, 32, 3) uint8: the prompt's scene with the `loose` attributes drawn at random.

    `degraded` blurs and noises it like a small diffusion model's output.
    """
    spec = replace(world.parse_prompt(prompt), **{name: None for name in loose})
    image = world.render_scene(world.resolve(spec, rng))
    return world.degrade(image, rng) if degraded else image


def noise_free_label(score0: float, score1: float, tolerance: float = 0.0) -> float:
    """label0: 1 when image0 scores higher, 0 when lower, 0.5 when within `tolerance`."""
    if abs(score0 - score1) <= tolerance:
        return 0.5
    return 1.0 if score0 > score1 else 0.0


def simulated_pairs(
    score: PromptScore,
    prompts: Sequence[str],
    pairs_per_prompt: int,
    rng: np.random.Generator,
    loose: Sequence[str] = LOOSE_ATTRIBUTES,
    tolerance: float = 0.0,
    keep_ties: bool = True,
) -> PreferenceDataset:
    """Pairs of loose images per prompt, each labelled by one noise-free vote of `score`.

    A difference within `tolerance` (the just-noticeable one) is a tie vote; `keep_ties=False`
    leaves those pairs out, as the "drop" tie policy does.
    """
    from worker.reward_model import PreferenceDataset, PreferenceRecord

    records = []
    for prompt in prompts:
        for _ in range(pairs_per_prompt):
            image0, image1 = (loose_image(prompt, rng, loose) for _ in range(2))
            label0 = noise_free_label(score(image0, prompt), score(image1, prompt), tolerance)
            if label0 == 0.5 and not keep_ties:
                continue
            records.append(PreferenceRecord(prompt, image0, image1, label0))
    return PreferenceDataset(records)


def disjoint_prompt_sets(
    sizes: Sequence[int], seed: int, mention: dict[str, float] | None = None
) -> list[list[str]]:
    """Distinct grammar prompts cut into sets of the given sizes, no prompt in two sets."""
    wanted = sum(sizes)
    prompts: list[str] = []
    n = 2 * wanted
    while len(prompts) < wanted:
        prompts = list(dict.fromkeys(world.sample_prompts(n, seed, mention)))
        if n > 64 * wanted:
            raise ValueError(f"the grammar has fewer than {wanted} distinct prompts here")
        n *= 2
    out, start = [], 0
    for size in sizes:
        out.append(prompts[start : start + size])
        start += size
    return out


def preference_votes(
    name: str, n_prompts: int = 1000, pairs_per_prompt: int = 2
) -> PreferenceDataset:
    """Noise-free votes of one preference of `worker.toy.preferences` at its just-noticeable
    tolerance, imperceptible pairs left out (the "drop" policy): ~2 000 pairs by default."""
    from worker.toy.preferences import PREFERENCES

    preference = PREFERENCES[name]
    (prompts,) = disjoint_prompt_sets([n_prompts], seed=1, mention=preference.mention or None)
    # A colour preference needs images whose colour varies under one prompt.
    loose = (*LOOSE_ATTRIBUTES, "colour") if name == "prompted_colour" else LOOSE_ATTRIBUTES
    return simulated_pairs(
        lambda image, prompt: preference.score(image, prompt),
        prompts,
        pairs_per_prompt,
        np.random.default_rng(0),
        loose=loose,
        tolerance=preference.tolerance,
        keep_ties=False,
    )


# How the per-preference quality checks train (tests and benchmarks/reward_preferences.py):
# early stopping on validation loss usually ends between steps 300 and 700.
PREFERENCE_TRAINING: dict[str, int] = {
    "steps": 700,
    "batch_size": 32,
    "eval_every": 50,
    "patience": 6,
    "seed": 0,
}


def train_on_preference(name: str) -> RewardTrainResult:
    """The spatial toy reward model trained on `preference_votes(name)` (test prompts held out;
    `test_accuracy` is the figure the quality checks report)."""
    from worker.reward_model import RewardTrainConfig, train_reward_model

    return train_reward_model(preference_votes(name), RewardTrainConfig(**PREFERENCE_TRAINING))
