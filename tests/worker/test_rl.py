"""The RL maths against hand-computed values and direct Gaussian computations."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

from worker.rl import (
    PromptStatTracker,
    ddim_sigma,
    ddim_step_with_logprob,
    gaussian_kl_equal_std,
    gaussian_log_prob,
    group_advantages,
    ppo_clipped_loss,
    predicted_epsilon,
    reward_backprop_loss,
    timestep_weights,
)


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def test_sigma_matches_the_formula_and_eta_one_is_the_ddpm_posterior_std() -> None:
    a_t, a_s = torch.tensor(0.5), torch.tensor(0.8)
    expected = 0.7 * math.sqrt((1 - 0.8) / (1 - 0.5)) * math.sqrt(1 - 0.5 / 0.8)
    assert float(ddim_sigma(a_t, a_s, 0.7)) == pytest.approx(expected, rel=1e-6)
    # η = 1: σ² = β̃_t = (1−ᾱ_s)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_s), DDPM's posterior variance.
    beta_tilde = (1 - 0.8) / (1 - 0.5) * (1 - 0.5 / 0.8)
    assert float(ddim_sigma(a_t, a_s, 1.0)) ** 2 == pytest.approx(beta_tilde, rel=1e-6)


def test_log_prob_equals_a_direct_gaussian_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=gen)
    out = torch.randn(3, 4, 8, 8, generator=gen)
    a_t, a_s = torch.tensor([0.3, 0.5, 0.9]), torch.tensor([0.4, 0.7, 0.95])
    step = ddim_step_with_logprob(out, x_t, a_t, a_s, 0.8, generator=gen)

    # By hand: x̂0, σ, μ, then log N(x_s; μ, σ²) per element, averaged over C·H·W.
    shape = (-1, 1, 1, 1)
    at, as_ = a_t.reshape(shape), a_s.reshape(shape)
    x0 = (x_t - (1 - at).sqrt() * out) / at.sqrt()
    sigma = 0.8 * ((1 - as_) / (1 - at)).sqrt() * (1 - at / as_).sqrt()
    mean = as_.sqrt() * x0 + (1 - as_ - sigma**2).sqrt() * out
    direct = Normal(mean, sigma.expand_as(mean)).log_prob(step.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(step.mean, mean)
    torch.testing.assert_close(step.log_prob, direct, rtol=1e-5, atol=1e-5)
    # Re-scoring the same transition gives the same log-probability.
    again = ddim_step_with_logprob(out, x_t, a_t, a_s, 0.8, prev_sample=step.prev_sample)
    torch.testing.assert_close(again.log_prob, step.log_prob)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_equals_diffusers_ddim_step_with_the_same_noise(prediction_type: str) -> None:
    scheduler = _scheduler(prediction_type)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        out = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        a_t = scheduler.alphas_cumprod[int(t)]
        a_s = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
        ours = ddim_step_with_logprob(
            out, x, a_t, a_s, 1.0, prediction_type=prediction_type, noise=noise
        )
        theirs = scheduler.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-4, atol=1e-5)
        x = theirs


def test_v_prediction_converts_to_epsilon() -> None:
    # x_t = √ᾱ x0 + √(1−ᾱ) ε and v = √ᾱ ε − √(1−ᾱ) x0 ⇒ √ᾱ v + √(1−ᾱ) x_t = ε.
    x0, eps, abar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor(0.36)
    x_t = 0.6 * x0 + 0.8 * eps
    v = 0.6 * eps - 0.8 * x0
    torch.testing.assert_close(predicted_epsilon(v, x_t, abar, "v_prediction"), eps)


def test_log_prob_gradient_flows_through_the_mean_only() -> None:
    out = torch.randn(2, 4, 4, 4, requires_grad=True)
    x_t = torch.randn(2, 4, 4, 4)
    step = ddim_step_with_logprob(out, x_t, 0.5, 0.7, 1.0, noise=torch.zeros(2, 4, 4, 4))
    step.log_prob.sum().backward()
    # The sample sits exactly at the mean: the log-density is at its maximum, gradient zero.
    assert out.grad is not None and float(out.grad.abs().max()) < 1e-6


def test_eta_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.5, 0.7, 0.0)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])  # two prompts × G = 3
    adv = group_advantages(rewards, 3)
    std = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    expected = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4)]
    # Group (4, 5, 5): mean 14/3, population std √(2/9).
    std2 = math.sqrt(2 / 9)
    expected += [(r - 14 / 3) / (std2 + 1e-4) for r in (4, 5, 5)]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # A group scored all alike carries no signal.
    assert group_advantages(torch.tensor([2.0, 2.0]), 2).abs().max() == 0
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_prompt_stat_tracker_uses_the_batch_until_a_prompt_has_history() -> None:
    tracker = PromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b", "b"], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    # Fewer than 3 rewards per prompt: normalised by the batch (mean 3, std √5).
    torch.testing.assert_close(
        first, (torch.tensor([0.0, 2.0, 4.0, 6.0]) - 3) / (math.sqrt(5) + 1e-4)
    )
    second = tracker.update(["a", "a"], torch.tensor([1.0, 1.0]))
    # "a" now has (0, 2, 1, 1): mean 1, population std √0.5.
    torch.testing.assert_close(second, torch.zeros(2), atol=1e-6, rtol=0)
    third = tracker.update(["a"], torch.tensor([3.0]))
    # Buffer of 4 keeps (2, 1, 1, 3): mean 1.75, std √0.6875.
    torch.testing.assert_close(third, torch.tensor([(3 - 1.75) / (math.sqrt(0.6875) + 1e-4)]))
    restored = PromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict()


def test_ppo_clipped_objective_by_hand() -> None:
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.05, 0.5]))
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    out = ppo_clipped_loss(new, old, adv, clip_range=0.2)
    # Per transition max(−Aρ, −A·clip(ρ)):
    #   A=1,  ρ=1.5  → max(−1.5, −1.2) = −1.2  (clipped: no credit beyond 1+ε)
    #   A=1,  ρ=0.5  → max(−0.5, −0.8) = −0.5  (pessimistic: unclipped)
    #   A=−2, ρ=1.05 → max(2.1, 2.1)   = 2.1
    #   A=−1, ρ=0.5  → max(0.5, 0.8)   = 0.8   (clipped)
    assert float(out.loss) == pytest.approx((-1.2 - 0.5 + 2.1 + 0.8) / 4, rel=1e-6)
    assert float(out.clip_fraction) == pytest.approx(3 / 4)
    # On-policy (ρ = 1) the gradient is the plain policy gradient −A·∇log π.
    logp = torch.zeros(3, requires_grad=True)
    ppo_clipped_loss(logp, logp.detach(), torch.tensor([1.0, -2.0, 0.5]), 0.1).loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 2.0, -0.5]) / 3)


def test_timestep_weights_by_hand() -> None:
    sigmas = torch.tensor([0.6, 0.3, 0.3])  # mean 0.4
    torch.testing.assert_close(timestep_weights(sigmas, "uniform"), torch.ones(3))
    torch.testing.assert_close(timestep_weights(sigmas, "sigma"), torch.tensor([1.5, 0.75, 0.75]))
    with pytest.raises(ValueError, match="uniform, sigma"):
        timestep_weights(sigmas, "late")


def test_sigma_weighting_evens_out_the_log_prob_gradient_across_steps() -> None:
    # d/dμ log N(x; μ, σ²) = (x − μ)/σ² = ε/σ for x = μ + σε: a late step (small σ) pulls 1/σ
    # harder; weighted by σ the pulls of all steps have the size of ε.
    sigmas = torch.tensor([0.8, 0.2, 0.04])
    eps = torch.tensor([1.0, 1.0, 1.0])
    mean = torch.zeros(3, 1, 1, 1, requires_grad=True)
    x = (sigmas * eps).reshape(3, 1, 1, 1)
    log_prob = gaussian_log_prob(x, mean, sigmas.reshape(3, 1, 1, 1))  # (3,)
    weights = timestep_weights(sigmas, "sigma")
    (weights * log_prob).sum().backward()
    assert mean.grad is not None
    torch.testing.assert_close(mean.grad.flatten(), eps / sigmas.mean())


def test_weighted_advantages_scale_each_ppo_term() -> None:
    # The trainer weighs a transition by scaling its advantage: for w > 0,
    # max(−wAρ, −wA·clip(ρ)) = w·max(−Aρ, −A·clip(ρ)).
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, -1.0, 2.0])
    w = torch.tensor([2.0, 0.5, 1.0])
    per_term = torch.tensor([-1.2, 0.8, -2.1])  # max(−Aρ, −A·clip(ρ, 0.8, 1.2)) by hand
    out = ppo_clipped_loss(new, old, adv * w, clip_range=0.2)
    assert float(out.loss) == pytest.approx(float((w * per_term).mean()), rel=1e-6)


def test_kl_closed_form_and_zero_for_equal_means() -> None:
    mu = torch.randn(2, 4, 3, 3)
    std = torch.tensor(0.5)
    assert gaussian_kl_equal_std(mu, mu, std).abs().max() == 0
    shifted = mu + 0.1
    # ‖Δμ‖²/(2σ²) per element = 0.01 / 0.5 = 0.02.
    torch.testing.assert_close(gaussian_kl_equal_std(shifted, mu, std), torch.full((2,), 0.02))
    # Against torch.distributions' KL, elementwise then averaged.
    direct = torch.distributions.kl_divergence(Normal(shifted, std), Normal(mu, std)).mean(
        dim=(1, 2, 3)
    )
    torch.testing.assert_close(gaussian_kl_equal_std(shifted, mu, std), direct)


def test_reward_backprop_loss_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0], requires_grad=True)  # (B,)
    kl = torch.tensor([[0.5, 0.1], [0.3, 0.0]], requires_grad=True)  # (T, B)
    loss = reward_backprop_loss(rewards, kl, kl_coef=0.2)
    # −mean(1, 3) + 0.2 · mean(0.5, 0.1, 0.3, 0.0) = −2 + 0.2 · 0.225 = −1.955
    torch.testing.assert_close(loss, torch.tensor(-1.955))
    loss.backward()
    assert rewards.grad is not None and kl.grad is not None
    torch.testing.assert_close(rewards.grad, torch.full((2,), -0.5))  # −1/B
    torch.testing.assert_close(kl.grad, torch.full((2, 2), 0.05))  # kl_coef/(T·B)
    # Without the anchor the loss is the negated mean reward.
    torch.testing.assert_close(reward_backprop_loss(rewards, kl, 0.0), torch.tensor(-2.0))


def test_a_reparameterised_ddim_step_passes_the_gradient_to_the_network_output() -> None:
    # The sample x_s = μ + σ·z with z fixed: ∂x_s/∂ε̂ = √(1−ᾱ_s−σ²) − √ᾱ_s·√(1−ᾱ_t)/√ᾱ_t.
    out = torch.zeros(1, 1, 1, 1, requires_grad=True)
    x_t = torch.ones(1, 1, 1, 1)
    a_t, a_s, eta = torch.tensor(0.5), torch.tensor(0.8), 1.0
    step = ddim_step_with_logprob(out, x_t, a_t, a_s, eta, noise=torch.zeros(1, 1, 1, 1))
    step.prev_sample.sum().backward()
    sigma = ddim_sigma(a_t, a_s, eta)
    expected = (1 - a_s - sigma**2).sqrt() - a_s.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    assert out.grad is not None
    torch.testing.assert_close(out.grad.reshape(()), expected)
