"""Judge a toy pipeline by reading its images back with the toy world's extractors."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from worker.toy import world

# Sampling defaults for the toy models: DDIM needs few steps on 8×8 latents.
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 4.0


@dataclass(frozen=True)
class AlignmentReport:
    """How often generated images show what their prompts name."""

    n: int
    accuracy: dict[str, float]  # attribute -> hit rate over prompts that name it
    mentions: dict[str, int]  # attribute -> number of prompts that name it
    images_per_second: float

    def summary(self) -> str:
        parts = [f"{a} {self.accuracy[a]:.1%} (n={self.mentions[a]})" for a in self.accuracy]
        return f"{self.n} images, {self.images_per_second:.1f} img/s; " + ", ".join(parts)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 100,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for `prompts`, batched, reproducible for a seed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        images = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="np",
        ).images  # (b, H, W, 3) floats in [0, 1]
        out.append(np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def evaluate_alignment(
    pipe: StableDiffusionPipeline,
    *,
    n: int = 200,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 100,
) -> AlignmentReport:
    """Generate for `n` sampled prompts and score each named attribute with the extractors."""
    prompts = world.sample_prompts(n, seed=seed)
    start = time.perf_counter()
    images = generate(
        pipe, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    rate = n / (time.perf_counter() - start)
    hits = {a: 0 for a in world.ATTRIBUTES}
    mentions = {a: 0 for a in world.ATTRIBUTES}
    for prompt, image in zip(prompts, images, strict=True):
        for attr, ok in world.attribute_matches(prompt, image).items():
            mentions[attr] += 1
            hits[attr] += ok
    accuracy = {a: hits[a] / mentions[a] for a in world.ATTRIBUTES if mentions[a]}
    return AlignmentReport(
        n=n,
        accuracy=accuracy,
        mentions={a: mentions[a] for a in accuracy},
        images_per_second=rate,
    )
