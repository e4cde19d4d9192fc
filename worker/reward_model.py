"""Image-level Bradley–Terry reward model r(prompt, image), PickScore-style.

A backbone encodes the prompt and the image into two embeddings, a head turns them into one
scalar score, and pairs are trained with a two-way softmax (= Bradley–Terry) cross-entropy
against soft labels. Two backbones share that shape: ``"clip"`` (a transformers CLIP model, for
real use) and ``"toyconv"`` (trained from scratch, for the toy world and tests), whose default
architecture ``"spatial"`` keeps where things are and reads the prompt's words at every position
before pooling; ``"pooled"``, the first one, pools the image before it meets the prompt and so
cannot see position (kept for loading old models and as the baseline).

Data is split by prompt into train (gradient steps), validation (early stopping, tie threshold)
and test (the figures to report, touched once at the end).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from app.core.storage import atomic_dir
from app.jobs.kinds import RewardTrainingParams

HEADS = ("cosine", "mlp")
TOY_ARCHS = ("spatial", "pooled")
# PickScore's grid for the tie threshold t on |p0 - p1|.
TIE_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
# OpenAI CLIP preprocessing, used when a checkpoint ships no preprocessor config.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_NAME = "prefloop-reward-model"
FORMAT_VERSION = 1
# Float slack so that e.g. |0.55 - 0.45| counts as <= 0.1.
_TIE_EPS = 1e-9

ProgressCallback = Callable[[int, int, dict[str, float]], None]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceRecord:
    """One judged pair: images are (H, W, 3) arrays (uint8, or float in [0, 1])."""

    prompt: str
    image0: np.ndarray
    image1: np.ndarray
    label0: float  # share of judgements for image0: 1 wins, 0 loses, 0.5 tie

    def __post_init__(self) -> None:
        if not 0.0 <= self.label0 <= 1.0:
            raise ValueError(f"label0 must lie in [0, 1], got {self.label0}")
        for image in (self.image0, self.image1):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images must be (H, W, 3) arrays, got shape {image.shape}")


class PreferenceDataset:
    """An ordered collection of preference records."""

    def __init__(self, records: Sequence[PreferenceRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PreferenceRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(self.records)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    @property
    def labels0(self) -> np.ndarray:
        return np.array([r.label0 for r in self.records], dtype=np.float64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PreferenceDataset:
        return PreferenceDataset([self.records[int(i)] for i in indices])

    def split_by_prompt(
        self, val_fraction: float, seed: int
    ) -> tuple[PreferenceDataset, PreferenceDataset]:
        """(train, validation) with no prompt in both."""
        train_idx, val_idx = split_by_prompt(self.prompts, val_fraction, seed)
        return self.subset(train_idx), self.subset(val_idx)

    def split_three_ways(
        self, val_fraction: float, test_fraction: float, seed: int
    ) -> tuple[PreferenceDataset, PreferenceDataset, PreferenceDataset]:
        """(train, validation, test), no prompt in two of them (see ``split_three_ways``)."""
        parts = split_three_ways(self.prompts, val_fraction, test_fraction, seed)
        train, val, test = (self.subset(idx) for idx in parts)
        return train, val, test


def label_from_votes(wins0: float, wins1: float, ties: float = 0.0) -> float:
    """Soft label0 from several votes: image0's empirical share, a tie counting half."""
    total = wins0 + wins1 + ties
    if total <= 0:
        raise ValueError("need at least one vote")
    return (wins0 + 0.5 * ties) / total


