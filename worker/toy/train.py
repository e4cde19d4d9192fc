"""Train the toy text-to-image model from scratch on rendered toy-world scenes.

Two phases on one wall-clock budget: the VAE learns to reconstruct rendered images, then the
UNet (with the text encoder, jointly) learns DDPM epsilon prediction on the VAE's latents,
with classifier-free-guidance dropout so guidance works at sampling time. Given the same
seed and the same number of steps the result is the same on the same machine; the time budget
only decides how many steps run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from app.core.storage import atomic_dir
from worker.toy import world
from worker.toy.model import ToyComponents, ToyModelConfig, build_components, save_pipeline

log = logging.getLogger(__name__)


@dataclass
class ToyTrainConfig:
    """Training knobs; the defaults are the recipe of the shipped toy-v1 weights."""

    minutes: float = 60.0  # wall-clock budget for both phases; stops early when it runs out
    seed: int = 0
    # Share of the budget for the VAE; the UNet needs far more steps than the autoencoder.
    vae_fraction: float = 0.2
    # Step counts of the shipped toy-v1 recipe (3 064 VAE and 4 028 UNet steps, time-capped);
    # reaching them on two idle CPU cores takes well under the budget. None = time only.
    vae_max_steps: int | None = 3000
    unet_max_steps: int | None = 4000
    # Rendered training set: ~20 k scenes covers every attribute combination (5 832) a few
    # times over, with jitter; rendering takes seconds.
    dataset_size: int = 20_000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    # Small KL weight: the latents only need to be smooth enough for the decoder to tolerate
    # the UNet's errors, not close to N(0, 1) (the scaling factor takes care of the scale).
    kl_weight: float = 1e-4
    unet_batch: int = 128
    unet_lr: float = 5e-4
    ema_decay: float = 0.998  # averaged weights are what gets saved; they sample cleaner
    cfg_dropout: float = 0.1  # share of captions replaced by "" (unconditional)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting: faster convergence for small models
    # One thread by default: the cores are shared, and two threads stall each other badly when
    # another process is busy (measured ~5× slower steps than one thread under load).
    threads: int = 1
    device: str = "cpu"
    # UNet step -> extra directory saved at that step (a weaker checkpoint for comparisons).
    snapshots: dict[int, Path] = field(default_factory=dict)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction: min(SNR, γ) / SNR, per sample.

    SNR(t) = ᾱ_t / (1 − ᾱ_t). Low-noise steps (huge SNR) are down-weighted so they stop
    dominating the gradient (Hang et al., 2023).
    """
    alpha_bar = alphas_cumprod[timesteps]  # (B,)
    snr = alpha_bar / (1.0 - alpha_bar)  # (B,)
    return torch.clamp(snr, max=gamma) / snr


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) ‖ N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def drop_captions(captions: list[str], rng: np.random.Generator, p: float) -> list[str]:
    """Captions with each replaced by "" with probability p (classifier-free guidance)."""
    keep = rng.random(len(captions)) >= p
    return [c if k else "" for c, k in zip(captions, keep, strict=True)]


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return x / 127.5 - 1.0


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def make_dataset(n: int, seed: int, size: int) -> tuple[np.ndarray, list[str]]:
    """`n` rendered scenes (N, size, size, 3) uint8 with prompts naming some of their attributes.

    Captions follow the prompt sampler, so the model sees exactly the prompt distribution it will
    be asked about, with every unnamed attribute varying in the pixels.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        spec = world.sample_spec(rng)
        images[i] = world.render_scene(world.resolve(spec, rng), size)
        captions.append(world.format_prompt(spec))
    return images, captions


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled index batches over range(n)."""
    batch = min(batch, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


def _encode_text(parts: ToyComponents, captions: list[str]) -> torch.Tensor:
    """Text hidden states (B, T, D), tokenized exactly as StableDiffusionPipeline does."""
    ids = parts.tokenizer(
        captions,
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # (B, T)
    return parts.text_encoder(ids.to(parts.text_encoder.device))[0]


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def train_vae(
    parts: ToyComponents,
    images: np.ndarray,
    cfg: ToyTrainConfig,
    seconds: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Fit the VAE to reconstruct `images` for `seconds` (or `cfg.vae_max_steps`)."""
    vae = parts.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    batches = _batches(len(images), cfg.vae_batch, rng)
    start, step, stats = time.monotonic(), 0, {"recon": float("nan"), "kl": float("nan")}
    bar = tqdm(total=cfg.vae_max_steps, desc="toy vae", unit="step")
    while time.monotonic() - start < seconds and (
        cfg.vae_max_steps is None or step < cfg.vae_max_steps
    ):
        x = to_model_range(images[next(batches)]).to(cfg.device)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, 3, H, W)
        recon_loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x)
        kl = kl_to_standard_normal(posterior.mean, posterior.logvar)
        loss = recon_loss + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        stats = {"recon": float(recon_loss.detach()), "kl": float(kl.detach())}
        bar.update(1)
        bar.set_postfix(stats, refresh=False)
    bar.close()
    vae.eval()
    return {**stats, "steps": float(step)}


@torch.no_grad()
def encode_latents(
    parts: ToyComponents, images: np.ndarray, batch: int = 256, device: str = "cpu"
) -> torch.Tensor:
    """Posterior (mean, std) of every image, stacked: (N, 2, C, h, w), unscaled."""
    out = []
    for start in range(0, len(images), batch):
        x = to_model_range(images[start : start + batch]).to(device)
        dist = parts.vae.encode(x).latent_dist
        out.append(torch.stack([dist.mean, dist.std], dim=1))  # (b, 2, C, h, w)
    return torch.cat(out)


def train_unet(
    parts: ToyComponents,
    latents: torch.Tensor,
    captions: list[str],
    cfg: ToyTrainConfig,
    seconds: float,
    rng: np.random.Generator,
    save: Callable[[int, ToyComponents], None] | None = None,
) -> dict[str, float]:
    """Fit UNet and text encoder to predict the noise added to scaled latents.

    `latents` is (N, 2, C, h, w) posterior mean/std from `encode_latents`; a fresh posterior
    sample is drawn each step so the UNet never memorises one encoding. `save(step, parts)` is
    called for each snapshot step, with the EMA weights in place.
    """
    unet, text_encoder = parts.unet.train(), parts.text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    scaling = float(parts.vae.config.scaling_factor)
    device = cfg.device
    alphas_cumprod = parts.scheduler.alphas_cumprod.float().to(device)  # (T,)
    num_t = parts.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    batches = _batches(len(latents), cfg.unet_batch, rng)
    start, step, loss_ema = time.monotonic(), 0, float("nan")
    bar = tqdm(total=cfg.unet_max_steps, desc="toy unet", unit="step")

    def swap_in_ema() -> tuple[torch.nn.Module, torch.nn.Module]:
        live = (parts.unet, parts.text_encoder)
        parts.unet, parts.text_encoder = ema_unet, ema_text
        return live

    while time.monotonic() - start < seconds and (
        cfg.unet_max_steps is None or step < cfg.unet_max_steps
    ):
        idx = next(batches)
        post = latents[torch.from_numpy(idx).to(latents.device)]  # (B, 2, C, h, w)
        mean, std = post[:, 0], post[:, 1]  # (B, C, h, w) each
        # Noise is drawn on the CPU generator so a run is the same whatever the device.
        z0 = (mean + std * torch.randn(mean.shape, generator=gen).to(device)) * scaling
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, num_t, (len(idx),), generator=gen).to(device)  # (B,)
        zt = parts.scheduler.add_noise(z0, noise, t)
        text = _encode_text(parts, drop_captions([captions[i] for i in idx], rng, cfg.cfg_dropout))
        pred = unet(zt, t, text).sample  # (B, C, h, w)
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        weights = min_snr_weights(t, alphas_cumprod, cfg.min_snr_gamma)  # (B,)
        loss = (weights * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # Warm the average up quickly so short runs still save a useful model.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        step += 1
        value = float(loss.detach())
        loss_ema = value if step == 1 else 0.98 * loss_ema + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
        if save is not None and step in cfg.snapshots:
            live = swap_in_ema()
            save(step, parts)
            parts.unet, parts.text_encoder = live
    bar.close()
    swap_in_ema()  # the averaged weights are the result
    parts.unet.eval()
    parts.text_encoder.eval()
    return {"loss": loss_ema, "steps": float(step)}


def _save_atomically(parts: ToyComponents, out: Path, info: dict) -> Path:
    """Save the pipeline to `out` via a sibling temporary directory and a rename."""
    out = Path(out)
    devices = {n: getattr(parts, n).device for n in ("text_encoder", "vae", "unet")}
    for name in devices:
        getattr(parts, name).to("cpu")
    with atomic_dir(out) as tmp:
        save_pipeline(parts, tmp)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    for name, device in devices.items():
        getattr(parts, name).to(device)
    return out


def train_toy_model(out: Path, cfg: ToyTrainConfig) -> Path:
    """Train a toy pipeline from scratch and save it under `out`; returns `out`."""
    torch.set_num_threads(max(1, min(cfg.threads, os.cpu_count() or 1)))
    rng = np.random.default_rng(cfg.seed)
    budget = cfg.minutes * 60.0
    started = time.monotonic()
    parts = build_components(cfg.model, seed=cfg.seed)
    for name in ("text_encoder", "vae", "unet"):
        getattr(parts, name).to(cfg.device)
    images, captions = make_dataset(cfg.dataset_size, cfg.seed, cfg.model.image_size)
    log.info("toy.dataset_rendered", extra={"n": len(images)})

    vae_stats = train_vae(parts, images, cfg, budget * cfg.vae_fraction, rng)
    latents = encode_latents(parts, images, device=cfg.device)  # (N, 2, C, h, w)
    # Scale latents to unit variance, as SD's scaling_factor does for its VAE.
    scaling = float(1.0 / latents[:, 0].std().clamp_min(1e-6))
    parts.vae.register_to_config(scaling_factor=scaling)

    info: dict = {
        "config": asdict(cfg),
        "vae": vae_stats,
        "scaling_factor": scaling,
    }

    def snapshot(step: int, snap_parts: ToyComponents) -> None:
        _save_atomically(snap_parts, cfg.snapshots[step], {**info, "unet": {"steps": step}})

    remaining = budget - (time.monotonic() - started)
    unet_stats = train_unet(parts, latents, captions, cfg, remaining, rng, save=snapshot)
    info["unet"] = unet_stats
    info["minutes"] = (time.monotonic() - started) / 60.0
    return _save_atomically(parts, out, info)
