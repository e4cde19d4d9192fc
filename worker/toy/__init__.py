"""The toy world and the small text-to-image models trained on it."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Model names usable as a ModelVersion's `base`; "toy" is the good one.
TOY_MODELS: dict[str, Path] = {
    "toy": WEIGHTS_DIR / "toy-v1",
    "toy-v0": WEIGHTS_DIR / "toy-v0",
}


def resolve_toy(base: str) -> Path | None:
    """Directory of the shipped toy model named `base`, or None if `base` is not a toy name."""
    return TOY_MODELS.get(base)
