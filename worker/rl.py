"""Online policy-gradient fine-tuning of a diffusion model against a reward: the pure maths.

The denoising chain is treated as a Markov decision process (DDPO, Black et al. 2023): each
stochastic DDIM step x_t → x_{t−1} is a Gaussian action whose log-probability the policy
gradient needs. This module holds the pieces as small torch functions; the loop that samples,
scores and updates is :mod:`worker.rl_train`.

Stochastic DDIM (Song et al. 2021, eq. 12), with ᾱ the cumulative product of the schedule's
alphas, t the current and s the previous (less noisy) timestep::

    x̂_0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
    σ_t = η · √((1−ᾱ_s)/(1−ᾱ_t)) · √(1 − ᾱ_t/ᾱ_s)
    μ   = √ᾱ_s · x̂_0 + √(1−ᾱ_s−σ_t²) · ε̂
    x_s ~ N(μ, σ_t² I)

η = 0 is deterministic DDIM (no log-probability), η = 1 is DDPM's posterior variance. With
v-prediction the network output converts to ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t.

With a differentiable reward (a reward model) the chain can instead be trained by the reward's
own gradient, the sample reparameterised as x_s = μ_θ + σ_t·z with z fixed
(:func:`reward_backprop_loss`; AlignProp, Prabhudesai et al. 2023; DRaFT, Clark et al. 2023).

Log-probabilities are averaged over the latent's dimensions (C·H·W), as in DDPO's and
Flow-GRPO's code: a per-dimension scale keeps PPO ratios near 1 and makes the clip range
independent of the resolution. The KL term uses the same per-dimension average.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction"]
# Population std of a group can be exactly 0 (all G images scored alike): the advantage is
# then 0, not a division by zero.
ADVANTAGE_EPS = 1e-4


def _per_sample(values: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) tensor reshaped to broadcast against ``like`` (B, C, H, W)."""
    values = torch.as_tensor(values, dtype=torch.float32, device=like.device)
    if values.ndim == 0:
        return values
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def _mean_over_dims(values: Tensor) -> Tensor:
    """(B, ...) → (B,)."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def predicted_epsilon(
    model_output: Tensor, x_t: Tensor, abar_t: Tensor, prediction_type: PredictionType | str
) -> Tensor:
    """ε̂ from the network's output (B, C, H, W) for ε- or v-prediction."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = _per_sample(abar_t, x_t)
        return a.sqrt() * model_output + (1.0 - a).sqrt() * x_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_sigma(abar_t: Tensor, abar_prev: Tensor, eta: float) -> Tensor:
    """σ_t = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s): the step's noise std (shape of the inputs)."""
    abar_t = torch.as_tensor(abar_t, dtype=torch.float32)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float32, device=abar_t.device)
    return eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()


def timestep_weights(sigmas: Tensor, mode: str) -> Tensor:
    """Per-transition weights of the policy loss, (T,) → (T,): all 1 ("uniform"), or σ_t over
    the mean σ ("sigma"), which offsets the 1/σ_t scale of a log-prob's gradient."""
    sigmas = sigmas.float()
    if mode == "uniform":
        return torch.ones_like(sigmas)
    if mode == "sigma":
        return sigmas / sigmas.mean()
    raise ValueError(f"unknown timestep weighting {mode!r}; known: uniform, sigma")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample log N(x; mean, std²) averaged over the non-batch dims: (B, ...) → (B,)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_density = (
        -((x.float() - mean.float()) ** 2) / (2 * std**2)
        - torch.log(std)
        - 0.5 * math.log(2 * math.pi)
    )  # (B, C, H, W)
    return _mean_over_dims(log_density)


@dataclass(frozen=True)
class DDIMStep:
    """One stochastic DDIM transition x_t → x_s."""

    prev_sample: Tensor  # (B, C, H, W) x_s
    log_prob: Tensor  # (B,) log p(x_s | x_t), mean over C·H·W
    mean: Tensor  # (B, C, H, W) μ
    std: Tensor  # () or (B, 1, 1, 1) σ_t


