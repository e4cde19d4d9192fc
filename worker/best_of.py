"""Best-of-N sampling: N candidates per requested image, a reward model keeps the best.

A requested image (prompt, seed) has candidates with seeds `candidate_seeds(seed, N)`: the first
is the seed itself, so a best-of-N model shares its first candidate with the plain model at the
same seed (paired comparisons stay paired); the others come from a salted hash of the seed, above
the range of stored images' seeds. Only the kept image is stored, under the requested seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from worker.pairs_source import UNSTORED_SEED_BASE, UNSTORED_SEED_SPAN

BEST_OF_SEED_SALT = "prefloop/best-of"

# score(prompts, images (H, W, 3) uint8) -> (N,) rewards
ScoreFn = Callable[[Sequence[str], Sequence[np.ndarray]], np.ndarray]


def candidate_seeds(seed: int, n: int) -> list[int]:
    """Seeds of the n candidates of the image requested with `seed`; the first is `seed`."""
    seeds = [int(seed)]
    for k in range(1, n):
        digest = hashlib.blake2b(
            f"{BEST_OF_SEED_SALT}\x1f{seed}\x1f{k}".encode(), digest_size=8
        ).digest()
        seeds.append(UNSTORED_SEED_BASE + int.from_bytes(digest, "big") % UNSTORED_SEED_SPAN)
    return seeds


def best_candidates(scores: np.ndarray) -> np.ndarray:
    """(R,) index of the highest score in each row of (R, N); the first among equals."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (requests, candidates), got shape {scores.shape}")
    return np.argmax(scores, axis=1)  # argmax returns the first maximum


def iter_best_of(
    generate: Callable[[Sequence[tuple[str, int]]], Iterator[tuple[str, int, Any]]],
    score: ScoreFn,
    items: Sequence[tuple[str, int]],
    n: int,
    *,
    requests_per_round: int = 8,
) -> Iterator[tuple[str, int, Any, dict[str, Any]]]:
    """Yield (prompt, seed, best image, choice) for every requested (prompt, seed).

    `generate(items)` yields (prompt, seed, image) for the candidate items in order (it may stop
    early when the job is cancelled; the requests it did not finish are not yielded). `choice`
    records the candidates' seeds and rewards and which one was kept.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    for start in range(0, len(items), requests_per_round):
        requests = items[start : start + requests_per_round]
        expanded = [(prompt, s) for prompt, seed in requests for s in candidate_seeds(seed, n)]
        images = [image for _, _, image in generate(expanded)]
        complete = len(images) // n
        if complete == 0:
            return
        prompts = [prompt for prompt, _ in expanded[: complete * n]]
        arrays = [np.array(img.convert("RGB"), dtype=np.uint8) for img in images[: complete * n]]
        values = np.asarray(score(prompts, arrays), dtype=np.float64).reshape(complete, n)
        for r, best in enumerate(best_candidates(values)):
            prompt, seed = requests[r]
            yield (
                prompt,
                seed,
                images[r * n + int(best)],
                {
                    "n": n,
                    "chosen": int(best),
                    "seeds": candidate_seeds(seed, n),
                    "scores": [float(v) for v in values[r]],
                },
            )
        if complete < len(requests):
            return
