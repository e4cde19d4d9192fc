"""Diffusion-DPO training engine: cached pairs, LoRA or full fine-tuning, exact resume.

The loss itself lives in :mod:`worker.dpo`; this module runs it over a fixed set of preference
pairs. The same code serves SD 1.x/2.x, SDXL (``added_cond_kwargs``) and the toy model; ε- or
v-prediction comes from the pipeline's scheduler config.

- :func:`encode_pairs` computes VAE latents and text embeddings once (:class:`CachedPairs`), so a
  training step only runs the UNet.
- :func:`train` runs the loop, checkpoints every ``checkpoint_every`` steps to
  ``ckpt_dir/step-XXXXXX`` (written to a temporary directory, then renamed), resumes exactly from
  the latest checkpoint, raises :class:`TrainingDiverged` on NaN/inf or exploding loss, and
  checkpoints then returns early when ``should_stop()`` says so (cancel, soft time limit).
- :func:`save_result` writes the output: a LoRA adapter (:mod:`worker.lora`, loaded back with
  ``pipe.load_lora_weights``) or a full UNet (``save_pretrained``).

Default recipe (:data:`RECIPE`): LoRA rank 8 on attention and convolutions (``attention+conv``),
β 2000, lr 1e-3, 300 steps of 8 pairs. Swept with ``benchmarks/dpo_recipe.py`` on the toy model
(~1 200 simulated votes; win-rate of child vs parent past a just-noticeable tolerance; the full
table is in the README, "The default DPO recipe"): "left" 0.52 with attention-only LoRA, 0.60
with ``attention+conv``, up to 0.73–0.76 with ``all`` at β 500–250; "larger" 0.63 (0.73 with
``all``, β 500); "brighter" 0.92. Only ``attention+conv`` at β 2000 kept the fidelity drop
within 2 points for every preference ("brighter" loses 4–12 points with ``all``); the prompted
position did not move at any point.

Mixed precision is plain ``torch.autocast`` (+ ``GradScaler`` for fp16) rather than
``accelerate.Accelerator``: the Accelerator's process-wide state refuses a second
``mixed_precision`` value in the same process, and a GPU worker runs many jobs with different
settings. Accelerate still provides the process topology (``PartialState``), so several GPUs
work with the standard launcher; each process trains on its own slice of every global batch and
DDP averages gradients::

    accelerate launch --multi_gpu --num_processes 4 SCRIPT.py   # SCRIPT.py calls train()
    torchrun --nproc_per_node 4 SCRIPT.py                        # equivalent

Each process loads the pipeline and the same CachedPairs; the effective batch is
``batch_size × grad_accum × num_processes`` pairs; metrics are averaged over processes and every
process keeps its own noise RNG state in the checkpoint. The test suite runs two CPU processes
(``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...``, gloo); several GPUs (NCCL) take the
same code path but are not exercised by the CPU suite.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from diffusers import DDPMScheduler
from diffusers.optimization import get_constant_schedule_with_warmup
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from app.core.storage import atomic_dir, replace_dir
from app.jobs.kinds import DPO_RECIPE, DPOTrainingParams
from worker.dpo import (
    DPOOutput,
    add_noise,
    diffusion_target,
    dpo_loss,
    effective_beta,
    per_sample_error,
    sft_loss,
)
from worker.lora import add_lora, freeze_plain_unet
from worker.lora import save_lora as _save_lora

RECIPE = DPO_RECIPE  # the default recipe, defined with the job's params

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
# Config fields that may change between a run and its resumption without changing the maths.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "explode_loss"}


# The run's hyper-parameters are the job's params model (`app.jobs.kinds`): one definition of
# every option and its default. `train_dpo` jobs pass their TrainDPOParams, a subclass.
DPOConfig = DPOTrainingParams


class TrainingDiverged(RuntimeError):
    """A loss, reward or gradient became NaN/inf or exceeded the explode threshold; the run
    stopped before the step touched the weights (DPO and RL alike)."""

    def __init__(self, reason: str, step: int) -> None:
        super().__init__(f"training diverged at step {step}: {reason}")
        self.reason = reason
        self.step = step


@dataclass(frozen=True)
class PreferencePair:
    """One training pair: ``winner`` preferred over ``loser`` with probability ``label``."""

    prompt: str
    winner: Image.Image
    loser: Image.Image
    label: float = 1.0


@dataclass
class PairBatch:
    """Model inputs of B pairs, already on the training device."""

    latents_w: Tensor  # (B, C, h, w) scaled VAE latents
    latents_l: Tensor  # (B, C, h, w)
    prompt_embeds: Tensor  # (B, L, D)
    labels: Tensor  # (B,) P(w ≻ l)
    pooled_embeds: Tensor | None = None  # (B, P) SDXL only
    time_ids_w: Tensor | None = None  # (B, 6) SDXL only
    time_ids_l: Tensor | None = None  # (B, 6) SDXL only
    empty_prompt_embeds: Tensor | None = None  # (L, D)
    empty_pooled_embeds: Tensor | None = None  # (P,) SDXL only


@dataclass
class CachedPairs:
    """Latents and text embeddings of a fixed pair set, computed once by :func:`encode_pairs`."""

    latents_w: Tensor  # (N, C, h, w)
    latents_l: Tensor  # (N, C, h, w)
    prompt_index: Tensor  # (N,) long, row of prompt_embeds for each pair
    prompt_embeds: Tensor  # (P, L, D) one row per distinct prompt
    labels: Tensor  # (N,)
    empty_prompt_embeds: Tensor  # (L, D)
    pooled_embeds: Tensor | None = None  # (P, Dp) SDXL
    empty_pooled_embeds: Tensor | None = None  # (Dp,) SDXL
    time_ids_w: Tensor | None = None  # (N, 6) SDXL
    time_ids_l: Tensor | None = None  # (N, 6) SDXL

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def batch(self, indices: Sequence[int], device: torch.device | str) -> PairBatch:
        """Gather pairs ``indices`` into a :class:`PairBatch` on ``device``."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)  # (B,)
        prompt_rows = self.prompt_index[idx]  # (B,)

        def take(t: Tensor | None, rows: Tensor) -> Tensor | None:
            return None if t is None else t[rows].to(device)

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return PairBatch(
            latents_w=self.latents_w[idx].to(device),
            latents_l=self.latents_l[idx].to(device),
            prompt_embeds=self.prompt_embeds[prompt_rows].to(device),
            labels=self.labels[idx].to(device),
            pooled_embeds=take(self.pooled_embeds, prompt_rows),
            time_ids_w=take(self.time_ids_w, idx),
            time_ids_l=take(self.time_ids_l, idx),
            empty_prompt_embeds=move(self.empty_prompt_embeds),
            empty_pooled_embeds=move(self.empty_pooled_embeds),
        )

    def save(self, path: Path) -> None:
        """Write the cache as one safetensors file."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(path))

    @classmethod
    def load(cls, path: Path) -> CachedPairs:
        """Read a cache written by :meth:`save`."""
        return cls(**load_file(str(path)))


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports (means over its pairs)."""

    step: int
    loss: float
    implicit_acc: float
    model_err_w: float
    model_err_l: float
    ref_err_w: float
    ref_err_l: float
    grad_norm: float
    lr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class ValMetrics:
    """Held-out pairs at one step: does the policy rank unseen pairs like the votes do?"""

    step: int
    val_implicit_acc: float  # label-weighted share of pairs ranked like the votes (½ = chance)
    val_reward_margin: float  # mean implicit reward margin β_eff·(Δref − Δθ), 0 at step 0
    val_loss: float
    val_pairs: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if k != "step"}


