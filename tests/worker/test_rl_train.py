"""The RL trainer on the toy model and on tiny random SD 1.x / SDXL pipelines."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from torch import Tensor

from tests.tiny_pipelines import build_tiny_sd, build_tiny_sdxl
from worker.rl_train import (
    ProbeSet,
    RLConfig,
    RLTrainer,
    ToyFidelityScorer,
    ToyRecogniserScorer,
    WeightedSum,
    list_checkpoints,
    probe_verdict,
    prompt_schedule,
    train,
)
from worker.toy import resolve_toy
from worker.toy.model import load_pipeline
from worker.toy.world import sample_prompts


class BrightnessScorer:
    """Mean pixel value: a reward any policy can move."""

    name = "brightness"

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))  # (B,)


class DifferentiableBrightness(BrightnessScorer):
    """The same reward, with gradients to the images (for reward backpropagation)."""

    def differentiable(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return images.float().mean(dim=(1, 2, 3))  # (B,)


class NegatedScorer:
    """A guard that disagrees with the reward completely."""

    name = "negated"

    def __init__(self, inner: BrightnessScorer) -> None:
        self.inner = inner

    def __call__(self, prompts: Sequence[str], images: Tensor) -> Tensor:
        return -self.inner(prompts, images)


def _toy() -> StableDiffusionPipeline:
    torch.set_num_threads(1)
    toy = resolve_toy("toy")
    assert toy is not None
    return load_pipeline(toy)


def _tiny_config(**overrides: object) -> RLConfig:
    base: dict[str, object] = {
        # Policy gradients unless a test names the other objective: most tests here check
        # the sampler, the PPO update and the guard, which reward backpropagation skips.
        "objective": "policy_gradient",
        "steps": 2,
        "prompts_per_step": 2,
        "group_size": 2,
        "sample_steps": 4,
        "train_timesteps": 2,
        "minibatches": 2,
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "checkpoint_every": 1,
        "guidance_scale": 4.0,  # the toy model's sampling guidance
    }
    base.update(overrides)
    return RLConfig(**base)  # type: ignore[arg-type]


PROMPTS = sample_prompts(6, seed=1)


@pytest.mark.slow
def test_adapter_disabled_equals_parent_and_kl_is_zero_at_step_zero() -> None:
    parent = _toy()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([901, 401])
    trainer = RLTrainer(_toy(), _tiny_config(), BrightnessScorer(), device="cpu")
    cond = trainer.encoder(PROMPTS[:2], trainer.device)
    with torch.no_grad():
        parent_out = trainer._guided(parent.unet.to(torch.float32), x, t, cond)
        # A fresh adapter (B = 0) leaves the policy equal to the parent.
        torch.testing.assert_close(trainer._guided(trainer.unet, x, t, cond), parent_out)

    # Step 0: re-scoring sampled transitions gives their recorded log-probs and zero KL.
    traj = trainer.rollout(PROMPTS[:2])
    rows, columns = torch.arange(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        log_prob, kl, old = trainer.transition_terms(traj, rows, columns)
    torch.testing.assert_close(log_prob, old, rtol=0, atol=1e-5)
    assert float(kl.abs().max()) == 0.0

    # After an update the policy differs from the parent, the adapter-disabled UNet does not.
    trainer.update(traj, torch.tensor([1.0, -1.0, 1.0, -1.0]), step=1)
    with torch.no_grad():
        moved = trainer._guided(trainer.unet, x, t, cond)
        assert float((moved - parent_out).abs().max()) > 1e-6
        torch.testing.assert_close(trainer.reference_output(x, t, cond), parent_out)
        _, kl_after, _ = trainer.transition_terms(traj, rows, columns)
    assert float(kl_after.min()) > 0


def test_prompt_schedule_covers_each_prompt_once_per_epoch() -> None:
    prompts = [f"p{i}" for i in range(6)]
    first_epoch = prompt_schedule(prompts, 3, 1, 0) + prompt_schedule(prompts, 3, 2, 0)
    assert sorted(first_epoch) == prompts
    assert prompt_schedule(prompts, 3, 5, 0) == prompt_schedule(prompts, 3, 5, 0)


def test_probe_verdict_by_hand() -> None:
    cfg = RLConfig(max_reward_divergence=1.0, max_fidelity_drop=0.05)
    base = {"reward": 0.0, "reward_sd": 2.0, "guard": 1.0, "guard_sd": 0.5, "fidelity": 0.9}
    # Reward +1 sd, guard +0.4 sd: divergence 0.6, fidelity −0.02: passes.
    ok = probe_verdict({"reward": 2.0, "guard": 1.2, "fidelity": 0.88}, base, cfg)
    assert ok[0] == pytest.approx(0.6) and ok[1] == pytest.approx(0.02) and ok[2] is None
    # Reward +2 sd while the guard falls −0.2 sd: divergence 2.2 > 1.
    hacked = probe_verdict({"reward": 4.0, "guard": 0.9, "fidelity": 0.9}, base, cfg)
    assert hacked[0] == pytest.approx(2.2) and "diverged" in str(hacked[2])
    dropped = probe_verdict({"reward": 0.0, "guard": 1.0, "fidelity": 0.8}, base, cfg)
    assert "fidelity dropped" in str(dropped[2])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["policy_gradient", "reward_backprop"])
def test_resume_continues_exactly(tmp_path: Path, objective: str) -> None:
    cfg = _tiny_config(steps=3, objective=objective)
    reward = DifferentiableBrightness()
    straight = train(_toy(), PROMPTS, reward, cfg, tmp_path / "a", device="cpu")
    calls = iter([True, False, False])
    first = train(
        _toy(), PROMPTS, reward, cfg, tmp_path / "b",
        should_stop=lambda: next(calls), device="cpu",
    )  # fmt: skip
    assert first.stopped_early and first.step == 1
    rest = train(_toy(), PROMPTS, reward, cfg, tmp_path / "b", device="cpu")
    assert rest.step == 3 and [m.step for m in rest.history] == [2, 3]
    assert [m.as_dict() for m in rest.history] == [m.as_dict() for m in straight.history[1:]]
    a = load_file(str(list_checkpoints(tmp_path / "a")[-1] / "trainable.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "b")[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.long(80)
def test_rl_raises_the_reward_and_the_guard_stops_a_hacked_run(tmp_path: Path) -> None:
    reward = BrightnessScorer()
    cfg = _tiny_config(
        # Every sampled step trained, one exactly on-policy update per batch: the plainest
        # policy gradient, whose gain 8 steps can show (measured probe reward 0.54 -> 0.78).
        steps=8, prompts_per_step=2, group_size=4, learning_rate=1e-2, kl_coef=0.0,
        train_timesteps=4, minibatches=1,
        eval_every=4, checkpoint_every=4, max_reward_divergence=1e9, max_fidelity_drop=1.0,
    )  # fmt: skip
    probe = ProbeSet(prompts=PROMPTS, fidelity=ToyFidelityScorer(), images_per_prompt=1)
    honest = train(_toy(), PROMPTS, reward, cfg, tmp_path / "honest", probe=probe, device="cpu")
    assert honest.guard_stop is None and honest.step == 8
    assert honest.probes[-1].reward > honest.probes[0].reward
    assert {"reward_mean", "reward_std", "kl", "clip_fraction", "advantage_std"} <= set(
        honest.history[0].as_dict()
    )

    # The same run watched by a guard that disagrees: stopped at the first probe that moved
    # (the guard's gain mirrors the reward's, so the divergence is twice the reward's gain).
    strict = cfg.model_copy(update={"max_reward_divergence": 0.05})
    guarded = ProbeSet(prompts=PROMPTS, guard=NegatedScorer(reward), images_per_prompt=1)
    pipe = _toy()
    hacked = train(pipe, PROMPTS, reward, strict, tmp_path / "hacked", probe=guarded, device="cpu")
    assert hacked.guard_stop is not None and "diverged" in hacked.guard_stop
    kept_step = int(hacked.guard_stop.rsplit("weights of step ", 1)[1].split()[0])
    assert kept_step < hacked.step and hacked.probes[-1].step == hacked.step
    # The weights went back to the last probe that passed.
    kept = load_file(str(tmp_path / "hacked" / "last-good.safetensors"))
    params = dict(pipe.unet.named_parameters())
    for name, value in kept.items():
        torch.testing.assert_close(params[name].detach(), value)
    # A resumed attempt does not train on past the guard's stop.
    again = train(_toy(), PROMPTS, reward, strict, tmp_path / "hacked", probe=guarded)
    assert again.guard_stop == hacked.guard_stop and again.history == []


@pytest.mark.slow
def test_reward_backprop_raises_a_differentiable_reward_and_refuses_others(
    tmp_path: Path,
) -> None:
    cfg = _tiny_config(
        objective="reward_backprop", steps=4, prompts_per_step=2, group_size=4,
        learning_rate=1e-2, kl_coef=0.01, train_timesteps=None, minibatches=1, eval_every=4,
        checkpoint_every=4, max_reward_divergence=1e9, max_fidelity_drop=1.0,
    )  # fmt: skip
    probe = ProbeSet(prompts=PROMPTS, images_per_prompt=1)
    reward = WeightedSum([(DifferentiableBrightness(), 1.0)])
    run = train(_toy(), PROMPTS, reward, cfg, tmp_path / "bp", probe=probe, device="cpu")
    assert run.step == 4 and run.guard_stop is None
    # The adapter starts at zero, so the first chains are the parent's: no KL yet.
    assert run.history[0].kl == 0.0 and run.history[-1].kl > 0
    # Measured: probe brightness 0.51 -> 0.74 in 4 steps.
    assert run.probes[-1].reward > run.probes[0].reward + 0.05
    # A reward without gradients cannot be backpropagated: refused before any step.
    with pytest.raises(ValueError, match="differentiable"):
        train(_toy(), PROMPTS, ToyFidelityScorer(), cfg, tmp_path / "no", device="cpu")
    with pytest.raises(ValueError, match="differentiable"):
        mixed = WeightedSum([(DifferentiableBrightness(), 1.0), (ToyFidelityScorer(), 0.5)])
        train(_toy(), PROMPTS, mixed, cfg, tmp_path / "mixed", device="cpu")


@pytest.mark.slow
def test_reward_backprop_follows_the_recogniser_fidelity_term(tmp_path: Path) -> None:
    from app.jobs.kinds import TrainRLParams

    # The job takes a fidelity weight with either objective: the recogniser gives gradients.
    assert TrainRLParams(model_id=1, objective="reward_backprop", fidelity_weight=0.5)
    cfg = _tiny_config(
        objective="reward_backprop", steps=2, prompts_per_step=2, group_size=2,
        learning_rate=1e-2, kl_coef=0.0, train_timesteps=None, minibatches=1,
        checkpoint_every=2, fidelity_weight=1.0,
    )  # fmt: skip
    run = train(_toy(), PROMPTS, WeightedSum([(ToyRecogniserScorer(), 1.0)]), cfg,
                tmp_path / "fid", device="cpu")  # fmt: skip
    assert run.step == 2 and all(math.isfinite(m.reward_mean) for m in run.history)
    # The recogniser's log-likelihood is ≤ 0, and its gradient alone moved the adapter off
    # its zero start (LoRA's B matrices begin at 0).
    assert all(m.reward_mean <= 0 for m in run.history)
    trained = load_file(str(list_checkpoints(tmp_path / "fid")[-1] / "trainable.safetensors"))
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)


def test_weighted_sum_of_scorers() -> None:
    images = torch.full((2, 3, 4, 4), 0.25)
    total = WeightedSum([(BrightnessScorer(), 2.0), (NegatedScorer(BrightnessScorer()), 0.5)])
    torch.testing.assert_close(total(["a", "b"], images), torch.full((2,), 0.25 * 1.5))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd-epsilon", "sd-v", "sdxl"])
def test_tiny_pipelines_sample_rescore_and_update(tmp_path: Path, kind: str) -> None:
    torch.set_num_threads(1)
    if kind == "sdxl":
        path = build_tiny_sdxl(tmp_path / "m")

        def load() -> Any:
            return StableDiffusionXLPipeline.from_pretrained(path)
    else:
        ptype = "v_prediction" if kind == "sd-v" else "epsilon"
        path = build_tiny_sd(tmp_path / "m", prediction_type=ptype)

        def load() -> Any:
            return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)

    pipe = load()
    trainer = RLTrainer(pipe, _tiny_config(lora_targets="all"), BrightnessScorer(), device="cpu")
    traj = trainer.rollout(["a cat", "the dog"])
    assert traj.latents.shape[:2] == (4, 5) and traj.log_probs.shape == (4, 4)
    assert traj.images.shape[1] == 3 and torch.isfinite(traj.log_probs).all()
    with torch.no_grad():
        log_prob, kl, old = trainer.transition_terms(traj, torch.arange(4), torch.arange(4))
    torch.testing.assert_close(log_prob, old, rtol=0, atol=1e-5)
    assert float(kl.abs().max()) == 0.0
    metrics = trainer.update(traj, trainer.advantages(traj), step=1)
    assert metrics.grad_norm > 0 and metrics.kl >= 0
    # Reward backpropagation through the same pipeline class: a gradient reaches the adapter.
    backprop = RLTrainer(
        load(), _tiny_config(lora_targets="all", objective="reward_backprop"),
        DifferentiableBrightness(), device="cpu",
    )  # fmt: skip
    step = backprop.backprop_update(["a cat", "the dog"], step=1)
    assert step.grad_norm > 0 and math.isfinite(step.reward_mean)


def test_job_params_are_the_trainer_config() -> None:
    from app.jobs.kinds import TrainRLParams

    # one definition of every option and default: the job's params extend the trainer's config
    assert issubclass(TrainRLParams, RLConfig)
    params = TrainRLParams(model_id=1)
    assert params.model_dump(include=set(RLConfig.model_fields)) == RLConfig().model_dump()
    # Guidance follows the model's own sampling setting unless a job sets it.
    assert params.guidance_scale is None
    with pytest.raises(ValueError, match="minibatches"):
        RLConfig(prompts_per_step=3, group_size=3, minibatches=2)


def _recipe_item(key: str, value: object) -> str:
    return f"`{key}={value:g}`" if isinstance(value, float) else f"`{key}={value}`"


def test_defaults_are_the_documented_recipe() -> None:
    from app.jobs.kinds import RL_RECIPE, TrainRLParams

    # What a train_rl job runs with only model_id given: the job's params extend the trainer's
    # config, so both default to the recipe the README documents.
    job_defaults = TrainRLParams(model_id=1).model_dump()
    assert {k: job_defaults[k] for k in RL_RECIPE} == RL_RECIPE
    assert {k: getattr(RLConfig(), k) for k in RL_RECIPE} == RL_RECIPE
    # train_timesteps None: every sampled denoising step trains; a number: that many of them.
    assert RLConfig(sample_steps=6, train_timesteps=None).timesteps_per_trajectory == 6
    assert RLConfig(sample_steps=6, train_timesteps=2).timesteps_per_trajectory == 2
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The default RL recipe", 1)[1].split("\n#", 1)[0]
    for key, value in RL_RECIPE.items():
        assert _recipe_item(key, value) in section, key