def ddim_step_with_logprob(
    model_output: Tensor,
    x_t: Tensor,
    abar_t: Tensor | float,
    abar_prev: Tensor | float,
    eta: float,
    *,
    prediction_type: PredictionType | str = "epsilon",
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DDIMStep:
    """The step's mean, its std, a sample and the sample's log-probability.

    ``model_output``/``x_t``: (B, C, H, W); ``abar_t``/``abar_prev``: scalars or (B,). Give
    ``prev_sample`` to score an existing transition (PPO recomputes old actions under the new
    policy); otherwise x_s = μ + σ·noise, with ``noise`` drawn from ``generator`` if not given.
    """
    if eta <= 0:
        raise ValueError("a log-probability needs a stochastic step: eta must be > 0")
    x_t = x_t.float()
    out = model_output.float()
    a_t = _per_sample(abar_t, x_t)  # () or (B, 1, 1, 1)
    a_s = _per_sample(abar_prev, x_t)
    eps = predicted_epsilon(out, x_t, a_t, prediction_type)  # (B, C, H, W)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # (B, C, H, W)
    std = ddim_sigma(a_t, a_s, eta)  # () or (B, 1, 1, 1)
    direction = (1 - a_s - std**2).clamp(min=0).sqrt() * eps  # (B, C, H, W)
    mean = a_s.sqrt() * x0 + direction  # (B, C, H, W)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=torch.float32)
        prev_sample = mean + std * noise.to(mean.device, torch.float32)
    prev_sample = prev_sample.float()
    # The sample is data to the policy gradient: only μ carries gradients into the log-prob.
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std.expand_as(mean))  # (B,)
    return DDIMStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def gaussian_kl_equal_std(mean_policy: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) = ‖μ_θ − μ_ref‖²/(2σ²), per dim, averaged: (B, ...) → (B,)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_policy.device)
    return _mean_over_dims((mean_policy.float() - mean_ref.float()) ** 2 / (2 * std**2))


# ---------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards: Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> Tensor:
    """GRPO: (r − mean_group)/(std_group + eps) with rewards (P·G,) laid out prompt-major.

    The std is the population std (÷G), as in Flow-GRPO's code.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().reshape(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (P, 1)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)  # (P, 1)
    return ((grouped - mean) / (std + eps)).reshape(-1)  # (P·G,)


class PromptStatTracker:
    """DDPO's per-prompt baseline: advantages against the last ``buffer_size`` rewards per prompt.

    A prompt with fewer than ``min_count`` rewards on record is normalised by the whole batch's
    mean and std instead.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 8) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[Hashable, deque[float]] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(
        self, keys: Sequence[Hashable], rewards: Tensor, eps: float = ADVANTAGE_EPS
    ) -> Tensor:
        """Record ``rewards`` (N,) under their prompts' ``keys`` and return advantages (N,)."""
        values = rewards.float().cpu()
        out = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            self.stats[key].extend(values[rows].tolist())
            history = torch.tensor(list(self.stats[key]))
            if len(history) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = history.mean(), history.std(unbiased=False)
            out[rows] = (values[rows] - mean) / (std + eps)
        return out.to(rewards.device)

    def state_dict(self) -> dict[str, list[float]]:
        return {str(k): list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats.clear()
        for key, values in state.items():
            self.stats[key].extend(values)


# ---------------------------------------------------------------------------------------------
# The objective


@dataclass(frozen=True)
class PPOOutput:
    loss: Tensor  # () mean clipped surrogate loss
    ratio: Tensor  # (B,) π_θ/π_old per transition
    clip_fraction: Tensor  # () share of transitions whose ratio left [1−ε, 1+ε]


def ppo_clipped_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> PPOOutput:
    """PPO: mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) with ρ = exp(log π_θ − log π_old), all (B,)."""
    ratio = torch.exp(log_prob - old_log_prob.detach())  # (B,)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    clip_fraction = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return PPOOutput(
        loss=torch.maximum(unclipped, clipped).mean(), ratio=ratio, clip_fraction=clip_fraction
    )


# ---------------------------------------------------------------------------------------------
# Reward backpropagation


def reward_backprop_loss(rewards: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """AlignProp / DRaFT with DPOK's anchor: −mean(r) + kl_coef · mean(KL), a scalar.

    ``rewards`` (B,) carry gradients through the decoder and the whole sampling chain back to
    the policy; ``kl`` (T, B) holds each transition's KL to the parent at the policy's own
    states. The KL is averaged over transitions, as the policy-gradient objective averages it
    over the trained ones, so ``kl_coef`` means the same in both.
    """
    return -rewards.float().mean() + kl_coef * kl.float().mean()
