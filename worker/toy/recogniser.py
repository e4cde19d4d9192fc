"""A small differentiable recogniser of the toy world: which shape and which colour an image shows.

The toy world's own reader (`worker.toy.world.extract_shape` / `extract_colour`) works through
thresholds and templates, so it gives no gradients, and it is also the judge of every fidelity
figure. Reward backpropagation needs a prompt-fidelity term it can follow, so this recogniser
plays the part CLIP or a VQA model plays for a real text-to-image model: a separately trained
network whose log-likelihood of the prompt's named shape and colour is a differentiable reward.
It learns from the renderer's scenes (labels are what was drawn, never the reader's verdict),
degraded like a small diffusion model's output, so training against it is not training against
the judge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from worker.toy.world import (
    COLOURS,
    DEFAULT_SIZE,
    SHAPES,
    degrade,
    parse_prompt,
    render_scene,
    resolve,
    sample_spec,
)

# Shipped beside the toy models; `prefloop toy train-recogniser` writes it again.
WEIGHTS = Path(__file__).parent / "weights" / "recogniser.safetensors"
DEFAULT_STEPS = 400

# Every attribute named, so each rendered scene is labelled; the rest of the spec stays random.
_MENTION_ALL = {"shape": 1.0, "colour": 1.0}


class Recogniser(nn.Module):
    """(B, 3, S, S) images in [0, 1] → shape logits (B, 4) and colour logits (B, 6).

    Convolutions and a global pool: the verdict does not depend on where the shape sits, so
    a fidelity term built on it never pulls a shape back to where the parent put it.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
        )  # fmt: skip
        self.shape_head = nn.Linear(4 * width, len(SHAPES))
        self.colour_head = nn.Linear(4 * width, len(COLOURS))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(images * 2 - 1)  # (B, 2w, S/4, S/4)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 4w)
        return self.shape_head(pooled), self.colour_head(pooled)


def training_batch(
    rng: np.random.Generator, n: int, size: int = DEFAULT_SIZE
) -> tuple[Tensor, Tensor, Tensor]:
    """n degraded renders with random specs: images (n, 3, S, S) in [0, 1], shape and colour
    labels (n,)."""
    images, shapes, colours = [], [], []
    for _ in range(n):
        scene = resolve(sample_spec(rng, _MENTION_ALL), rng)
        # Blur and noise drawn per image: the model's outputs range from crisp to mushy.
        image = degrade(render_scene(scene, size), rng, blur=float(rng.uniform(0.0, 1.2)),
                        noise=float(rng.uniform(0.0, 14.0)))  # fmt: skip
        images.append(image)
        shapes.append(SHAPES.index(scene.spec.shape or ""))
        colours.append(COLOURS.index(scene.spec.colour or ""))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return pixels, torch.tensor(shapes), torch.tensor(colours)


def train_recogniser(
    steps: int = DEFAULT_STEPS,
    batch: int = 128,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> Recogniser:
    """Fit a recogniser on fresh renders every step (no fixed set to memorise)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Recogniser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(1, steps + 1):
        images, shapes, colours = training_batch(rng, batch)
        shape_logits, colour_logits = model(images)
        loss = F.cross_entropy(shape_logits, shapes) + F.cross_entropy(colour_logits, colours)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    return model.eval().requires_grad_(False)


def save_recogniser(model: Recogniser, path: Path = WEIGHTS) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_recogniser(path: Path = WEIGHTS) -> Recogniser:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(
            f"no toy recogniser at {path}; write one with `prefloop toy train-recogniser`"
        )
    model = Recogniser()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def default_recogniser() -> Recogniser:
    """The shipped recogniser, loaded once per process."""
    return load_recogniser()


def named_labels(prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Shape and colour indices the prompts name, −1 where a prompt names none: (B,), (B,)."""
    shapes, colours = [], []
    for prompt in prompts:
        spec = parse_prompt(prompt)
        shapes.append(SHAPES.index(spec.shape) if spec.shape is not None else -1)
        colours.append(COLOURS.index(spec.colour) if spec.colour is not None else -1)
    return torch.tensor(shapes), torch.tensor(colours)


def fidelity_log_likelihood(
    shape_logits: Tensor, colour_logits: Tensor, shape_labels: Tensor, colour_labels: Tensor
) -> Tensor:
    """Mean log-probability of the named attributes per image (B,); 0 where none is named.

    shape_logits (B, 4), colour_logits (B, 6), labels (B,) with −1 for "not named".
    """
    total = torch.zeros(shape_logits.shape[0], device=shape_logits.device)
    count = torch.zeros_like(total)
    for logits, labels in ((shape_logits, shape_labels), (colour_logits, colour_labels)):
        labels = labels.to(logits.device)
        named = labels >= 0  # (B,)
        log_p = F.log_softmax(logits.float(), dim=-1)  # (B, K)
        picked = log_p.gather(1, labels.clamp(min=0)[:, None])[:, 0]  # (B,)
        total = total + torch.where(named, picked, torch.zeros_like(picked))
        count = count + named.float()
    return total / count.clamp(min=1)


__all__ = [
    "Recogniser",
    "WEIGHTS",
    "default_recogniser",
    "fidelity_log_likelihood",
    "load_recogniser",
    "named_labels",
    "save_recogniser",
    "train_recogniser",
    "training_batch",
]
