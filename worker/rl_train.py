"""Online RL fine-tuning (GRPO / DDPO with a KL anchor) of a diffusion pipeline's UNet.

Each step: sample a group of G images for each of P prompts with the current policy and a
stochastic DDIM sampler (:func:`worker.rl.ddim_step_with_logprob`, log-probabilities recorded),
score them with pluggable :class:`Scorer` s, turn the scores into advantages (GRPO's group
normalisation or DDPO's per-prompt baseline), and update the policy with PPO's clipped
objective on every denoising step of each trajectory (or K randomly chosen ones, Flow-GRPO's
"denoising reduction", with ``train_timesteps``), plus ``kl_coef`` × the closed-form KL
between the policy's and the parent's Gaussian transitions. With LoRA the parent is the same
UNet with the adapter disabled.

With ``objective="reward_backprop"`` the step is instead AlignProp / DRaFT: the G chains per
prompt are sampled with gradients (each stochastic step reparameterised, its noise fixed),
decoded, scored by a differentiable reward (a reward model), and the policy follows the reward's
gradient through the whole chain, with the same KL anchor at the chain's own states. Policy
gradients need only reward values and credit each transition by its noise; a reward model's
gradient says directly which way each pixel should move, so a layout decided in the first
denoising steps gets a signal there.

A probe set of held-out prompts with fixed noise is sampled every ``eval_every`` steps and
scored by the primary reward, a guard reward (an independently trained reward model) and a
prompt-fidelity scorer: when the primary reward's gain outruns the guard's by more than
``max_reward_divergence`` (both in units of the step-0 spread) or fidelity falls by more than
``max_fidelity_drop``, training stops and the weights go back to the last probe that passed.

Checkpoints (``ckpt_dir/step-XXXXXX``) hold the trainable weights, the optimizer, the random
state and the guard's record, so a resumed run continues bit for bit.

Where this differs from the papers:
- DDPO (Black et al. 2023) trains every denoising step, has no groups and no KL term; here
  every step too by default (Flow-GRPO's random K of T, optional, lowered the toy reward where
  all T and one on-policy update per batch raised it), GRPO groups by default (DDPO's
  per-prompt baseline is ``advantage="prompt"``) and a KL anchor (DPOK, Flow-GRPO). Its
  per-dimension mean of the log-probability and the ±5 advantage clip are kept.
- DPOK (Fan et al. 2023) regularises with a KL bound summed over the whole chain and weighs
  reward and KL per step; here the closed-form KL of the equal-σ Gaussian transitions, averaged
  per dimension, only on the K trained transitions, as Flow-GRPO's code does.
- Flow-GRPO (Liu et al. 2025) turns a flow-matching ODE into an SDE (SD3.5); here the sampler is
  DDIM with η > 0 for ε/v-prediction UNets. Its "denoising reduction" (train on 10 sampling
  steps, generate with the model's own) is kept: ``sample_steps`` is independent of the model's
  generation steps, and the child is judged with its parent's deterministic sampler.
- Sizes and rates suit the toy world (8×8 latents): G = 8 (Flow-GRPO 24), lr 1e-3 (3e-4),
  clip range 1e-3 (DDPO 1e-4), kl_coef 0.01 (Flow-GRPO 0.04); fp32, one process (no EMA,
  no mixed precision, no multi-GPU).
- The guard (held-out probe prompts, a second reward model, fidelity, rollback to the last
  passing probe) is this platform's; the papers watch held-out metrics by hand.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from app.core.storage import atomic_dir
from app.generators.schemas import GenerationParams
from app.jobs.kinds import RLTrainingParams
from worker.dpo_train import TrainingDiverged
from worker.lora import add_lora, freeze_plain_unet
from worker.rl import (
    PromptStatTracker,
    ddim_sigma,
    ddim_step_with_logprob,
    gaussian_kl_equal_std,
    group_advantages,
    ppo_clipped_loss,
    reward_backprop_loss,
    timestep_weights,
)

CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
LAST_GOOD_FILE = "last-good.safetensors"
# Changing these between a run and its resumption does not change the maths of past steps.
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last"}


# ---------------------------------------------------------------------------------------------
# Configuration


# The run's hyper-parameters are the job's params model (`app.jobs.kinds`): one definition of
# every option and its default. `train_rl` jobs pass their TrainRLParams, a subclass.
RLConfig = RLTrainingParams

# Guidance when neither the run nor the model names one: the platform's sampling default.
DEFAULT_GUIDANCE = GenerationParams().guidance_scale


# ---------------------------------------------------------------------------------------------
# Scorers


class Scorer(Protocol):
    """Anything that scores images for prompts: (B,) from B prompts and (B, 3, H, W) in [0, 1]."""

    name: str

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor: ...


class DifferentiableScorer(Scorer, Protocol):
    """A scorer whose scores carry gradients back to the images (reward backpropagation)."""

    def differentiable(self, prompts: Sequence[str], images: Tensor) -> Tensor: ...


def is_differentiable(scorer: Scorer) -> bool:
    """Whether ``scorer`` can score with gradients (WeightedSum: every part can)."""
    if isinstance(scorer, WeightedSum):
        return all(is_differentiable(part) for part, _ in scorer.parts)
    return callable(getattr(scorer, "differentiable", None))


class RewardModelScorer:
    """A project reward model (:class:`worker.reward_model.RewardModel`) as a scorer."""

    def __init__(self, model: Any, name: str = "reward") -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name

    def differentiable(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        """(B,) scores of (B, 3, H, W) images in [0, 1], with gradients to the images."""
        from worker.reward_model import resize_center_crop

        size = getattr(self.model.encoder, "input_size", None)
        pixels = images.float()  # (B, 3, H, W)
        if size is not None:
            pixels = resize_center_crop(pixels, size)
        return self.model.score(list(prompts), pixels).float()  # (B,)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return self.differentiable(prompts, images.cpu()).cpu()  # (B,)


class ToyFidelityScorer:
    """Share of the prompt's named attributes the image shows (the toy world's own reader)."""

    name = "fidelity"

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        from worker.toy.world import prompt_alignment

        arrays = to_uint8(images)
        return torch.tensor(
            [prompt_alignment(p, a) for p, a in zip(prompts, arrays, strict=True)]
        )  # (B,)


class ToyRecogniserScorer:
    """Mean log-probability the toy recogniser gives the prompt's named shape and colour: the
    differentiable fidelity term of the training reward (the reader stays the judge)."""

    name = "fidelity"

    def __init__(self, model: nn.Module | None = None) -> None:
        from worker.toy.recogniser import default_recogniser

        self.model = model if model is not None else default_recogniser()

    def differentiable(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        from worker.toy.recogniser import fidelity_log_likelihood, named_labels
        from worker.toy.world import DEFAULT_SIZE as size

        self.model.to(images.device)
        pixels = images.float()  # (B, 3, H, W) in [0, 1]
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        shape_logits, colour_logits = self.model(pixels)  # (B, 4), (B, 6)
        return fidelity_log_likelihood(shape_logits, colour_logits, *named_labels(prompts))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return self.differentiable(prompts, images).cpu()  # (B,)


class WeightedSum:
    """Σ_i w_i · scorer_i: the training reward from several scorers."""

    def __init__(self, parts: Sequence[tuple[Scorer, float]]) -> None:
        if not parts:
            raise ValueError("no scorers")
        self.parts = list(parts)
        self.name = "+".join(f"{w:g}*{s.name}" for s, w in self.parts)

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        total = torch.zeros(images.shape[0])
        for scorer, weight in self.parts:
            total = total + weight * scorer(prompts, images).float()
        return total  # (B,)

    def differentiable(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        if not is_differentiable(self):
            raise ValueError(f"{self.name} has a part that cannot score with gradients")
        total = torch.zeros(images.shape[0], device=images.device)
        for scorer, weight in self.parts:
            part = cast(DifferentiableScorer, scorer).differentiable(prompts, images)
            total = total + weight * part.to(images.device)
        return total  # (B,)


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] → B arrays (H, W, 3) uint8, rounded as a PNG would store them."""
    scaled = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return list(scaled.permute(0, 2, 3, 1).cpu().numpy())