def split_by_prompt(
    prompts: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) from a random split of the distinct prompts."""
    train, val, _ = split_three_ways(prompts, val_fraction, 0.0, seed)
    return train, val


def split_three_ways(
    prompts: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, validation, test) from a random split of the distinct prompts.

    Fractions are shares of the distinct prompts. Validation and, when ``test_fraction`` > 0,
    test get at least one prompt each and training keeps at least one. The test prompts are
    drawn after the validation ones from the same permutation, so a split without a test set
    is the same as the two-way one.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"test_fraction must lie in [0, 1) and leave prompts to train on, got {test_fraction}"
        )
    distinct = sorted(set(prompts))
    needed = 3 if test_fraction > 0 else 2
    if len(distinct) < needed:
        raise ValueError(
            f"a prompt-disjoint split into {needed} parts needs at least {needed} distinct "
            f"prompts, got {len(distinct)}"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * len(distinct)))
    n_test = min(n_test, len(distinct) - 2) if n_test else 0
    n_val = min(len(distinct) - 1 - n_test, max(1, round(val_fraction * len(distinct))))
    val_prompts = {distinct[i] for i in order[:n_val]}
    test_prompts = {distinct[i] for i in order[n_val : n_val + n_test]}
    part = np.array(
        [2 if p in test_prompts else 1 if p in val_prompts else 0 for p in prompts], dtype=int
    )
    return np.flatnonzero(part == 0), np.flatnonzero(part == 1), np.flatnonzero(part == 2)


def images_to_tensor(
    images: Tensor | np.ndarray | Sequence[np.ndarray], size: int | None = None
) -> Tensor:
    """(B, 3, H, W) float in [0, 1] from a tensor of that shape or (H, W, 3) arrays.

    Arrays are resized (shorter side, then centre crop) to ``size`` x ``size`` when it is
    given; otherwise arrays of different sizes go to the first one's shorter side.
    """
    if isinstance(images, Tensor):
        return images.float()
    tensors = []
    for image in images:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # (3, H, W)
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        tensors.append(t)
    if not tensors:
        raise ValueError("no images")
    shapes = {tuple(t.shape) for t in tensors}
    if size is None and len(shapes) > 1:
        size = min(tensors[0].shape[1:])
    if size is not None:
        tensors = [resize_center_crop(t[None], size)[0] for t in tensors]
    return torch.stack(tensors)  # (B, 3, H, W)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shorter side to ``size``, then a centre crop."""
    _, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(
        images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0.0, 1.0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, :, top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------
# Loss and metrics (pure)
# --------------------------------------------------------------------------------------------


def prompt_weights(prompts: Sequence[str], counts: Mapping[str, int] | None = None) -> Tensor:
    """(B,) weights 1 / (number of examples for the prompt); counts default to ``prompts``."""
    counts = Counter(prompts) if counts is None else counts
    return torch.tensor([1.0 / counts[p] for p in prompts], dtype=torch.float32)


def preference_loss(
    scores0: Tensor, scores1: Tensor, label0: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Two-way softmax (Bradley–Terry) cross-entropy against soft targets, weighted mean.

    Weights (e.g. from ``prompt_weights``) are normalised to sum to one over the batch.
    """
    logits = torch.stack([scores0, scores1], dim=-1)  # (B, 2)
    label0 = label0.to(logits)
    targets = torch.stack([label0, 1.0 - label0], dim=-1)  # (B, 2)
    per_example = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)  # (B,)
    if weights is None:
        return per_example.mean()
    weights = weights.to(per_example)
    return (weights / weights.sum() * per_example).sum()


def win_probability(scores0: np.ndarray, scores1: np.ndarray) -> np.ndarray:
    """(N,) P(image0 beats image1) = sigmoid(r0 - r1)."""
    diff = np.asarray(scores0, dtype=np.float64) - np.asarray(scores1, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * diff))  # numerically safe logistic


def _outcome(label0: np.ndarray) -> np.ndarray:
    """(N,) +1 image0 preferred, -1 image1 preferred, 0 tie."""
    return np.sign(np.round(np.asarray(label0, dtype=np.float64) - 0.5, 9))


def tie_aware_accuracy(p0: np.ndarray, label0: np.ndarray, threshold: float) -> float:
    """PickScore accuracy: a tie is predicted when |p0 - p1| <= threshold.

    Credit 1 for an exact match, 0.5 when either the label or the prediction is a tie (and
    they differ), 0 for the wrong winner.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    margin = 2.0 * p0 - 1.0  # p0 - p1
    predicted = np.where(np.abs(margin) <= threshold + _TIE_EPS, 0.0, np.sign(margin))
    actual = _outcome(label0)
    credit = np.where(
        predicted == actual, 1.0, np.where((predicted == 0) | (actual == 0), 0.5, 0.0)
    )
    return float(credit.mean())


def choose_tie_threshold(
    p0: np.ndarray, label0: np.ndarray, grid: Sequence[float] = TIE_THRESHOLDS
) -> tuple[float, float]:
    """(t, accuracy) maximising tie-aware accuracy over ``grid``; the smallest t wins ties."""
    best_t, best_acc = grid[0], -1.0
    for t in grid:
        acc = tie_aware_accuracy(p0, label0, t)
        if acc > best_acc:
            best_t, best_acc = t, acc
    return float(best_t), best_acc


def log_loss(p0: np.ndarray, label0: np.ndarray, eps: float = 1e-7) -> float:
    """Mean cross-entropy of P(image0 wins) against soft labels, in nats."""
    p0 = np.clip(np.asarray(p0, dtype=np.float64), eps, 1.0 - eps)
    label0 = np.asarray(label0, dtype=np.float64)
    return float(-(label0 * np.log(p0) + (1.0 - label0) * np.log(1.0 - p0)).mean())


def expected_calibration_error(p0: np.ndarray, label0: np.ndarray, n_bins: int = 10) -> float:
    """Binned ECE of P(image0 wins): sum over bins of share × |mean p0 − mean label0|.

    Bins split [0, 1] into ``n_bins`` equal intervals, the last one closed. Comparing with the
    mean soft label keeps ties and multi-vote labels meaningful; equal-width bins are symmetric,
    so the figure is the same from image1's side.
    """
    p0 = np.asarray(p0, dtype=np.float64)
    label0 = np.asarray(label0, dtype=np.float64)
    bins = np.minimum((p0 * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(p0[in_bin].mean() - label0[in_bin].mean())
    return float(ece)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def tokenize_prompt(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def build_vocabulary(prompts: Sequence[str]) -> list[str]:
    """Sorted distinct words of the prompts; index 0 of the embedding is kept for unknowns."""
    return sorted({w for p in prompts for w in tokenize_prompt(p)})


class ToyConvEncoder(nn.Module):
    """The first toy backbone: a pooled convnet plus a bag-of-words prompt embedding.

    Global average pooling before the prompt is seen makes it blind to where things are; kept
    so models saved with it still load (``arch: "pooled"``) and as the baseline it is measured
    against.
    """

    input_size: int | None = None

    def __init__(self, vocab: Sequence[str], embed_dim: int, conv_channels: int) -> None:
        super().__init__()
        self.vocab = list(vocab)
        self.word_index = {w: i + 1 for i, w in enumerate(self.vocab)}
        self.embed_dim = embed_dim
        c = conv_channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.image_proj = nn.Linear(2 * c, embed_dim)
        self.words = nn.EmbeddingBag(len(self.vocab) + 1, embed_dim, mode="mean")

    def encode_images(self, images: Tensor) -> Tensor:
        x = images * 2.0 - 1.0  # (B, 3, H, W) centred
        return self.image_proj(self.conv(x).flatten(1))  # (B, D)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        device = self.image_proj.weight.device
        ids: list[int] = []
        offsets: list[int] = []
        for prompt in prompts:
            offsets.append(len(ids))
            # An empty or all-unknown prompt falls back to the unknown slot.
            ids.extend([self.word_index.get(w, 0) for w in tokenize_prompt(prompt)] or [0])
        return self.words(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
        )  # (B, D)

    def encode(self, prompts: Sequence[str], images: Tensor) -> Encoded:
        return Encoded(self.encode_images(images), self.encode_prompts(prompts))


class Encoded(NamedTuple):
    """What an encoder gives the head: (B, D) image and prompt embeddings, and optionally a
    (B,) term the encoder adds to the score itself."""

    image: Tensor
    text: Tensor
    bias: Tensor | None = None


def coordinate_channels(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """(B, 2, H, W): x then y of each pixel centre, from -1 (left / top) to 1 (right / bottom)."""
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2.0 - 1.0
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2.0 - 1.0
    grid = torch.stack(
        [xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)]
    )  # (2, H, W)
    return grid.unsqueeze(0).expand(batch, 2, height, width)


def attention_pool(features: Tensor, logits: Tensor) -> Tensor:
    """(B, C) softmax(logits)-weighted mean over positions of features (B, C, N); logits (B, N)."""
    weights = torch.softmax(logits, dim=-1)  # (B, N)
    return (features * weights.unsqueeze(1)).sum(dim=-1)


class ToySpatialEncoder(nn.Module):
    """Toy backbone that sees where things are and reads the prompt's words at every position.

    - Pixels go in with their colourfulness (max − min channel, an opponent-colour cue that
      tells a coloured shape from a neutral background) and coordinate channels, so features
      can depend on where they are.
    - Every word owns a coarse spatial map (``map_grid`` × ``map_grid``, ``map_rank``
      channels). A prompt's maps are summed, upsampled to the 16 × 16 feature grid and turned
      into a per-position FiLM (scale and shift of each feature channel), added to a global
      FiLM from the prompt's mean word embedding: "left" can raise features on the left, "red"
      raise red features anywhere. The prompt acts before anything is pooled.
    - 1 × 1 convolutions mix the modulated features with the coordinates position by position.
    - Only then is the map pooled: a mean (area, overall brightness), learned attention pools
      returning features, coordinates and pixel colour of what they attend to (a shape's colour
      and centroid), and one full-resolution attention pool of pixel colour and coordinates.
    - ``agreement``: how much of what the first attention pool holds lies where the first
      channel of the prompt's word maps points; added to the score, it lets a position word
      pay off for the object being there without going through the embeddings.
    """

    input_size: int | None = None
    n_pools = 2  # attention pools on the feature grid: room for "the shape" and one more region
    map_grid = 6  # two map cells per cell of a 3 × 3 position grid
    map_rank = 4

    def __init__(self, vocab: Sequence[str], embed_dim: int, conv_channels: int) -> None:
        super().__init__()
        self.vocab = list(vocab)
        self.word_index = {w: i + 1 for i, w in enumerate(self.vocab)}
        self.embed_dim = embed_dim
        c, d, k, r, g = conv_channels, embed_dim, self.n_pools, self.map_rank, self.map_grid
        self.stem_full = nn.Sequential(nn.Conv2d(3 + 1 + 2, c, 3, padding=1), nn.ReLU())
        self.full_logits = nn.Conv2d(c, 1, 1)
        self.stem = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
        )
        self.words = nn.Embedding(len(self.vocab) + 1, d)
        self.word_maps = nn.Embedding(len(self.vocab) + 1, r * g * g)
        # Small maps: a prompt starts out asking for no place in particular.
        nn.init.normal_(self.word_maps.weight, std=0.1)
        self.film_global = nn.Linear(d, 2 * c)
        self.film_spatial = nn.Conv2d(r, 2 * c, 1)
        self.mix = nn.Sequential(
            nn.Conv2d(c + 2, 2 * c, 1),
            nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 1),
            nn.ReLU(),
        )
        self.pool_logits = nn.Conv2d(2 * c, k, 1)
        located = 2 * c + 2 + 3  # mixed features, coordinates, pixel colour
        self.image_proj = nn.Linear((k + 1) * located + 5, d)
        self.text_proj = nn.Linear(d, d)

    def _word_ids(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, L) word ids, unknown words and an empty prompt mapping to slot 0; (B, L) mask."""
        rows = [[self.word_index.get(w, 0) for w in tokenize_prompt(p)] or [0] for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids.to(device), mask.to(device)

    def prompt_maps(self, ids: Tensor, mask: Tensor, height: int, width: int) -> Tensor:
        """(B, R, height, width): the sum of the words' maps, bilinearly upsampled."""
        maps = (self.word_maps(ids) * mask.unsqueeze(-1)).sum(1)  # (B, R·G·G)
        maps = maps.view(ids.shape[0], self.map_rank, self.map_grid, self.map_grid)
        return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)

    def encode(self, prompts: Sequence[str], images: Tensor) -> Encoded:
        b, _, h, w = images.shape
        device = images.device
        chroma = images.amax(1, keepdim=True) - images.amin(1, keepdim=True)  # (B, 1, H, W)
        coords_full = coordinate_channels(b, h, w, device)  # (B, 2, H, W)
        full = self.stem_full(torch.cat([images * 2.0 - 1.0, chroma, coords_full], 1))  # (B,C,H,W)
        pixel_pool = attention_pool(
            torch.cat([images, coords_full], 1).flatten(2), self.full_logits(full).flatten(1)
        )  # (B, 5)
        feat = self.stem(full)  # (B, C, h, w)
        fh, fw = feat.shape[2:]
        coords = coordinate_channels(b, fh, fw, device)  # (B, 2, h, w)
        ids, mask = self._word_ids(prompts, device)
        text = (self.words(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B,D)
        maps = self.prompt_maps(ids, mask, fh, fw)  # (B, R, h, w)
        film = self.film_global(text)[:, :, None, None] + self.film_spatial(maps)  # (B,2C,h,w)
        scale, shift = film.chunk(2, dim=1)  # (B, C, h, w) each
        mixed = self.mix(torch.cat([feat * (1.0 + scale) + shift, coords], 1))  # (B, 2C, h, w)
        pixels = F.adaptive_avg_pool2d(images, (fh, fw))  # (B, 3, h, w)
        located = torch.cat([mixed, coords, pixels], 1).flatten(2)  # (B, 2C + 5, N)
        logits = self.pool_logits(mixed).flatten(2)  # (B, K, N)
        pools = [attention_pool(located, logits[:, i]) for i in range(logits.shape[1])]
        pooled = torch.cat([located.mean(-1), *pools, pixel_pool], 1)  # (B, (K+1)(2C+5) + 5)
        agreement = (torch.softmax(logits[:, 0], -1) * maps[:, 0].flatten(1)).sum(-1)  # (B,)
        return Encoded(self.image_proj(pooled), self.text_proj(text), agreement)


class ClipEncoder(nn.Module):
    """A transformers CLIP model; pixels are resized and normalised in torch."""

    # Buffers, registered below (nn.Module's attribute lookup alone types them as Module too).
    image_mean: Tensor
    image_std: Tensor

    def __init__(
        self,
        clip: Any,  # a transformers CLIPModel (transformers is untyped here)
        tokenizer: Any,
        image_mean: Sequence[float],
        image_std: Sequence[float],
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.input_size = int(clip.config.vision_config.image_size)
        self.embed_dim = int(clip.config.projection_dim)
        self.max_length = int(
            min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
        )
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), False)

    def encode_images(self, images: Tensor) -> Tensor:
        pixels = resize_center_crop(images, self.input_size)  # (B, 3, S, S)
        pixels = (pixels - self.image_mean) / self.image_std
        return _pooled(self.clip.get_image_features(pixel_values=pixels))  # (B, D)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.image_mean.device)
        return _pooled(
            self.clip.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )  # (B, D)

    def encode(self, prompts: Sequence[str], images: Tensor) -> Encoded:
        return Encoded(self.encode_images(images), self.encode_prompts(prompts))


def _pooled(output: Any) -> Tensor:
    # transformers < 5 returns the projected embedding, 5.x a model output holding it.
    return output if isinstance(output, Tensor) else output.pooler_output


class CosineHead(nn.Module):
    """r = exp(log_scale) · cos(image, text), CLIP's own similarity."""

    def __init__(self, init_log_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        cosine = (image_emb * text_emb).sum(dim=-1)  # (B,) on unit vectors
        return self.log_scale.exp() * cosine


class MLPHead(nn.Module):
    """r = MLP([img, txt, img * txt]) on the unit embeddings, rescaled by sqrt(D)."""

    def __init__(self, embed_dim: int, hidden: int) -> None:
        super().__init__()
        # Unit vectors have O(1/sqrt(D)) components and their product O(1/D): rescaling keeps
        # the MLP's inputs O(1) so it trains at a normal learning rate whatever D is.
        self.scale = math.sqrt(embed_dim)
        self.net = nn.Sequential(nn.Linear(3 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        img, txt = image_emb * self.scale, text_emb * self.scale  # (B, D) each
        features = torch.cat([img, txt, img * txt], dim=-1)  # (B, 3D)
        return self.net(features).squeeze(-1)  # (B,)


Encoder = ToyConvEncoder | ToySpatialEncoder | ClipEncoder


class RewardModel(nn.Module):
    """r(prompt, image) = head(unit image embedding, unit prompt embedding)."""

    encoder: Encoder

    def __init__(self, encoder: Encoder, head: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.spec = spec  # everything needed to rebuild the architecture, saved in config.json

    @property
    def backbone(self) -> str:
        return str(self.spec["backbone"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def score(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        """(B,) scores for prompts and (B, 3, H, W) images in [0, 1]."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        encoded = self.encoder.encode(prompts, images.to(self.device))
        image_emb = F.normalize(encoded.image, dim=-1)  # (B, D)
        text_emb = F.normalize(encoded.text, dim=-1)  # (B, D)
        scores = self.head(image_emb, text_emb)  # (B,)
        return scores if encoded.bias is None else scores + encoded.bias

    def forward(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return self.score(prompts, images)


def _make_head(head: str, embed_dim: int, hidden: int, init_log_scale: float) -> nn.Module:
    if head == "cosine":
        return CosineHead(init_log_scale)
    if head == "mlp":
        return MLPHead(embed_dim, hidden)
    raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")


def build_toyconv_model(
    vocab: Sequence[str],
    *,
    arch: str = "spatial",
    head: str = "mlp",
    embed_dim: int = 32,
    conv_channels: int = 16,
    head_hidden: int = 16,
) -> RewardModel:
    """A from-scratch toy model: ``arch`` "spatial" (the default) or "pooled" (the first one)."""
    if arch == "spatial":
        encoder: Encoder = ToySpatialEncoder(vocab, embed_dim, conv_channels)
    elif arch == "pooled":
        encoder = ToyConvEncoder(vocab, embed_dim, conv_channels)
    else:
        raise ValueError(f"unknown toy arch {arch!r}; expected one of {TOY_ARCHS}")
    spec = {
        "backbone": "toyconv",
        "arch": arch,
        "head": head,
        "embed_dim": embed_dim,
        "conv_channels": conv_channels,
        "head_hidden": head_hidden,
    }
    # A temperature of 10 lets unit-cosine scores span a useful logit range from the start.
    return RewardModel(encoder, _make_head(head, embed_dim, head_hidden, math.log(10.0)), spec)


def build_clip_model(
    name_or_path: str, *, head: str = "cosine", head_hidden: int = 256
) -> RewardModel:
    """A reward model on a pretrained CLIP (hub id or local directory)."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    mean, std = _clip_normalisation(name_or_path)
    return _assemble_clip(clip, tokenizer, mean, std, head=head, head_hidden=head_hidden)


def _clip_normalisation(name_or_path: str) -> tuple[list[float], list[float]]:
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError):
        return list(CLIP_IMAGE_MEAN), list(CLIP_IMAGE_STD)


def _assemble_clip(
    clip: Any,
    tokenizer: Any,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    head: str,
    head_hidden: int,
) -> RewardModel:
    encoder = ClipEncoder(clip, tokenizer, mean, std)
    spec = {
        "backbone": "clip",
        "head": head,
        "head_hidden": head_hidden,
        "clip_config": clip.config.to_dict(),
        "image_mean": [float(x) for x in mean],
        "image_std": [float(x) for x in std],
    }
    # The cosine head starts from CLIP's own learned temperature, as PickScore scores do.
    init_log_scale = float(clip.logit_scale.detach())
    return RewardModel(
        encoder, _make_head(head, encoder.embed_dim, head_hidden, init_log_scale), spec
    )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


# The training settings are the job's params model: one definition of each option and default.
RewardTrainConfig = RewardTrainingParams


@dataclass
class RewardTrainResult:
    """The best-validation model, its validation figures and its test figures.

    Validation picks the step kept and the tie threshold, so its accuracy is optimistic; the
    test prompts influence nothing and give the figures to report (None without a test set).
    """

    model: RewardModel
    val_accuracy: float  # tie-aware, at tie_threshold
    tie_threshold: float  # chosen on validation
    val_log_loss: float
    val_ece: float
    val_loss: float  # prompt-weighted BT loss, the early-stopping criterion
    best_step: int
    steps_run: int
    stopped_early: bool
    n_train: int
    n_val: int
    history: list[dict[str, float]] = field(default_factory=list)
    # The best validation loss of each initialisation tried; the kept one is the lowest.
    restart_val_losses: list[float] = field(default_factory=list)
    test_accuracy: float | None = None  # tie-aware, at the validation tie_threshold
    test_log_loss: float | None = None
    test_ece: float | None = None
    test_loss: float | None = None
    n_test: int = 0

    def metrics(self) -> dict[str, Any]:
        """JSON-ready summary: everything but the model."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        summary["history"] = [dict(point) for point in self.history]
        return summary


def build_reward_model(config: RewardTrainConfig, train_prompts: Sequence[str]) -> RewardModel:
    """A fresh model for ``config``; the toyconv vocabulary comes from the training prompts."""
    head = config.resolved_head
    if config.family == "toyconv":
        return build_toyconv_model(
            build_vocabulary(train_prompts),
            arch=config.toy_arch,
            head=head,
            embed_dim=config.embed_dim,
            conv_channels=config.conv_channels,
            head_hidden=config.resolved_head_hidden(),
        )
    assert config.clip_model is not None
    return build_clip_model(config.clip_model, head=head, head_hidden=config.resolved_head_hidden())


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pair_scores(model: RewardModel, records: Sequence[PreferenceRecord]) -> tuple[Tensor, Tensor]:
    """(B,), (B,) scores of image0 and image1; both sides go through one forward pass."""
    prompts = [r.prompt for r in records]
    images = images_to_tensor(
        [r.image0 for r in records] + [r.image1 for r in records],
        size=model.encoder.input_size,
    )  # (2B, 3, H, W)
    scores = model.score(prompts + prompts, images)  # (2B,)
    return scores[: len(records)], scores[len(records) :]


def predict_pairs(
    model: RewardModel, dataset: PreferenceDataset, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,), (N,) of image0 and image1 for every record, without gradients."""
    was_training = model.training
    model.eval()
    out0, out1 = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                s0, s1 = _pair_scores(model, dataset.records[start : start + batch_size])
                out0.append(s0.float().cpu().numpy())
                out1.append(s1.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out0:
        return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)
    return np.concatenate(out0), np.concatenate(out1)


def evaluate_pairs(
    model: RewardModel,
    dataset: PreferenceDataset,
    tie_threshold: float | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Loss and metrics on a dataset; the tie threshold is chosen on it when not given."""
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    s0, s1 = predict_pairs(model, dataset, batch_size)
    labels = dataset.labels0
    p0 = win_probability(s0, s1)
    if tie_threshold is None:
        tie_threshold, accuracy = choose_tie_threshold(p0, labels)
    else:
        accuracy = tie_aware_accuracy(p0, labels, tie_threshold)
    loss = preference_loss(
        torch.from_numpy(s0).double(),
        torch.from_numpy(s1).double(),
        torch.from_numpy(labels),
        prompt_weights(dataset.prompts),
    )
    return {
        "loss": float(loss),
        "accuracy": accuracy,
        "tie_threshold": float(tie_threshold),
        "log_loss": log_loss(p0, labels),
        "ece": expected_calibration_error(p0, labels),
    }


@dataclass
class _Fit:
    """One initialisation's run: its best validation state and how the run went."""

    best: dict[str, Any]
    steps_run: int
    stopped_early: bool
    history: list[dict[str, float]]


# Initialisation r of a run with seed s uses seed s + r · _RESTART_STRIDE (r = 0: s itself, so
# one restart is exactly the run without restarts).
_RESTART_STRIDE = 7919


def _fit_once(
    train_set: PreferenceDataset,
    val_set: PreferenceDataset,
    config: RewardTrainConfig,
    init_seed: int,
    target: torch.device,
    on_progress: ProgressCallback | None,
    step_offset: int,
    total_steps: int,
) -> tuple[RewardModel, _Fit]:
    eval_every = config.eval_interval
    torch.manual_seed(init_seed)
    rng = np.random.default_rng(init_seed)
    model = build_reward_model(config, train_set.prompts).to(target)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.resolved_weight_decay()
    )
    train_counts = Counter(train_set.prompts)
    batch_size = min(config.batch_size, len(train_set))

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"val_loss": math.inf, "step": 0, "state": None, "metrics": None}
    evals_since_best = 0
    running_loss, running_n = 0.0, 0
    order: np.ndarray = np.empty(0, dtype=np.int64)
    cursor = 0
    step = 0
    stopped_early = False
    model.train()
    for step in range(1, config.steps + 1):
        if cursor + batch_size > len(order):  # reshuffle each epoch
            order, cursor = rng.permutation(len(train_set)), 0
        batch = [train_set.records[i] for i in order[cursor : cursor + batch_size]]
        cursor += batch_size

        scores0, scores1 = _pair_scores(model, batch)
        labels = torch.tensor([r.label0 for r in batch], device=target)
        weights = prompt_weights([r.prompt for r in batch], train_counts).to(target)
        loss = preference_loss(scores0, scores1, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        running_loss += float(loss.detach())
        running_n += 1

        if step % eval_every != 0 and step != config.steps:
            continue
        val = evaluate_pairs(model, val_set, batch_size=config.batch_size)
        point = {
            "step": float(step),
            "train_loss": running_loss / running_n,
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_tie_threshold": val["tie_threshold"],
            "val_log_loss": val["log_loss"],
            "val_ece": val["ece"],
        }
        history.append(point)
        running_loss, running_n = 0.0, 0
        if val["loss"] < best["val_loss"]:
            best.update(
                val_loss=val["loss"],
                step=step,
                metrics=val,
                state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            )
            evals_since_best = 0
        else:
            evals_since_best += 1
        if on_progress is not None:
            on_progress(step_offset + step, total_steps, dict(point))
        if evals_since_best >= config.patience:
            stopped_early = True
            break
    return model, _Fit(best, step, stopped_early, history)


def train_reward_model(
    dataset: PreferenceDataset,
    config: RewardTrainConfig,
    on_progress: ProgressCallback | None = None,
    *,
    device: str = "auto",
) -> RewardTrainResult:
    """Train on a prompt-disjoint split, early-stop on validation loss, keep the best state.

    ``config.resolved_restarts()`` initialisations train on the same split; the one with the
    lowest validation loss is kept (its history is the one reported). ``device`` "auto" is cuda
    when available. The test prompts (``config.test_fraction``) are scored once, by the kept
    model at the validation tie threshold.
    """
    target = _resolve_device(device)
    train_set, val_set, test_set = dataset.split_three_ways(
        config.val_fraction, config.test_fraction, config.seed
    )
    restarts = config.resolved_restarts()
    fits: list[_Fit] = []
    kept: tuple[RewardModel, _Fit] | None = None
    for r in range(restarts):
        model, fit = _fit_once(
            train_set, val_set, config, config.seed + r * _RESTART_STRIDE, target,
            on_progress, r * config.steps, restarts * config.steps,
        )  # fmt: skip
        fits.append(fit)
        if kept is None or fit.best["val_loss"] < kept[1].best["val_loss"]:
            kept = (model, fit)
    assert kept is not None
    model, fit = kept
    best, step, stopped_early, history = fit.best, fit.steps_run, fit.stopped_early, fit.history

    model.load_state_dict(best["state"])
    model.eval()
    metrics = best["metrics"]
    test: dict[str, float | None] = dict.fromkeys(("accuracy", "log_loss", "ece", "loss"))
    if len(test_set):
        test.update(
            evaluate_pairs(model, test_set, metrics["tie_threshold"], batch_size=config.batch_size)
        )
    return RewardTrainResult(
        model=model,
        val_accuracy=metrics["accuracy"],
        tie_threshold=metrics["tie_threshold"],
        val_log_loss=metrics["log_loss"],
        val_ece=metrics["ece"],
        val_loss=metrics["loss"],
        best_step=int(best["step"]),
        steps_run=step,
        stopped_early=stopped_early,
        n_train=len(train_set),
        n_val=len(val_set),
        history=history,
        restart_val_losses=[f.best["val_loss"] for f in fits],
        test_accuracy=test["accuracy"],
        test_log_loss=test["log_loss"],
        test_ece=test["ece"],
        test_loss=test["loss"],
        n_test=len(test_set),
    )


# --------------------------------------------------------------------------------------------
# Scoring and persistence
# --------------------------------------------------------------------------------------------


def score_images(
    model: RewardModel,
    prompts: Sequence[str],
    images: Tensor | np.ndarray | Sequence[np.ndarray],
    batch_size: int = 64,
) -> np.ndarray:
    """(N,) scores, batched and without gradients.

    Images: a (N, 3, H, W) tensor in [0, 1], or (H, W, 3) arrays (uint8 or float in [0, 1]).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = images_to_tensor(
                    images[start : start + batch_size], size=model.encoder.input_size
                )
                scores = model.score(list(prompts[start : start + batch_size]), chunk)
                out.append(scores.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.empty(0, dtype=np.float32)


def save_reward_model(
    model: RewardModel,
    directory: str | os.PathLike[str],
    config: RewardTrainConfig | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write model.safetensors + config.json (+ vocab or tokenizer) atomically to ``directory``.

    Files go to a sibling temp dir that is renamed into place, so readers never see a partial
    model; an existing model at ``directory`` is replaced.
    """
    target = Path(directory)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": model.spec,
            "train_config": config.model_dump(mode="json") if config is not None else None,
            "metrics": dict(metrics) if metrics is not None else None,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
        if isinstance(model.encoder, (ToyConvEncoder, ToySpatialEncoder)):
            (tmp / VOCAB_FILE).write_text(json.dumps(model.encoder.vocab))
        elif isinstance(model.encoder, ClipEncoder):
            model.encoder.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    return target


def read_reward_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved config.json (model spec, training config, metrics)."""
    document = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if document.get("format") != FORMAT_NAME:
        raise ValueError(f"{directory} does not hold a {FORMAT_NAME}")
    return document


def load_reward_model(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> RewardModel:
    """Rebuild a saved model (no hub access needed) in eval mode."""
    path = Path(directory)
    spec = read_reward_model_config(path)["model"]
    if spec["backbone"] == "toyconv":
        vocab = json.loads((path / VOCAB_FILE).read_text())
        model = build_toyconv_model(
            vocab,
            # Models saved before the spatial backbone existed carry no arch.
            arch=spec.get("arch", "pooled"),
            head=spec["head"],
            embed_dim=spec["embed_dim"],
            conv_channels=spec["conv_channels"],
            head_hidden=spec["head_hidden"],
        )
    elif spec["backbone"] == "clip":
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        clip = CLIPModel(CLIPConfig.from_dict(copy.deepcopy(spec["clip_config"])))
        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
        model = _assemble_clip(
            clip,
            tokenizer,
            spec["image_mean"],
            spec["image_std"],
            head=spec["head"],
            head_hidden=spec["head_hidden"],
        )
    else:
        raise ValueError(f"unknown backbone {spec['backbone']!r}")
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    return model.to(device).eval()