@dataclass
class TrainResult:
    """How a call to :func:`train` ended."""

    step: int  # optimizer steps completed in total (including resumed ones)
    stopped_early: bool  # should_stop() ended the run before config.steps
    checkpoint: Path | None  # the newest checkpoint on disk
    history: list[StepMetrics] = field(default_factory=list)  # steps run by this call
    validation: list[ValMetrics] = field(default_factory=list)  # held-out checks of this call


# ---------------------------------------------------------------------------------------------
# Encoding (once per pair set)


def _is_sdxl(unet: nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _default_resolution(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@torch.no_grad()
def encode_images(pipe: Any, images: Sequence[Image.Image], resolution: int) -> Tensor:
    """Scaled VAE latents of ``images`` resized to ``resolution``²: (N, C, h, w) float32 on CPU.

    The posterior mean is used rather than a sample so that the cache is deterministic.
    """
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(list(images), height=resolution, width=resolution)
    # SDXL's VAE overflows in fp16 (its config says force_upcast): encode in fp32 then.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    pixels = pixels.to(device=vae.device, dtype=dtype)  # (N, 3, H, W) in [-1, 1]
    try:
        if upcast:
            vae.to(dtype=torch.float32)
        latents = vae.encode(pixels).latent_dist.mode()  # (N, C, h, w)
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """Text embeddings (P, L, D) and, for SDXL, pooled embeddings (P, Dp), float32 on CPU."""
    device = pipe.unet.device
    if _is_sdxl(pipe.unet):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )  # fmt: skip
        return embeds.float().cpu(), pooled.float().cpu()
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return embeds.float().cpu(), None


def _time_ids(images: Sequence[Image.Image], resolution: int) -> Tensor:
    """SDXL micro-conditioning per image: (original h, w, crop top, left, target h, w) → (N, 6)."""
    rows = [[img.height, img.width, 0, 0, resolution, resolution] for img in images]
    return torch.tensor(rows, dtype=torch.float32)


def encode_batch(
    pipe: Any, pairs: Sequence[PreferencePair], resolution: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Encode pairs directly: latents_w, latents_l, prompt embeds, pooled, time_ids_w, _l."""
    res = resolution or _default_resolution(pipe)
    latents_w = encode_images(pipe, [p.winner for p in pairs], res)
    latents_l = encode_images(pipe, [p.loser for p in pairs], res)
    embeds, pooled = encode_prompts(pipe, [p.prompt for p in pairs])
    if not _is_sdxl(pipe.unet):
        return latents_w, latents_l, embeds, pooled, None, None
    time_w = _time_ids([p.winner for p in pairs], res)
    time_l = _time_ids([p.loser for p in pairs], res)
    return latents_w, latents_l, embeds, pooled, time_w, time_l


def encode_pairs(
    pipe: Any,
    pairs: Sequence[PreferencePair],
    *,
    resolution: int | None = None,
    batch_size: int = 8,
) -> CachedPairs:
    """Run the VAE and text encoders once over ``pairs``; training then only needs the UNet."""
    if not pairs:
        raise ValueError("no pairs to encode")
    res = resolution or _default_resolution(pipe)
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    row_of = {prompt: i for i, prompt in enumerate(prompts)}
    embed_chunks, pooled_chunks = [], []
    for start in range(0, len(prompts) + 1, batch_size):
        chunk = (prompts + [""])[start : start + batch_size]
        embeds, pooled = encode_prompts(pipe, chunk)
        embed_chunks.append(embeds)
        pooled_chunks.append(pooled)
    all_embeds = torch.cat(embed_chunks)  # (P + 1, L, D), the empty prompt last
    pooled_parts = [p for p in pooled_chunks if p is not None]  # all or none (SDXL or not)
    all_pooled = torch.cat(pooled_parts) if pooled_parts else None  # (P + 1, Dp)

    lat_w, lat_l = [], []
    for start in range(0, len(pairs), batch_size):
        pair_chunk = pairs[start : start + batch_size]
        lat_w.append(encode_images(pipe, [p.winner for p in pair_chunk], res))
        lat_l.append(encode_images(pipe, [p.loser for p in pair_chunk], res))
    sdxl = _is_sdxl(pipe.unet)
    return CachedPairs(
        latents_w=torch.cat(lat_w),
        latents_l=torch.cat(lat_l),
        prompt_index=torch.tensor([row_of[p.prompt] for p in pairs], dtype=torch.long),
        prompt_embeds=all_embeds[:-1],
        labels=torch.tensor([p.label for p in pairs], dtype=torch.float32),
        empty_prompt_embeds=all_embeds[-1],
        pooled_embeds=None if all_pooled is None else all_pooled[:-1],
        empty_pooled_embeds=None if all_pooled is None else all_pooled[-1],
        time_ids_w=_time_ids([p.winner for p in pairs], res) if sdxl else None,
        time_ids_l=_time_ids([p.loser for p in pairs], res) if sdxl else None,
    )


def held_out_prompts(prompts: Sequence[str], share: float) -> set[str]:
    """A stable ``share`` of the distinct ``prompts``, chosen by a hash of each prompt's text.

    For validation when a snapshot has no val-split prompts: by prompt, so no held-out pair
    shares a prompt with a training pair, and by hash, so a retry holds out the same ones.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must be in [0, 1), got {share}")

    def unit(prompt: str) -> float:  # uniform in [0, 1)
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    return {p for p in dict.fromkeys(prompts) if unit(p) < share}


# ---------------------------------------------------------------------------------------------
# Data order


class PairSampler:
    """Epoch-wise shuffled order over the usable pairs; its state is (epoch, position)."""

    def __init__(self, usable: Sequence[int], seed: int, num_processes: int, rank: int) -> None:
        if not usable:
            raise ValueError("no usable pairs (all ties dropped?)")
        self.usable = np.asarray(usable, dtype=np.int64)
        self.seed = seed
        self.num_processes = num_processes
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        # A function of (seed, epoch) only, so resuming needs no generator state.
        return self.usable[np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))]

    def next_indices(self, batch_size: int) -> list[int]:
        """This process's slice of the next global batch of ``batch_size × num_processes``."""
        global_batch: list[int] = []
        while len(global_batch) < batch_size * self.num_processes:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            global_batch.append(int(self._order[self.position]))
            self.position += 1
        return global_batch[self.rank * batch_size : (self.rank + 1) * batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


# ---------------------------------------------------------------------------------------------
# The trainer


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


class DPOTrainer:
    """Owns the policy/reference UNet(s), the optimizer and the noise RNG of one run."""

    def __init__(
        self,
        pipe: Any,
        config: DPOConfig,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        if device is None:
            # `accelerate launch --cpu` sets this; PartialState itself does not read it.
            use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
            state = PartialState(cpu=use_cpu)
            # Multi-CPU runs report "cpu:0", which torch.save then records and cannot load.
            self.device = torch.device("cpu") if state.device.type == "cpu" else state.device
            self.rank, self.num_processes = state.process_index, state.num_processes
        else:
            self.device = torch.device(device)
            self.rank, self.num_processes = 0, 1
        self.sdxl = _is_sdxl(pipe.unet)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type: str = noise_scheduler.config.prediction_type
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device)  # (T,)
        self.num_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.autocast_dtype = _weight_dtype(config.mixed_precision)
        self.unet: Any = pipe.unet  # a diffusers UNet (diffusers is untyped here)
        self.ref_unet: nn.Module | None = None
        self._prepare_models()
        self.trainable = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        params = [p for _, p in self.trainable]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.lr_scheduler = get_constant_schedule_with_warmup(self.optimizer, config.warmup_steps)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.mixed_precision == "fp16"
        )
        # Noise, timesteps and empty-prompt draws come from this generator only, so a checkpoint
        # that stores its state reproduces them exactly.
        self.noise_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)
        self.model: nn.Module = self.unet
        if self.num_processes > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device] if self.device.type == "cuda" else None
            )

    def _prepare_models(self) -> None:
        cfg = self.config
        unet = self.unet
        freeze_plain_unet(unet)
        if cfg.lora_rank > 0:
            # The frozen base may live in low precision; the LoRA weights stay fp32.
            unet.to(device=self.device)
            if self.autocast_dtype != torch.float32:
                unet.to(dtype=self.autocast_dtype)
            torch.manual_seed(cfg.seed)  # LoRA A init; B starts at zero, so θ = ref at step 0
            add_lora(unet, cfg.lora_targets, cfg.lora_rank)
            for param in unet.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            unet.to(device=self.device)
            if any(p.dtype != torch.float32 for p in unet.parameters()):
                unet.to(dtype=torch.float32)  # fp32 master weights; autocast lowers the maths
            # The copy stays in train mode like the policy (and like the LoRA reference, which is
            # the same module): some blocks take other kernels in eval mode, and θ = ref must
            # give bit-identical errors at step 0.
            self.ref_unet = copy.deepcopy(unet).train()
            if self.autocast_dtype != torch.float32:
                self.ref_unet.to(dtype=self.autocast_dtype)
            unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()

    def _errors(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Per-sample errors of winners then losers: (2B,)."""
        with self._autocast():
            pred = model(
                inputs["noisy"],
                inputs["timesteps"],
                encoder_hidden_states=inputs["embeds"],
                added_cond_kwargs=inputs.get("added_cond"),
            ).sample  # (2B, C, h, w)
        return per_sample_error(pred, inputs["target"])

    def _inputs(
        self, batch: PairBatch, draws: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Any]:
        """Shared noise/timestep for each pair; winners and losers stacked along the batch.

        ``draws`` = (noise (B, C, h, w), timesteps (B,)) replaces the training generator's.
        """
        bsz = batch.latents_w.shape[0]
        if draws is None:
            noise = torch.randn(batch.latents_w.shape, generator=self.noise_gen)  # (B, C, h, w)
            timesteps = torch.randint(0, self.num_timesteps, (bsz,), generator=self.noise_gen)
        else:
            noise, timesteps = draws
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        embeds, pooled = batch.prompt_embeds, batch.pooled_embeds  # (B, L, D), (B, Dp)
        if self.config.empty_prompt_prob > 0:
            drop = torch.rand(bsz, generator=self.noise_gen) < self.config.empty_prompt_prob
            drop = drop.to(self.device)  # (B,)
            # Batches carry the empty prompt's embeddings whenever empty_prompt_prob > 0.
            empty = batch.empty_prompt_embeds
            embeds = torch.where(drop[:, None, None], empty, embeds)  # type: ignore[arg-type]
            if pooled is not None:
                empty_pooled = batch.empty_pooled_embeds
                pooled = torch.where(drop[:, None], empty_pooled, pooled)  # type: ignore[arg-type]

        latents = torch.cat([batch.latents_w, batch.latents_l])  # (2B, C, h, w)
        noise2 = torch.cat([noise, noise])  # (2B, C, h, w)
        timesteps2 = torch.cat([timesteps, timesteps])  # (2B,)
        inputs: dict[str, Any] = {
            "noisy": add_noise(self.alphas_cumprod, latents, noise2, timesteps2),
            "timesteps": timesteps2,
            "embeds": torch.cat([embeds, embeds]),  # (2B, L, D)
            "target": diffusion_target(
                self.alphas_cumprod, latents, noise2, timesteps2, self.prediction_type
            ),
        }
        if self.sdxl:
            assert pooled is not None and batch.time_ids_w is not None
            assert batch.time_ids_l is not None
            inputs["added_cond"] = {
                "text_embeds": torch.cat([pooled, pooled]),  # (2B, Dp)
                "time_ids": torch.cat([batch.time_ids_w, batch.time_ids_l]),  # (2B, 6)
            }
        return inputs

    def compute(
        self, batch: PairBatch, draws: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, DPOOutput]:
        """The training loss of one micro-batch and its DPO diagnostics."""
        cfg = self.config
        inputs = self._inputs(batch, draws)
        model_err = self._errors(self.model, inputs)  # (2B,)
        model_err_w, model_err_l = model_err.chunk(2)  # (B,), (B,)
        with torch.no_grad(), self._reference() as ref_model:
            ref_err_w, ref_err_l = self._errors(ref_model, inputs).chunk(2)  # (B,) each
        # (B,) a majority's share of votes is a soft label; exact ties are filtered out earlier
        # unless soft_labels (worker.dpo.dpo_loss)
        labels = batch.labels
        kind = "sigmoid" if cfg.loss == "sft" else cfg.loss
        out = dpo_loss(
            model_err_w, model_err_l, ref_err_w, ref_err_l, cfg.beta,
            kind=kind, label=labels, convention=cfg.beta_convention,
        )  # fmt: skip
        loss = sft_loss(model_err_w) if cfg.loss == "sft" else out.loss
        return loss, out

    @torch.no_grad()
    def validate(self, data: CachedPairs, step: int, batch_size: int = 16) -> ValMetrics:
        """Implicit accuracy, reward margin and loss over every pair of ``data``.

        Each pair's noise and timestep are a function of its index only, so successive checks
        (and any batch size) see the same draws and their differences are the model's; the
        training generator is left untouched (exact resume). Prompts are never dropped here.
        """
        saved_prob = self.config.empty_prompt_prob
        self.config.empty_prompt_prob = 0.0
        beta_eff = effective_beta(self.config.beta, self.config.beta_convention)
        sums = torch.zeros(3, dtype=torch.float64)  # acc, margin, loss (sums over pairs)
        shape = tuple(data.latents_w.shape[1:])  # (C, h, w)

        def draw(i: int) -> tuple[Tensor, Tensor]:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7_919 * (i + 1))
            t = torch.randint(0, self.num_timesteps, (1,), generator=gen)
            return torch.randn((1, *shape), generator=gen), t  # (1, C, h, w), (1,)

        try:
            for start in range(0, len(data), batch_size):
                rows = range(start, min(start + batch_size, len(data)))
                noises, steps = zip(*(draw(i) for i in rows), strict=True)
                draws = (torch.cat(noises), torch.cat(steps))  # (B, C, h, w), (B,)
                _, out = self.compute(data.batch(rows, self.device), draws)
                n = out.losses.shape[0]
                margin = beta_eff * out.logits  # (B,)
                sums += torch.stack(
                    [
                        out.implicit_acc.double().cpu() * n,
                        margin.sum().double().cpu(),
                        out.losses.sum().double().cpu(),
                    ]
                )
        finally:
            self.config.empty_prompt_prob = saved_prob
        means = sums / len(data)
        return ValMetrics(step, float(means[0]), float(means[1]), float(means[2]), len(data))

    def _all_mean(self, values: Tensor) -> Tensor:
        if self.num_processes > 1:
            torch.distributed.all_reduce(values)
            values = values / self.num_processes
        return values

    def train_step(self, micro_batches: Sequence[PairBatch], step: int) -> StepMetrics:
        """One optimizer step over ``micro_batches`` (gradient accumulation).

        Raises :class:`TrainingDiverged` before touching the weights if the loss is bad.
        """
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        # loss, implicit_acc, model_err_w, model_err_l, ref_err_w, ref_err_l
        sums = torch.zeros(6, dtype=torch.float64)
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            sync = i == n - 1 or self.num_processes == 1
            # DDP's no_sync; nn.Module's attribute lookup types it as a Tensor | Module.
            no_sync = contextlib.nullcontext() if sync else self.model.no_sync()  # type: ignore[operator]
            with no_sync:
                loss, out = self.compute(batch)
                self.scaler.scale(loss / n).backward()
            sums += torch.stack(
                [
                    loss.detach().double().cpu(),
                    out.implicit_acc.double().cpu(),
                    out.model_err_w.mean().double().cpu(),
                    out.model_err_l.mean().double().cpu(),
                    out.ref_err_w.mean().double().cpu(),
                    out.ref_err_l.mean().double().cpu(),
                ]
            )
        means = self._all_mean((sums / n).to(self.device)).cpu()
        mean_loss = float(means[0])
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss is {mean_loss}", step)
        if mean_loss > cfg.explode_loss:
            raise TrainingDiverged(f"loss {mean_loss:.4g} > explode_loss {cfg.explode_loss}", step)

        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], max_norm))
        # fp16 overflow is routine (the scaler skips the step); anywhere else it is divergence.
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise TrainingDiverged(f"gradient norm is {grad_norm}", step)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            # When the fp16 scaler skips an overflowing step the schedule still advances, as
            # in the diffusers scripts; torch warns about exactly that.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.lr_scheduler.step()
        return StepMetrics(
            step=step,
            loss=mean_loss,
            implicit_acc=float(means[1]),
            model_err_w=float(means[2]),
            model_err_l=float(means[3]),
            ref_err_w=float(means[4]),
            ref_err_l=float(means[5]),
            grad_norm=grad_norm,
            lr=lr,
        )

    # -- checkpoints --------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.trainable}

    def save_checkpoint(self, ckpt_dir: Path, step: int, sampler: PairSampler) -> Path:
        """Write ``ckpt_dir/step-XXXXXX`` atomically; returns its path."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
        tmp = ckpt_dir / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's leftovers
            tmp.mkdir()
        self._barrier()
        self._save_rng(tmp)
        if self.rank == 0:
            save_file(self.trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            torch.save(self.scaler.state_dict(), tmp / "grad_scaler.pt")
            state = {
                "step": step,
                "sampler": sampler.state_dict(),
                "config": _training_settings(self.config),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        self._barrier()
        if self.rank == 0:
            replace_dir(tmp, final)
        self._barrier()
        return final

    def load_checkpoint(self, path: Path, sampler: PairSampler) -> int:
        """Restore everything :meth:`save_checkpoint` wrote; returns the step."""
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state["config"]
        current = _training_settings(self.config)
        changed = {
            name
            for name, value in current.items()
            if name not in _RESUMABLE_CHANGES and name in saved and saved[name] != value
        }
        if changed:
            raise ValueError(f"checkpoint {path} was written with different {sorted(changed)}")
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(self.trainable)
        if set(weights) != set(params):
            raise ValueError(f"checkpoint {path} does not match the trainable parameters")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        self.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
        self.scaler.load_state_dict(torch.load(path / "grad_scaler.pt", weights_only=True))
        self._load_rng(path)
        sampler.load_state_dict(state["sampler"])
        return int(state["step"])

    def _save_rng(self, directory: Path) -> None:
        tensors = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda{i}"] = s
        save_file(tensors, str(directory / f"rng-rank{self.rank}.safetensors"))
        np_state = np.random.get_state()
        py_state = random.getstate()
        other = {
            # legacy=True, the default, gives the tuple form the stubs do not single out.
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # type: ignore[index]
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        }
        (directory / f"rng-rank{self.rank}.json").write_text(json.dumps(other))

    def _load_rng(self, directory: Path) -> None:
        tensors = load_file(str(directory / f"rng-rank{self.rank}.safetensors"))
        torch.set_rng_state(tensors["torch"])
        self.noise_gen.set_state(tensors["noise"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        other = json.loads((directory / f"rng-rank{self.rank}.json").read_text())
        kind, keys, *rest = other["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        version, internal, gauss = other["python"]
        random.setstate((version, tuple(internal), gauss))

    def _barrier(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------
# The loop


def _training_settings(config: DPOConfig) -> dict[str, Any]:
    """The run's hyper-parameters as JSON (a job's own fields, such as its name, left out)."""
    return config.model_dump(mode="json", include=set(DPOTrainingParams.model_fields))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    # Every name matched in the filter above, so match() is not None here.
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def _usable_pairs(data: CachedPairs, config: DPOConfig) -> list[int]:
    if config.soft_labels:
        return list(range(len(data)))
    return [i for i, p in enumerate(data.labels.tolist()) if p != 0.5]


def train(
    pipe: Any,
    data: CachedPairs,
    config: DPOConfig,
    ckpt_dir: Path,
    *,
    on_metrics: Callable[[StepMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
    val_data: CachedPairs | None = None,
    val_every: int = 25,
    on_validation: Callable[[ValMetrics], None] | None = None,
) -> TrainResult:
    """Train ``pipe.unet`` with Diffusion-DPO, resuming from the newest checkpoint if any.

    ``on_metrics`` receives each step's metrics (progress = step / config.steps);
    ``should_stop`` is polled after every step, and a True answer checkpoints and returns.
    With ``val_data`` (pairs on held-out prompts), every ``val_every`` steps and at the last
    step :meth:`DPOTrainer.validate` runs and ``on_validation`` receives its figures.
    ``pipe.unet`` is modified in place (LoRA adapter added, or weights updated).
    """
    if val_every < 1:
        raise ValueError("val_every must be ≥ 1")
    ckpt_dir = Path(ckpt_dir)
    trainer = DPOTrainer(pipe, config, device=device)
    sampler = PairSampler(
        _usable_pairs(data, config), config.seed, trainer.num_processes, trainer.rank
    )
    existing = list_checkpoints(ckpt_dir)
    step = trainer.load_checkpoint(existing[-1], sampler) if existing else 0
    last = existing[-1] if existing else None
    history: list[StepMetrics] = []
    validation: list[ValMetrics] = []

    def checkpoint() -> Path:
        path = trainer.save_checkpoint(ckpt_dir, step, sampler)
        if trainer.rank == 0:
            for old in list_checkpoints(ckpt_dir)[: -config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    while step < config.steps:
        micro = [
            data.batch(sampler.next_indices(config.batch_size), trainer.device)
            for _ in range(config.grad_accum)
        ]
        metrics = trainer.train_step(micro, step + 1)
        step += 1
        history.append(metrics)
        if step % config.checkpoint_every == 0 or step == config.steps:
            last = checkpoint()
        if on_metrics is not None:
            on_metrics(metrics)
        if (
            val_data is not None
            and len(val_data)
            and (step % val_every == 0 or step == config.steps)
        ):
            validation.append(trainer.validate(val_data, step))
            if on_validation is not None:
                on_validation(validation[-1])
        if step < config.steps and should_stop is not None and should_stop():
            if last is None or last.name != f"{CHECKPOINT_PREFIX}{step:06d}":
                last = checkpoint()
            return TrainResult(step, True, last, history, validation)
    return TrainResult(step, False, last, history, validation)


# ---------------------------------------------------------------------------------------------
# Output


def save_lora(unet: nn.Module, out_dir: Path, *, sdxl: bool | None = None) -> Path:
    """Write the UNet's LoRA so that ``pipe.load_lora_weights`` restores it (:mod:`worker.lora`)."""
    return _save_lora(unet, out_dir, sdxl=sdxl)
    return out_dir


def save_result(pipe: Any, config: DPOConfig, out_dir: Path) -> Path:
    """Write what a run produced: the LoRA adapter, or, when lora_rank is 0, the whole pipeline
    with its fine-tuned UNet (a directory the generator loads as a model)."""
    if config.lora_rank > 0:
        return save_lora(pipe.unet, out_dir)
    with atomic_dir(Path(out_dir)) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)