# ---------------------------------------------------------------------------------------------
# Prompt conditioning


@dataclass
class Conditioning:
    """Text conditioning of B samples for classifier-free guidance."""

    cond: Tensor  # (B, L, D)
    uncond: Tensor  # (B, L, D)
    pooled: Tensor | None = None  # (B, Dp) SDXL
    uncond_pooled: Tensor | None = None  # (B, Dp) SDXL
    time_ids: Tensor | None = None  # (B, 6) SDXL

    def rows(self, index: Tensor) -> Conditioning:
        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Conditioning(
            self.cond[index], self.uncond[index], take(self.pooled),
            take(self.uncond_pooled), take(self.time_ids),
        )  # fmt: skip


def _is_sdxl(unet: nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


class PromptEncoder:
    """Text embeddings per distinct prompt, computed once and kept on the CPU."""

    def __init__(self, pipe: Any, height: int, width: int) -> None:
        self.pipe = pipe
        self.cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        self.sdxl = _is_sdxl(pipe.unet)
        self.time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)

    def _encode(self, prompts: Sequence[str]) -> None:
        from worker.dpo_train import encode_prompts

        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            embeds, pooled = encode_prompts(self.pipe, missing)  # (M, L, D), (M, Dp)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = (embeds[i], None if pooled is None else pooled[i])

    def __call__(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        self._encode([*prompts, ""])
        cond = torch.stack([self.cache[p][0] for p in prompts]).to(device)  # (B, L, D)
        empty, empty_pooled = self.cache[""]
        uncond = empty.expand_as(cond).to(device)  # (B, L, D)
        if not self.sdxl:
            return Conditioning(cond, uncond)
        # SDXL encoders always give a pooled embedding, so no entry is None here.
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(device)  # type: ignore[misc]
        assert empty_pooled is not None
        return Conditioning(
            cond, uncond, pooled, empty_pooled.expand_as(pooled).to(device),
            self.time_ids.expand(len(prompts), 6).to(device),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Trajectories:
    """B sampled denoising chains and their images' rewards."""

    prompts: list[str]  # B
    latents: Tensor  # (B, T + 1, C, h, w) x_T … x_0
    log_probs: Tensor  # (B, T) log p_old(x_{s} | x_t)
    images: Tensor  # (B, 3, H, W) in [0, 1]
    rewards: Tensor  # (B,)


@dataclass(frozen=True)
class StepMetrics:
    """What one RL step reports."""

    step: int
    reward_mean: float
    reward_std: float
    advantage_std: float
    kl: float
    clip_fraction: float
    approx_kl_old: float  # ½·E[(log π_θ − log π_old)²] over trained transitions
    policy_loss: float
    grad_norm: float

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "step"}


@dataclass(frozen=True)
class ProbeMetrics:
    """The reward-hacking guard's view of the policy on the held-out probe set."""

    step: int
    reward: float
    guard: float | None
    fidelity: float | None
    divergence: float | None  # z-gain of the reward minus z-gain of the guard
    fidelity_drop: float | None
    stop_reason: str | None

    def as_dict(self) -> dict[str, float]:
        values = {
            "probe_reward": self.reward,
            "probe_guard": self.guard,
            "probe_fidelity": self.fidelity,
            "probe_divergence": self.divergence,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class RLResult:
    """How a call to :func:`train` ended."""

    step: int
    stopped_early: bool  # should_stop() interrupted the run (cancel, time limit)
    guard_stop: str | None  # why the guard ended the run (weights rolled back), or None
    checkpoint: Path | None
    history: list[StepMetrics] = field(default_factory=list)
    probes: list[ProbeMetrics] = field(default_factory=list)


class RLTrainer:
    """Holds the policy, its reference, the optimizer and the random state."""

    def __init__(
        self,
        pipe: Any,
        config: RLConfig,
        reward: Scorer,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if config.objective == "reward_backprop" and not is_differentiable(reward):
            raise ValueError(f"reward_backprop needs a differentiable reward; {reward.name} is not")
        self.pipe = pipe
        self.config = config
        self.reward = reward
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.unet: Any = pipe.unet  # a diffusers UNet (diffusers is untyped here)
        self.ref_unet: nn.Module | None = None
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        # DDIM timesteps of the pipeline's own noise schedule, whatever sampler it generates with.
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(config.sample_steps)
        self.timesteps = scheduler.timesteps.clone()  # (T,) descending
        ratio = scheduler.config.num_train_timesteps // config.sample_steps
        abar = scheduler.alphas_cumprod.float()
        prev = self.timesteps - ratio
        self.abar_t = abar[self.timesteps]  # (T,)
        self.abar_prev = torch.where(
            prev >= 0, abar[prev.clamp(min=0)], scheduler.final_alpha_cumprod.float()
        )  # (T,)
        self.step_weights = timestep_weights(
            ddim_sigma(self.abar_t, self.abar_prev, config.eta), config.timestep_weighting
        )  # (T,)
        sample = pipe.unet.config.sample_size
        self.latent_hw = (sample, sample) if isinstance(sample, int) else tuple(sample)
        height, width = (s * pipe.vae_scale_factor for s in self.latent_hw)
        self.encoder = PromptEncoder(pipe, height, width)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.tracker = PromptStatTracker()
        pipe.vae.to(self.device).requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if getattr(pipe, "text_encoder_2", None) is not None:
            pipe.text_encoder_2.requires_grad_(False)
        self._prepare_models()
        self.trainable = [(n, p) for n, p in self.unet.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )

    def _prepare_models(self) -> None:
        cfg = self.config
        unet = self.unet
        freeze_plain_unet(unet)
        unet.to(device=self.device, dtype=torch.float32)
        if cfg.lora_rank > 0:
            torch.manual_seed(cfg.seed)  # LoRA A init; B starts at zero, so θ = parent at step 0
            add_lora(unet, cfg.lora_targets, cfg.lora_rank)
        else:
            self.ref_unet = copy.deepcopy(unet).eval()
            unet.requires_grad_(True)
        unet.eval()  # no dropout: the sampled and the re-scored transitions must agree

    # -- the policy and its reference -----------------------------------------------------------

    def _guided(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Classifier-free guided network output (B, C, h, w) at per-sample timesteps t (B,)."""
        g = self.config.guidance_scale
        g = DEFAULT_GUIDANCE if g is None else g
        both = torch.cat([x, x])  # (2B, C, h, w)
        embeds = torch.cat([cond.uncond, cond.cond])  # (2B, L, D)
        added = None
        if cond.pooled is not None:
            assert cond.uncond_pooled is not None and cond.time_ids is not None
            added = {
                "text_embeds": torch.cat([cond.uncond_pooled, cond.pooled]),
                "time_ids": torch.cat([cond.time_ids, cond.time_ids]),
            }
        out = unet(
            both, torch.cat([t, t]), encoder_hidden_states=embeds, added_cond_kwargs=added
        ).sample  # (2B, C, h, w)
        uncond, text = out.float().chunk(2)
        return uncond + g * (text - uncond)

    def reference_output(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The parent's guided output: the adapter disabled, or the frozen copy."""
        with torch.no_grad():
            if self.ref_unet is not None:
                return self._guided(self.ref_unet, x, t, cond)
            self.unet.disable_adapters()
            try:
                return self._guided(self.unet, x, t, cond)
            finally:
                self.unet.enable_adapters()

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Latent chains (B, T+1, C, h, w), their log-probs (B, T) and the images (B, 3, H, W)."""
        cond = self.encoder(prompts, self.device)
        channels = self.unet.config.in_channels
        x = torch.randn((len(prompts), channels, *self.latent_hw), generator=generator)
        x = x.to(self.device)  # (B, C, h, w)
        chain, log_probs = [x], []
        for i, t in enumerate(self.timesteps):
            t_batch = t.expand(len(prompts)).to(self.device)  # (B,)
            out = self._guided(self.unet, x, t_batch, cond)
            step = ddim_step_with_logprob(
                out, x, self.abar_t[i], self.abar_prev[i], self.config.eta,
                prediction_type=self.prediction_type, generator=generator,
            )  # fmt: skip
            x = step.prev_sample
            chain.append(x)
            log_probs.append(step.log_prob)
        return torch.stack(chain, dim=1), torch.stack(log_probs, dim=1), self.decode(x)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) scaled latents → (B, 3, H, W) images in [0, 1], on the CPU."""
        return self.decode_differentiable(latents).cpu()

    def decode_differentiable(self, latents: Tensor) -> Tensor:
        """:meth:`decode` on the trainer's device, with gradients to the latents."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        pixels = vae.decode(z).sample  # (B, 3, H, W) in about [-1, 1]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    def rollout(self, prompts: Sequence[str]) -> Trajectories:
        """Sample G images per prompt (prompt-major) and score them."""
        repeated = [p for p in prompts for _ in range(self.config.group_size)]
        latents, log_probs, images = self.sample(repeated, self.gen)
        rewards = self.reward(repeated, images).float()  # (B,)
        return Trajectories(
            prompts=repeated,
            latents=latents,
            log_probs=log_probs,
            images=images,
            rewards=rewards,
        )

    def advantages(self, traj: Trajectories) -> Tensor:
        cfg = self.config
        if cfg.advantage == "group":
            adv = group_advantages(traj.rewards, cfg.group_size)
        else:
            adv = self.tracker.update(traj.prompts, traj.rewards)
        return adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)  # (B,)

    # -- the update -----------------------------------------------------------------------------

    def transition_terms(
        self, traj: Trajectories, rows: Tensor, columns: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """New log-probs, KL to the parent and old log-probs of transitions (rows, columns)."""
        x_t = traj.latents[rows, columns].to(self.device)  # (b, C, h, w)
        x_prev = traj.latents[rows, columns + 1].to(self.device)  # (b, C, h, w)
        t = self.timesteps[columns].to(self.device)  # (b,)
        cond = self.encoder([traj.prompts[int(r)] for r in rows], self.device)
        a_t, a_s = self.abar_t[columns], self.abar_prev[columns]  # (b,)
        eta, ptype = self.config.eta, self.prediction_type
        out = self._guided(self.unet, x_t, t, cond)
        step = ddim_step_with_logprob(
            out, x_t, a_t, a_s, eta, prediction_type=ptype, prev_sample=x_prev
        )
        if self.config.kl_coef > 0:
            ref = ddim_step_with_logprob(
                self.reference_output(x_t, t, cond), x_t, a_t, a_s, eta,
                prediction_type=ptype, prev_sample=x_prev,
            )  # fmt: skip
            kl = gaussian_kl_equal_std(step.mean, ref.mean, step.std)  # (b,)
        else:
            kl = torch.zeros_like(step.log_prob)
        return step.log_prob, kl, traj.log_probs[rows, columns].to(self.device)

    def update(self, traj: Trajectories, advantages: Tensor, step: int) -> StepMetrics:
        """PPO over the batch: K random timesteps per trajectory, ``minibatches`` steps a pass."""
        cfg = self.config
        n, steps_total = traj.latents.shape[0], len(self.timesteps)
        k_steps = cfg.timesteps_per_trajectory
        sums = {"kl": 0.0, "clip": 0.0, "approx_kl": 0.0, "loss": 0.0, "grad": 0.0}
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=self.gen)  # (n,)
            # Each trajectory trains K of its T transitions, a fresh draw per pass.
            picks = torch.stack(
                [torch.randperm(steps_total, generator=self.gen)[:k_steps] for _ in range(n)]
            )  # (n, K) fmt: skip
            for rows in order.chunk(cfg.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                terms = {"kl": 0.0, "clip": 0.0, "approx_kl": 0.0, "loss": 0.0}
                for k in range(k_steps):
                    columns = picks[rows, k]  # (b,)
                    log_prob, kl, old = self.transition_terms(traj, rows, columns)
                    # A positive weight scales PPO's max(−A·ρ, −A·clip(ρ)) as it scales A.
                    weighted = advantages[rows] * self.step_weights[columns]  # (b,)
                    ppo = ppo_clipped_loss(log_prob, old, weighted.to(self.device),
                                           cfg.clip_range)  # fmt: skip
                    loss = ppo.loss + cfg.kl_coef * kl.mean()
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(f"loss is {float(loss)}", step)
                    (loss / k_steps).backward()
                    terms["kl"] += float(kl.detach().mean())
                    terms["clip"] += float(ppo.clip_fraction)
                    terms["approx_kl"] += float(0.5 * ((log_prob.detach() - old) ** 2).mean())
                    terms["loss"] += float(ppo.loss.detach())
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                grad_norm = float(
                    torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], max_norm)
                )
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(f"gradient norm is {grad_norm}", step)
                self.optimizer.step()
                for key, value in terms.items():
                    sums[key] += value / k_steps
                sums["grad"] += grad_norm
                updates += 1
        return StepMetrics(
            step=step,
            reward_mean=float(traj.rewards.mean()),
            reward_std=float(traj.rewards.std(unbiased=False)),
            advantage_std=float(advantages.std(unbiased=False)),
            kl=sums["kl"] / updates,
            clip_fraction=sums["clip"] / updates,
            approx_kl_old=sums["approx_kl"] / updates,
            policy_loss=sums["loss"] / updates,
            grad_norm=sums["grad"] / updates,
        )

    def backprop_update(self, prompts: Sequence[str], step: int) -> StepMetrics:
        """One reward-backpropagation step: G chains per prompt sampled with gradients (the
        noise fixed, x_s = μ_θ + σ·z), decoded, scored by the differentiable reward, and the
        policy moved up the reward's gradient with the KL anchor at the chain's own states."""
        cfg = self.config
        repeated = [p for p in prompts for _ in range(cfg.group_size)]
        batch = len(repeated)
        cond = self.encoder(repeated, self.device)
        channels = self.unet.config.in_channels
        x = torch.randn((batch, channels, *self.latent_hw), generator=self.gen).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        kls: list[Tensor] = []
        for i, t in enumerate(self.timesteps):
            t_batch = t.expand(batch).to(self.device)  # (B,)
            noise = torch.randn(x.shape, generator=self.gen)  # (B, C, h, w)
            step_out = ddim_step_with_logprob(
                self._guided(self.unet, x, t_batch, cond), x, self.abar_t[i], self.abar_prev[i],
                cfg.eta, prediction_type=self.prediction_type, noise=noise,
            )  # fmt: skip
            if cfg.kl_coef > 0:
                # The parent's mean at the same state, a constant to autograd: the anchor pulls
                # the policy's mean back without steering the states themselves.
                ref_mean = ddim_step_with_logprob(
                    self.reference_output(x.detach(), t_batch, cond), x.detach(),
                    self.abar_t[i], self.abar_prev[i], cfg.eta,
                    prediction_type=self.prediction_type, noise=noise,
                ).mean  # fmt: skip
                kls.append(gaussian_kl_equal_std(step_out.mean, ref_mean, step_out.std))
            x = step_out.prev_sample
        rewards = cast(DifferentiableScorer, self.reward).differentiable(
            repeated, self.decode_differentiable(x)
        )  # (B,)
        kl = torch.stack(kls) if kls else torch.zeros(1, batch, device=self.device)  # (T, B)
        loss = reward_backprop_loss(rewards, kl, cfg.kl_coef)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss is {float(loss)}", step)
        loss.backward()
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], max_norm))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm}", step)
        self.optimizer.step()
        scores = rewards.detach().float().cpu()
        return StepMetrics(
            step=step,
            reward_mean=float(scores.mean()),
            reward_std=float(scores.std(unbiased=False)),
            advantage_std=0.0,
            kl=float(kl.detach().mean()),
            clip_fraction=0.0,
            approx_kl_old=0.0,
            policy_loss=float(loss.detach()),
            grad_norm=grad_norm,
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.trainable}

    def load_trainable(self, weights: dict[str, Tensor]) -> None:
        params = dict(self.trainable)
        if set(weights) != set(params):
            raise ValueError("saved weights do not match the trainable parameters")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def save_checkpoint(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> Path:
        """Write ``ckpt_dir/step-XXXXXX`` atomically."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
        with atomic_dir(final) as tmp:
            save_file(self.trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            save_file({"gen": self.gen.get_state()}, str(tmp / "rng.safetensors"))
            state = {
                "step": step,
                "config": self.config.model_dump(mode="json"),
                "tracker": self.tracker.state_dict(),
                **extra,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        return final

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote; returns its state document."""
        state = json.loads((path / "trainer_state.json").read_text())
        saved = state["config"]
        current = self.config.model_dump(mode="json")
        changed = sorted(
            name
            for name in RLConfig.model_fields
            if name not in _RESUMABLE_CHANGES and saved.get(name) != current.get(name)
        )
        if changed:
            raise ValueError(f"checkpoint {path} was written with different {changed}")
        self.load_trainable(load_file(str(path / "trainable.safetensors")))
        self.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        self.gen.set_state(load_file(str(path / "rng.safetensors"))["gen"])
        self.tracker.load_state_dict(state["tracker"])
        return state


# ---------------------------------------------------------------------------------------------
# The reward-hacking guard


@dataclass
class ProbeSet:
    """Held-out prompts sampled with fixed noise at every probe, and the scorers that judge them."""

    prompts: list[str]
    guard: Scorer | None = None
    fidelity: Scorer | None = None
    seed: int = 12_345
    # Several noises per prompt: with one image each, 16 probe prompts put the fidelity's
    # standard error near the 0.05 stop threshold (toy: 0.769 → 0.717 stops seen from noise).
    images_per_prompt: int = 4


@dataclass
class GuardState:
    """Step-0 probe figures and the last step whose probe passed (weights kept on disk)."""

    baseline: dict[str, float] = field(default_factory=dict)  # means and spreads at step 0
    last_good_step: int = 0
    stopped: str | None = None  # the guard's stop reason, once it has fired


def probe_verdict(
    now: dict[str, float], baseline: dict[str, float], config: RLConfig
) -> tuple[float | None, float | None, str | None]:
    """Divergence (z-gain of reward − z-gain of guard), fidelity drop and a stop reason."""
    divergence = fidelity_drop = None
    reason = None
    if "guard" in now:
        gain = (now["reward"] - baseline["reward"]) / max(baseline["reward_sd"], 1e-6)
        guard_gain = (now["guard"] - baseline["guard"]) / max(baseline["guard_sd"], 1e-6)
        divergence = gain - guard_gain
        if divergence > config.max_reward_divergence:
            reason = (
                f"reward and guard diverged: reward +{gain:.2f} sd, guard {guard_gain:+.2f} sd "
                f"(limit {config.max_reward_divergence:g})"
            )
    if "fidelity" in now:
        fidelity_drop = baseline["fidelity"] - now["fidelity"]
        if fidelity_drop > config.max_fidelity_drop and reason is None:
            reason = (
                f"fidelity dropped {fidelity_drop:.3f} "
                f"({baseline['fidelity']:.3f} → {now['fidelity']:.3f}; limit "
                f"{config.max_fidelity_drop:g})"
            )
    return divergence, fidelity_drop, reason


def run_probe(trainer: RLTrainer, probe: ProbeSet) -> dict[str, float]:
    """Mean and spread of each scorer on the probe prompts, sampled with the probe's noise."""
    generator = torch.Generator().manual_seed(probe.seed)
    prompts = [p for p in probe.prompts for _ in range(probe.images_per_prompt)]
    _, _, images = trainer.sample(prompts, generator)
    out: dict[str, float] = {}
    for key, scorer in (
        ("reward", trainer.reward),
        ("guard", probe.guard),
        ("fidelity", probe.fidelity),
    ):
        if scorer is None:
            continue
        scores = scorer(prompts, images).float()
        out[key] = float(scores.mean())
        out[f"{key}_sd"] = float(scores.std(unbiased=False))
    return out


# ---------------------------------------------------------------------------------------------
# The loop


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def prompt_schedule(prompts: Sequence[str], per_step: int, step: int, seed: int) -> list[str]:
    """The prompts of RL step ``step`` (1-based): epochs of seeded permutations, no repeats."""
    n = len(prompts)
    chosen = []
    for slot in range((step - 1) * per_step, step * per_step):
        epoch, index = divmod(slot, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        chosen.append(prompts[int(order[index])])
    return chosen


def train(
    pipe: Any,
    prompts: Sequence[str],
    reward: Scorer,
    config: RLConfig,
    ckpt_dir: Path,
    *,
    probe: ProbeSet | None = None,
    on_metrics: Callable[[StepMetrics], None] | None = None,
    on_probe: Callable[[ProbeMetrics], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
) -> RLResult:
    """Fine-tune ``pipe.unet`` in place with online RL, resuming from the newest checkpoint."""
    if not prompts:
        raise ValueError("no training prompts")
    ckpt_dir = Path(ckpt_dir)
    trainer = RLTrainer(pipe, config, reward, device=device)
    guard = GuardState()
    existing = list_checkpoints(ckpt_dir)
    step = 0
    if existing:
        state = trainer.load_checkpoint(existing[-1])
        step = int(state["step"])
        guard = GuardState(**state["guard"])
    last = existing[-1] if existing else None
    result = RLResult(step=step, stopped_early=False, guard_stop=guard.stopped, checkpoint=last)
    if guard.stopped:  # an earlier attempt ended here; its checkpoint holds the kept weights
        return result

    def checkpoint() -> Path:
        path = trainer.save_checkpoint(ckpt_dir, step, {"guard": asdict(guard)})
        for old in list_checkpoints(ckpt_dir)[: -config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def probe_now() -> str | None:
        assert probe is not None
        now = run_probe(trainer, probe)
        if not guard.baseline:
            guard.baseline = now
        divergence, drop, reason = probe_verdict(now, guard.baseline, config)
        metrics = ProbeMetrics(
            step, now["reward"], now.get("guard"), now.get("fidelity"), divergence, drop, reason
        )
        result.probes.append(metrics)
        if on_probe is not None:
            on_probe(metrics)
        if reason is None:
            guard.last_good_step = step
            save_file(trainer.trainable_state(), str(ckpt_dir / LAST_GOOD_FILE))
        return reason

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if probe is not None and not guard.baseline:
        probe_now()
    while step < config.steps:
        chosen = prompt_schedule(prompts, config.prompts_per_step, step + 1, config.seed)
        if config.objective == "reward_backprop":
            metrics = trainer.backprop_update(chosen, step + 1)
        else:
            traj = trainer.rollout(chosen)
            if not torch.isfinite(traj.rewards).all():
                raise TrainingDiverged("a reward is NaN or infinite", step + 1)
            metrics = trainer.update(traj, trainer.advantages(traj), step + 1)
        step += 1
        result.history.append(metrics)
        if on_metrics is not None:
            on_metrics(metrics)
        if probe is not None and (step % config.eval_every == 0 or step == config.steps):
            reason = probe_now()
            if reason is not None:
                trainer.load_trainable(load_file(str(ckpt_dir / LAST_GOOD_FILE)))
                guard.stopped = f"{reason}; weights of step {guard.last_good_step} kept"
                result.guard_stop = guard.stopped
                result.step, result.checkpoint = step, checkpoint()
                return result
        if step % config.checkpoint_every == 0 or step == config.steps:
            last = checkpoint()
        if step < config.steps and should_stop is not None and should_stop():
            if last is None or last.name != f"{CHECKPOINT_PREFIX}{step:06d}":
                last = checkpoint()
            result.step, result.stopped_early, result.checkpoint = step, True, last
            return result
    result.step, result.checkpoint = step, last
    return result
