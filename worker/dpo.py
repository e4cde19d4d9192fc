"""Diffusion-DPO losses (Wallace et al. 2023, arXiv 2311.12908) as pure torch functions.

Notation (REFERENCE.md §3): for a pair (winner x_w, loser x_l) with one shared timestep and
noise, ``err(θ, x)`` is the per-sample mean squared error of the model's prediction against the
diffusion target, ``Δθ = err(θ, x_w) − err(θ, x_l)`` and ``Δref`` the same for the frozen
reference. Every loss here is written in terms of ``logits = Δref − Δθ`` (positive when the
policy improved the winner relative to the loser more than the reference did).

β conventions (the ``convention`` flag of :func:`dpo_loss`):
- ``"paper"``: the original code's β (5000 for SD 1.5) with an explicit ½, so the sigmoid loss is
  ``softplus((β/2)(Δθ − Δref))``.
- ``"diffusers"``: the diffusers example's β with no ½, ``softplus(β(Δθ − Δref))``; it equals the
  paper objective when ``β_diffusers = β_paper / 2`` (2500 ↔ 5000).
Hinge and IPO use the same effective coefficient (β/2 in the paper convention, β in the diffusers
one), so the flag converts all loss kinds consistently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossKind = Literal["sigmoid", "hinge", "ipo"]
BetaConvention = Literal["paper", "diffusers"]
PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class DPOOutput:
    """The loss and the diagnostics worth logging next to it."""

    loss: Tensor  # () mean of `losses`
    losses: Tensor  # (B,) per-pair loss
    implicit_acc: Tensor  # () share of pairs the policy ranks like the label, exact ties = ½
    model_err_w: Tensor  # (B,)
    model_err_l: Tensor  # (B,)
    ref_err_w: Tensor  # (B,)
    ref_err_l: Tensor  # (B,)
    logits: Tensor  # (B,) margin Δref − Δθ; > 0 means the policy prefers the winner


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every non-batch dimension: (B, C, H, W) → (B,)."""
    sq_err = (pred.float() - target.float()) ** 2  # (B, C, H, W)
    return sq_err.reshape(sq_err.shape[0], -1).mean(dim=1)  # (B,)


def _gather_alphas(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """√ᾱ_t and √(1−ᾱ_t) for each sample, broadcastable to ``like`` (B, C, H, W)."""
    abar = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.to(like.device)]  # (B,)
    shape = (-1,) + (1,) * (like.ndim - 1)
    alpha = abar.sqrt().reshape(shape)  # (B, 1, 1, 1)
    sigma = (1.0 - abar).sqrt().reshape(shape)  # (B, 1, 1, 1)
    return alpha, sigma


def add_noise(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process q(x_t | x_0): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, all (B, C, H, W).

    The scheduler's own `add_noise`/`get_velocity` compute in the latents' dtype; under mixed
    precision the DPO loss needs them in float32, so this keeps the maths here, pinned equal to
    DDPMScheduler's by tests/worker/test_dpo.py."""
    alpha, sigma = _gather_alphas(alphas_cumprod, t, x0)
    return (alpha * x0.float() + sigma * noise.float()).to(x0.dtype)


def diffusion_target(
    alphas_cumprod: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    prediction_type: PredictionType | str,
) -> Tensor:
    """What the network should predict: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (B, C, H, W)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha, sigma = _gather_alphas(alphas_cumprod, t, x0)
        return (alpha * noise.float() - sigma * x0.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def effective_beta(beta: float, convention: BetaConvention | str) -> float:
    """The coefficient that multiplies ``Δθ − Δref`` inside the loss."""
    if convention == "paper":
        return beta / 2.0
    if convention == "diffusers":
        return beta
    raise ValueError(f"unknown beta convention {convention!r}")


def _directed_loss(logits: Tensor, beta_eff: float, kind: LossKind | str) -> Tensor:
    """Per-pair loss for "the winner is better", given logits = Δref − Δθ (B,)."""
    if kind == "sigmoid":
        return F.softplus(-beta_eff * logits)  # = softplus(z), z = β_eff(Δθ − Δref)
    if kind == "hinge":
        return F.relu(1.0 - beta_eff * logits)
    if kind == "ipo":
        return (logits - 1.0 / (2.0 * beta_eff)) ** 2
    raise ValueError(f"unknown DPO loss kind {kind!r}")


def dpo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    *,
    kind: LossKind | str = "sigmoid",
    label: Tensor | None = None,
    convention: BetaConvention | str = "paper",
) -> DPOOutput:
    """Diffusion-DPO loss from per-sample errors, each (B,).

    ``label`` is the soft preference p = P(w ≻ l) per pair (B,), e.g. 0.5 for a tie; the loss is
    then ``p·f(logits) + (1 − p)·f(−logits)``, which for the sigmoid kind is
    ``p·softplus(z) + (1 − p)·softplus(−z)``. ``None`` means p = 1.
    """
    ref_err_w = ref_err_w.detach()
    ref_err_l = ref_err_l.detach()
    model_diff = model_err_w - model_err_l  # (B,) Δθ
    ref_diff = ref_err_w - ref_err_l  # (B,) Δref
    logits = ref_diff - model_diff  # (B,)
    beta_eff = effective_beta(beta, convention)

    losses = _directed_loss(logits, beta_eff, kind)  # (B,)
    detached = logits.detach()
    agrees = (detached > 0).float() + 0.5 * (detached == 0).float()  # (B,) zeros count half
    if label is not None:
        p = label.to(device=logits.device, dtype=losses.dtype)  # (B,)
        losses = p * losses + (1.0 - p) * _directed_loss(-logits, beta_eff, kind)
        agrees = p * agrees + (1.0 - p) * (1.0 - agrees)

    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        implicit_acc=agrees.mean(),
        model_err_w=model_err_w.detach(),
        model_err_l=model_err_l.detach(),
        ref_err_w=ref_err_w,
        ref_err_l=ref_err_l,
        logits=detached,
    )


def sft_loss(model_err_w: Tensor) -> Tensor:
    """Baseline: the plain denoising loss on winners only, (B,) → ()."""
    return model_err_w.mean()
