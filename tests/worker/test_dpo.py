import math

import pytest
import torch
from diffusers import DDPMScheduler

from worker.dpo import (
    add_noise,
    diffusion_target,
    dpo_loss,
    effective_beta,
    per_sample_error,
    sft_loss,
)


def _errs(model_w, model_l, ref_w, ref_l):
    return tuple(torch.tensor(v, dtype=torch.float64) for v in (model_w, model_l, ref_w, ref_l))


def test_per_sample_error_is_mean_over_chw():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    assert torch.allclose(per_sample_error(pred, target), torch.tensor([5.0 / 4, 9.0]))


def test_loss_is_ln2_when_policy_equals_reference():
    errs = torch.rand(4, dtype=torch.float64)
    errs_l = torch.rand(4, dtype=torch.float64)
    out = dpo_loss(errs, errs_l, errs.clone(), errs_l.clone(), beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.all(out.logits == 0)
    assert out.implicit_acc.item() == 0.5


@pytest.mark.parametrize("beta", [5000.0, 10.0])
def test_gradient_wrt_policy_difference_is_beta_over_four(beta):
    ref_w = torch.tensor([0.30], dtype=torch.float64)
    ref_l = torch.tensor([0.10], dtype=torch.float64)
    model_diff = (ref_w - ref_l).clone().requires_grad_(True)  # Δθ at θ = ref
    model_l = ref_l.clone()
    out = dpo_loss(model_l + model_diff, model_l, ref_w, ref_l, beta=beta)
    out.loss.backward()
    assert model_diff.grad.item() == pytest.approx(beta / 4, rel=1e-12)


def test_paper_and_diffusers_conventions_agree():
    errs = _errs([0.31, 0.20], [0.29, 0.22], [0.30, 0.21], [0.30, 0.21])
    paper = dpo_loss(*errs, beta=5000.0, convention="paper")
    diffusers = dpo_loss(*errs, beta=2500.0, convention="diffusers")
    assert torch.allclose(paper.losses, diffusers.losses, rtol=0, atol=1e-12)
    # and a hand value: z = (5000/2)·(Δθ − Δref) = 2500·(0.02 − 0) = 50 for the first pair
    assert paper.losses[0].item() == pytest.approx(math.log1p(math.exp(50.0)), rel=1e-12)
    assert effective_beta(5000.0, "paper") == effective_beta(2500.0, "diffusers")


def test_unknown_convention_and_kind_are_rejected():
    errs = _errs([0.1], [0.2], [0.1], [0.2])
    with pytest.raises(ValueError):
        dpo_loss(*errs, beta=1.0, convention="trl")
    with pytest.raises(ValueError):
        dpo_loss(*errs, beta=1.0, kind="kto")


def test_soft_label_half_is_minimised_at_zero_margin():
    margins = torch.linspace(-0.01, 0.01, 41, dtype=torch.float64)  # Δref − Δθ
    zeros = torch.zeros_like(margins)
    label = torch.full_like(margins, 0.5)
    out = dpo_loss(zeros, zeros, margins, zeros, beta=5000.0, label=label)
    assert margins[out.losses.argmin()].item() == 0.0
    assert torch.all(out.losses >= math.log(2) - 1e-12)
    # p = 1 reduces to the hard loss
    hard = dpo_loss(zeros, zeros, margins, zeros, beta=5000.0)
    soft_one = dpo_loss(zeros, zeros, margins, zeros, beta=5000.0, label=torch.ones_like(margins))
    assert torch.allclose(hard.losses, soft_one.losses)


def test_soft_label_formula():
    # z = (β/2)(Δθ − Δref) = 2·(0.1 − 0.4) = −0.6 with β = 4
    errs = _errs([0.3], [0.2], [0.5], [0.1])
    out = dpo_loss(*errs, beta=4.0, label=torch.tensor([0.75]))
    z = -0.6
    expected = 0.75 * math.log1p(math.exp(z)) + 0.25 * math.log1p(math.exp(-z))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_hinge_against_hand_values():
    # logits = Δref − Δθ = [0.3, −0.3, 0.8]; β = 2 (diffusers convention, no ½)
    errs = _errs([0.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.3, 0.0, 0.8], [0.0, 0.0, 0.0])
    out = dpo_loss(*errs, beta=2.0, kind="hinge", convention="diffusers")
    assert torch.allclose(out.losses, torch.tensor([0.4, 1.6, 0.0], dtype=torch.float64))
    paper = dpo_loss(*errs, beta=4.0, kind="hinge", convention="paper")
    assert torch.allclose(paper.losses, out.losses)


def test_ipo_against_hand_values():
    # target margin 1/(2β) = 0.25 with β = 2
    errs = _errs([0.0, 0.3], [0.0, 0.0], [0.3, 0.0], [0.0, 0.0])
    out = dpo_loss(*errs, beta=2.0, kind="ipo", convention="diffusers")
    assert torch.allclose(out.losses, torch.tensor([0.05**2, 0.55**2], dtype=torch.float64))


def test_implicit_accuracy_counts_exact_zeros_as_half():
    # logits = [1, 0, −1, 0, 2] → (1 + ½ + 0 + ½ + 1) / 5
    errs = _errs([0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 2], [0, 0, 0, 0, 0])
    out = dpo_loss(*errs, beta=1.0)
    assert out.implicit_acc.item() == pytest.approx(3.0 / 5)
    assert torch.equal(out.logits, torch.tensor([1.0, 0, -1, 0, 2], dtype=torch.float64))


def test_diagnostics_carry_the_errors_without_grad():
    errs = [torch.rand(3, requires_grad=True) for _ in range(4)]
    out = dpo_loss(*errs, beta=10.0)
    names = ["model_err_w", "model_err_l", "ref_err_w", "ref_err_l"]
    for name, src in zip(names, errs, strict=True):
        value = getattr(out, name)
        assert not value.requires_grad
        assert torch.equal(value, src.detach())
    out.loss.backward()
    assert errs[2].grad is None  # the reference never receives gradient


def test_sft_loss_is_winner_error_mean():
    assert sft_loss(torch.tensor([1.0, 3.0])).item() == 2.0


def test_targets_and_noising_against_hand_computation():
    alphas_cumprod = torch.tensor([0.9, 0.64, 0.36])
    t = torch.tensor([1, 2])
    x0 = torch.full((2, 1, 1, 1), 2.0)
    noise = torch.full((2, 1, 1, 1), 3.0)
    # √ᾱ = 0.8, √(1−ᾱ) = 0.6 at t=1; swapped at t=2
    v = diffusion_target(alphas_cumprod, x0, noise, t, "v_prediction")
    assert torch.allclose(v.flatten(), torch.tensor([0.8 * 3 - 0.6 * 2, 0.6 * 3 - 0.8 * 2]))
    eps = diffusion_target(alphas_cumprod, x0, noise, t, "epsilon")
    assert torch.equal(eps, noise)
    x_t = add_noise(alphas_cumprod, x0, noise, t)
    assert torch.allclose(x_t.flatten(), torch.tensor([0.8 * 2 + 0.6 * 3, 0.6 * 2 + 0.8 * 3]))
    with pytest.raises(ValueError):
        diffusion_target(alphas_cumprod, x0, noise, t, "sample")


def test_targets_match_the_diffusers_scheduler():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    ac = scheduler.alphas_cumprod
    v = diffusion_target(ac, x0, noise, t, "v_prediction")
    assert torch.allclose(v, scheduler.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.allclose(add_noise(ac, x0, noise, t), scheduler.add_noise(x0, noise, t), atol=1e-6)


def test_two_to_one_majority_is_a_soft_label_by_hand():
    # winner error 0.1 → loser 0.3 under the policy, both 0.2 under the reference; β = 10
    # (paper convention, β/2 = 5): z = 5 · ((0.1 − 0.3) − 0) = −1
    errs = [torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])]
    out = dpo_loss(*errs, beta=10.0, label=torch.tensor([2 / 3]))
    # 2/3 · softplus(−1) + 1/3 · softplus(1) = 2/3 · 0.3132617 + 1/3 · 1.3132617
    assert out.loss.item() == pytest.approx(0.6465950, abs=1e-6)
    assert out.implicit_acc.item() == pytest.approx(2 / 3)  # agrees with 2 of 3 votes
    hard = dpo_loss(*errs, beta=10.0)
    assert hard.loss.item() == pytest.approx(0.3132617, abs=1e-6)
