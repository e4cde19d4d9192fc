"""Per-prompt sampling seeds: training images and evaluation images never share a starting noise.

Reusing seeds 0…n−1 for every prompt gives the training set only n starting noises, lets the
seed pair alone predict votes, and breaks the independence intervals assume. So each prompt gets
its own seeds, drawn from a stable hash of (domain, prompt id, index): the same prompt always gets
the same seeds (a retried job regenerates nothing, and parent and child models share seeds:
common random numbers), different prompts get unrelated ones. Training and evaluation seeds come
from disjoint ranges, so no evaluation image starts from a noise a training image started from.

Prompt ids are unique across projects, so the project needs no place in the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

SeedDomain = Literal["train", "eval"]

# Each domain owns 2**30 seeds: train [0, 2**30), eval [2**30, 2**31). Both fit the images.seed
# column (a signed 32-bit integer) and a torch generator's seed.
DOMAIN_BITS = 30
_DOMAIN_INDEX: dict[SeedDomain, int] = {"train": 0, "eval": 1}
SEED_LIMIT = len(_DOMAIN_INDEX) << DOMAIN_BITS  # every derived seed is below this (2**31)


def _hashed(domain: SeedDomain, prompt_id: int, index: int) -> int:
    digest = hashlib.blake2b(
        f"{domain}:{prompt_id}:{index}".encode(), digest_size=8, person=b"prefloop-seed"
    ).digest()
    return int.from_bytes(digest, "big") & ((1 << DOMAIN_BITS) - 1)


def prompt_seeds(prompt_id: int, count: int, domain: SeedDomain = "train") -> list[int]:
    """`count` distinct seeds for one prompt, the same on every call, inside the domain's range."""
    if domain not in _DOMAIN_INDEX:
        raise ValueError(f"unknown seed domain {domain!r}; known: {', '.join(_DOMAIN_INDEX)}")
    if count < 0:
        raise ValueError(f"count must be ≥ 0, got {count}")
    offset = _DOMAIN_INDEX[domain] << DOMAIN_BITS
    seeds: list[int] = []
    index = 0
    while len(seeds) < count:
        # A repeat within one prompt (chance ≈ count² / 2**31) is skipped, never returned twice.
        seed = offset + _hashed(domain, prompt_id, index)
        if seed not in seeds:
            seeds.append(seed)
        index += 1
    return seeds


def seed_domain(seed: int) -> SeedDomain | None:
    """The domain whose range holds a seed (None for seeds outside every derived range)."""
    if not 0 <= seed < SEED_LIMIT:
        return None
    index = seed >> DOMAIN_BITS
    return next(d for d, i in _DOMAIN_INDEX.items() if i == index)


def seeds_by_prompt(
    prompt_ids: Iterable[int],
    count: int,
    domain: SeedDomain = "train",
    explicit: list[int] | None = None,
) -> dict[int, list[int]]:
    """{prompt id: its seeds}: the explicit seeds for every prompt when given, else derived ones."""
    if explicit is not None:
        return {pid: list(explicit) for pid in prompt_ids}
    return {pid: prompt_seeds(pid, count, domain) for pid in prompt_ids}


__all__ = [
    "DOMAIN_BITS",
    "SEED_LIMIT",
    "SeedDomain",
    "prompt_seeds",
    "seed_domain",
    "seeds_by_prompt",
]
