import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors.torch import load_file

from worker.dpo_train import (
    RECIPE,
    CachedPairs,
    DPOConfig,
    DPOTrainer,
    PairSampler,
    PreferencePair,
    StepMetrics,
    TrainingDiverged,
    ValMetrics,
    _usable_pairs,
    encode_images,
    encode_pairs,
    encode_prompts,
    held_out_prompts,
    list_checkpoints,
    save_result,
    train,
)
from worker.lora import LORA_TARGETS, lora_target_modules

_TINY = Path(__file__).resolve().parents[1] / "tiny_pipelines.py"
_spec = importlib.util.spec_from_file_location("tiny_pipelines", _TINY)
assert _spec is not None and _spec.loader is not None
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)

LN2 = math.log(2)
TOY_WEIGHTS = Path(__file__).resolve().parents[2] / "worker" / "toy" / "weights" / "toy-v1"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {
        "sd": tiny.build_tiny_sd(root / "sd"),
        "sd-v": tiny.build_tiny_sd(root / "sd-v", prediction_type="v_prediction"),
        "sdxl": tiny.build_tiny_sdxl(root / "sdxl"),
        "toy": TOY_WEIGHTS,
    }


def _load(pipe_dirs: dict[str, Path], kind: str = "sd") -> DiffusionPipeline:
    # The toy's weights are stored in fp16; training and comparisons run in fp32.
    pipe = DiffusionPipeline.from_pretrained(pipe_dirs[kind], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pairs(n: int = 5, seed: int = 0) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)

    def image() -> Image.Image:
        side = tiny.IMAGE_SIZE
        return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))

    # two prompts shared by several pairs; pair 3 is a tie
    return [
        PreferencePair(f"a red {'cat' if i % 2 else 'dog'}", image(), image(), 0.5 if i == 3 else 1)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def cached(pipe_dirs: dict[str, Path]) -> dict[str, CachedPairs]:
    pairs = _pairs()
    return {kind: encode_pairs(_load(pipe_dirs, kind), pairs, batch_size=2) for kind in pipe_dirs}


def _config(**overrides) -> DPOConfig:
    base = {"beta": 5000.0, "steps": 1, "batch_size": 2, "lora_rank": 4, "learning_rate": 1e-3}
    return DPOConfig(**(base | overrides))


def _trainable(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "trainable.safetensors"))


# --- caching ----------------------------------------------------------------------------------


def test_encode_pairs_caches_latents_and_deduplicated_prompts(pipe_dirs, cached, tmp_path):
    pipe = _load(pipe_dirs, "sd")
    pairs = _pairs()
    data = cached["sd"]
    side = tiny.LATENT_SIZE
    assert data.latents_w.shape == (5, 4, side, side)
    assert data.prompt_embeds.shape[0] == 2  # two distinct prompts
    assert data.prompt_index.tolist() == [0, 1, 0, 1, 0]
    assert data.labels.tolist() == [1, 1, 1, 0.5, 1]
    assert data.pooled_embeds is None and data.time_ids_w is None
    direct = encode_images(pipe, [pairs[4].loser], tiny.IMAGE_SIZE)
    assert torch.allclose(data.latents_l[4:5], direct, atol=1e-6)
    assert not torch.allclose(data.latents_w[4:5], direct)
    embeds, _ = encode_prompts(pipe, [pairs[1].prompt, ""])
    assert torch.allclose(data.prompt_embeds[1], embeds[0], atol=1e-6)
    assert torch.allclose(data.empty_prompt_embeds, embeds[1], atol=1e-6)

    data.save(tmp_path / "cache.safetensors")
    loaded = CachedPairs.load(tmp_path / "cache.safetensors")
    assert torch.equal(loaded.latents_w, data.latents_w)
    assert loaded.pooled_embeds is None


def test_encode_pairs_sdxl_adds_pooled_embeddings_and_time_ids(cached):
    data = cached["sdxl"]
    assert data.pooled_embeds is not None and data.pooled_embeds.shape == (2, 32)
    assert data.empty_pooled_embeds is not None and data.empty_pooled_embeds.shape == (32,)
    side = float(tiny.IMAGE_SIZE)
    assert data.time_ids_w is not None and data.time_ids_l is not None
    # (original h, w, crop top, left, target h, w)
    assert data.time_ids_w[0].tolist() == [side, side, 0.0, 0.0, side, side]


def test_fp16_vae_with_force_upcast_encodes_in_fp32(pipe_dirs):
    pipe = _load(pipe_dirs, "sd")
    image = _pairs(1)[0].winner
    reference = encode_images(pipe, [image], tiny.IMAGE_SIZE)
    pipe.vae.to(dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    latents = encode_images(pipe, [image], tiny.IMAGE_SIZE)
    assert pipe.vae.dtype == torch.float16  # restored afterwards
    assert latents.dtype == torch.float32
    assert torch.allclose(latents, reference, atol=1e-2)


# --- one step on every model family --------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_one_step_runs_and_starts_at_ln2(pipe_dirs, cached, tmp_path, kind, lora_rank):
    pipe = _load(pipe_dirs, kind)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    result = train(pipe, cached[kind], _config(lora_rank=lora_rank, steps=2), tmp_path / "ck")
    first = result.history[0]
    # θ = ref at step 0 (LoRA B = 0, or an exact copy): the loss is exactly ln 2
    assert first.loss == pytest.approx(LN2, abs=1e-6)
    assert first.model_err_w == first.ref_err_w and first.model_err_l == first.ref_err_l
    assert first.implicit_acc == 0.5
    assert math.isfinite(first.grad_norm) and first.grad_norm > 0
    second = result.history[1]
    assert (second.model_err_w, second.model_err_l) != (second.ref_err_w, second.ref_err_l)
    expected_target = "v_prediction" if kind == "sd-v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_target
    if lora_rank:
        params = dict(pipe.unet.named_parameters())
        lora_b = [p for n, p in params.items() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained away from B = 0
        assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n)
        unwrapped = {n.replace(".base_layer", ""): p for n, p in params.items()}
        assert all(torch.equal(before[n], unwrapped[n]) for n in before)  # base frozen
    else:
        changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(before[n], p)]
        assert changed


def test_v_prediction_target_is_used(pipe_dirs, cached):
    """Same weights and data: ε- and v-prediction models see different errors."""
    errors = {}
    for kind in ("sd", "sd-v"):
        trainer = DPOTrainer(_load(pipe_dirs, kind), _config(), device="cpu")
        assert trainer.prediction_type == ("v_prediction" if kind == "sd-v" else "epsilon")
        _, out = trainer.compute(cached[kind].batch([0, 1], "cpu"))
        errors[kind] = out.model_err_w
    assert not torch.allclose(errors["sd"], errors["sd-v"])


# --- resume, divergence, early stop ----------------------------------------------------------


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(pipe_dirs, cached, tmp_path):
    # 5 pairs, 2 per step: steps cross epoch boundaries; empty prompts exercise the noise RNG
    config = _config(steps=4, checkpoint_every=2, warmup_steps=1, empty_prompt_prob=0.5)
    full = train(_load(pipe_dirs), cached["sd"], config, tmp_path / "a")

    def crash_at_three(m: StepMetrics) -> None:
        if m.step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(_load(pipe_dirs), cached["sd"], config, tmp_path / "b", on_metrics=crash_at_three)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-000002"]
    resumed = train(_load(pipe_dirs), cached["sd"], config, tmp_path / "b")

    assert [m.step for m in resumed.history] == [3, 4]
    assert resumed.history == full.history[2:]  # bit-identical metrics
    weights_a, weights_b = _trainable(full.checkpoint), _trainable(resumed.checkpoint)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        assert (full.checkpoint / name).read_bytes() == (resumed.checkpoint / name).read_bytes()


def test_finished_run_resumes_to_nothing_and_config_changes_are_refused(
    pipe_dirs, cached, tmp_path
):
    config = _config(steps=2, checkpoint_every=1, keep_last=1)
    train(_load(pipe_dirs), cached["sd"], config, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]  # keep_last=1
    again = train(_load(pipe_dirs), cached["sd"], config, tmp_path)
    assert again.step == 2 and again.history == []
    with pytest.raises(ValueError, match="learning_rate"):
        train(_load(pipe_dirs), cached["sd"], _config(steps=3, learning_rate=1.0), tmp_path)


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(pipe_dirs, cached, tmp_path):
    pipe = _load(pipe_dirs)
    config = _config(steps=4, checkpoint_every=2)

    def poison_after_two(m: StepMetrics) -> None:
        if m.step == 2:
            with torch.no_grad():
                next(p for n, p in pipe.unet.named_parameters() if "lora_B" in n).fill_(math.nan)

    with pytest.raises(TrainingDiverged) as info:
        train(pipe, cached["sd"], config, tmp_path, on_metrics=poison_after_two)
    assert info.value.step == 3 and "nan" in info.value.reason
    checkpoints = list_checkpoints(tmp_path)
    assert [p.name for p in checkpoints] == ["step-000002"]
    assert all(torch.isfinite(t).all() for t in _trainable(checkpoints[0]).values())
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_loss_above_explode_threshold_raises(pipe_dirs, cached, tmp_path):
    with pytest.raises(TrainingDiverged, match="explode_loss"):
        train(_load(pipe_dirs), cached["sd"], _config(explode_loss=0.5), tmp_path)
    assert list_checkpoints(tmp_path) == []


def test_should_stop_checkpoints_and_returns_then_resumes(pipe_dirs, cached, tmp_path):
    config = _config(steps=5, checkpoint_every=10)
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) == 2

    stopped = train(_load(pipe_dirs), cached["sd"], config, tmp_path, should_stop=stop_after_two)
    assert stopped.stopped_early and stopped.step == 2
    assert stopped.checkpoint is not None and stopped.checkpoint.name == "step-000002"
    finished = train(_load(pipe_dirs), cached["sd"], config, tmp_path)
    assert not finished.stopped_early and finished.step == 5
    assert [m.step for m in finished.history] == [3, 4, 5]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000005"]


# --- outputs -------------------------------------------------------------------------------


def _generate(pipe: DiffusionPipeline) -> np.ndarray:
    side = tiny.IMAGE_SIZE
    return pipe(
        "a red cat",
        num_inference_steps=2,
        height=side,
        width=side,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def _grey_levels(images: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.int16)


@pytest.mark.parametrize("targets", LORA_TARGETS)
@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl", "toy"])
def test_saved_lora_reloads_in_plain_diffusers_as_trained(
    pipe_dirs, cached, tmp_path, kind, targets
):
    trained = _load(pipe_dirs, kind)
    # big steps so three of them change the images; the trained toy diverges above ~1e-2
    lr = 5e-3 if kind == "toy" else 5e-2
    config = _config(steps=3, learning_rate=lr, lora_targets=targets)
    train(trained, cached[kind], config, tmp_path / "ck")
    out = save_result(trained, config, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    in_memory = _grey_levels(_generate(trained))

    fresh = _load(pipe_dirs, kind)
    baseline = _grey_levels(_generate(fresh))
    with warnings.catch_warnings():
        # PEFT warns when saved keys match no module: that is exactly a silently dropped LoRA.
        warnings.simplefilter("error")
        fresh.load_lora_weights(out)
    reloaded = _grey_levels(_generate(fresh))
    assert np.abs(in_memory - baseline).max() > 2  # training changed the images
    # the adapter written is the adapter trained, at scale 1, for every adapted layer
    assert np.abs(reloaded - in_memory).max() <= 1
    adapted = {name for name, m in fresh.unet.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(lora_target_modules(_load(pipe_dirs, kind).unet, targets))


def test_full_finetune_saves_a_loadable_pipeline(pipe_dirs, cached, tmp_path):
    pipe = _load(pipe_dirs)
    config = _config(lora_rank=0, steps=1)
    train(pipe, cached["sd"], config, tmp_path / "ck")
    out = save_result(pipe, config, tmp_path / "model")
    assert (out / "model_index.json").exists()  # a whole pipeline the generator can load
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(pipe_dirs["sd"] / "unet")
    trained_sd = pipe.unet.state_dict()
    assert all(torch.equal(v, trained_sd[k]) for k, v in loaded.state_dict().items())
    assert any(not torch.equal(v, trained_sd[k]) for k, v in base.state_dict().items())


# --- options -------------------------------------------------------------------------------


def test_beta_conventions_train_identically(pipe_dirs, cached, tmp_path):
    paper = train(_load(pipe_dirs), cached["sd"], _config(steps=2), tmp_path / "p")
    diffusers_cfg = _config(steps=2, beta=2500.0, beta_convention="diffusers")
    diffusers = train(_load(pipe_dirs), cached["sd"], diffusers_cfg, tmp_path / "d")
    assert paper.history == diffusers.history


@pytest.mark.parametrize("loss_kind", ["hinge", "ipo", "sft"])
def test_loss_kinds_train(pipe_dirs, cached, tmp_path, loss_kind):
    config = _config(steps=2, loss=loss_kind, beta=100.0)
    result = train(_load(pipe_dirs), cached["sd"], config, tmp_path)
    first = result.history[0]
    expected = {"hinge": 1.0, "ipo": (1 / 100.0) ** 2}.get(loss_kind, first.model_err_w)
    assert first.loss == pytest.approx(expected, rel=1e-5)  # values at θ = ref
    assert all(math.isfinite(m.loss) and m.grad_norm > 0 for m in result.history)


def test_gradient_checkpointing_matches_plain_backprop(pipe_dirs, cached):
    grads = []
    for checkpointing in (False, True):
        trainer = DPOTrainer(
            _load(pipe_dirs), _config(gradient_checkpointing=checkpointing), device="cpu"
        )
        trainer.train_step([cached["sd"].batch([0, 1], "cpu")], 1)
        grads.append(torch.cat([p.grad.flatten() for _, p in trainer.trainable]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step(pipe_dirs, cached, tmp_path, precision):
    pipe = _load(pipe_dirs)
    result = train(pipe, cached["sd"], _config(mixed_precision=precision, steps=2), tmp_path)
    assert all(math.isfinite(m.loss) for m in result.history)
    lora = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    frozen = [p for n, p in pipe.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.float32 for p in lora)
    expected = torch.bfloat16 if precision == "bf16" else torch.float16
    assert all(p.dtype == expected for p in frozen)


def test_warmup_and_grad_accumulation(pipe_dirs, cached, tmp_path):
    config = _config(steps=3, warmup_steps=2, grad_accum=2, batch_size=1, learning_rate=1e-3)
    result = train(_load(pipe_dirs), cached["sd"], config, tmp_path)
    assert [m.lr for m in result.history] == pytest.approx([0.0, 5e-4, 1e-3])
    state = (tmp_path / "step-000003" / "trainer_state.json").read_text()
    assert '"position": 1' in state and '"epoch": 1' in state  # 3 steps × 2 × 1 = 6 pairs of 5


def test_grad_clipping_bounds_the_gradient(pipe_dirs, cached):
    trainer = DPOTrainer(_load(pipe_dirs), _config(max_grad_norm=1e-3), device="cpu")
    metrics = trainer.train_step([cached["sd"].batch([0, 1], "cpu")], 1)
    clipped = torch.cat([p.grad.flatten() for _, p in trainer.trainable]).norm()
    assert metrics.grad_norm > 1e-3
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_ties_are_dropped_or_kept_as_soft_labels(cached):
    data = cached["sd"]
    assert _usable_pairs(data, _config()) == [0, 1, 2, 3, 4]
    assert _usable_pairs(data, _config(tie_policy="drop")) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="usable"):
        PairSampler([], seed=0, num_processes=1, rank=0)


def test_tie_soft_label_reaches_the_loss(pipe_dirs, cached):
    trainer = DPOTrainer(_load(pipe_dirs), _config(), device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move θ away from ref so the margin is non-zero
        for name, param in trainer.trainable:
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    tie = cached["sd"].batch([3, 3], "cpu")
    assert tie.labels.tolist() == [0.5, 0.5]
    _, soft = trainer.compute(tie)
    assert soft.logits.abs().min() > 0
    z = -2500.0 * soft.logits  # (β/2)(Δθ − Δref)
    softplus = torch.nn.functional.softplus
    assert torch.allclose(soft.losses, 0.5 * softplus(z) + 0.5 * softplus(-z), rtol=1e-5)
    assert soft.implicit_acc.item() == 0.5


def test_validation_logs_held_out_figures_without_changing_training(pipe_dirs, cached, tmp_path):
    config = _config(steps=4, checkpoint_every=4)
    plain = train(_load(pipe_dirs), cached["sd"], config, tmp_path / "a")
    seen: list[ValMetrics] = []
    checked = train(
        _load(pipe_dirs), cached["sd"], config, tmp_path / "b",
        val_data=cached["sd"], val_every=3, on_validation=seen.append,
    )  # fmt: skip
    # validation draws its own noise: the training run is bit-identical with or without it
    assert [m.loss for m in checked.history] == [m.loss for m in plain.history]
    assert [v.step for v in checked.validation] == [3, 4] and seen == checked.validation
    last = checked.validation[-1]
    assert last.val_pairs == 5 and 0.0 <= last.val_implicit_acc <= 1.0
    assert set(last.as_dict()) == {"val_implicit_acc", "val_reward_margin", "val_loss", "val_pairs"}


def test_validate_is_repeatable_and_neutral_at_the_reference(pipe_dirs, cached):
    trainer = DPOTrainer(_load(pipe_dirs), _config(), device="cpu")
    noise_state = trainer.noise_gen.get_state()
    at_ref = trainer.validate(cached["sd"], step=0, batch_size=2)
    assert torch.equal(trainer.noise_gen.get_state(), noise_state)
    # θ = ref (B = 0): no margin, every pair a tie of the two models, loss ln 2
    assert at_ref.val_reward_margin == 0.0 and at_ref.val_implicit_acc == 0.5
    assert at_ref.val_loss == pytest.approx(LN2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.trainable:
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    first = trainer.validate(cached["sd"], step=1, batch_size=2)
    again = trainer.validate(cached["sd"], step=1, batch_size=5)
    assert first.val_reward_margin != 0.0
    # β/2 = 2500 magnifies batch-size-dependent float rounding of the errors
    assert first.val_reward_margin == pytest.approx(again.val_reward_margin, rel=1e-3)
    assert first.val_implicit_acc == pytest.approx(again.val_implicit_acc)


def test_held_out_prompts_are_a_stable_share_by_prompt():
    prompts = [f"prompt {i}" for i in range(2000)]
    held = held_out_prompts(prompts + prompts[:50], 0.1)
    assert held == held_out_prompts(list(reversed(prompts)), 0.1)  # order and repeats ignored
    assert 150 <= len(held) <= 250
    assert held_out_prompts(prompts, 0.0) == set()
    with pytest.raises(ValueError, match="share"):
        held_out_prompts(prompts, 1.0)


def test_majority_label_stays_soft_when_ties_are_dropped(pipe_dirs, cached):
    trainer = DPOTrainer(_load(pipe_dirs), _config(tie_policy="drop"), device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.trainable:
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    batch = cached["sd"].batch([0, 1], "cpu")
    batch.labels = torch.tensor([2 / 3, 1.0])  # a 2-to-1 vote, a unanimous one
    _, out = trainer.compute(batch)
    z = -2500.0 * out.logits  # (β/2)(Δθ − Δref)
    softplus = torch.nn.functional.softplus
    expected = torch.stack([2 / 3 * softplus(z[0]) + 1 / 3 * softplus(-z[0]), softplus(z[1])])
    assert torch.allclose(out.losses, expected, rtol=1e-5)


def test_empty_prompt_dropout_replaces_the_condition(pipe_dirs, cached):
    trainer = DPOTrainer(_load(pipe_dirs, "sdxl"), _config(empty_prompt_prob=1.0), device="cpu")
    batch = cached["sdxl"].batch([0, 1], "cpu")
    inputs = trainer._inputs(batch)
    assert torch.equal(inputs["embeds"], batch.empty_prompt_embeds.expand(4, -1, -1))
    assert torch.equal(inputs["added_cond"]["text_embeds"], batch.empty_pooled_embeds.expand(4, -1))


def test_sampler_slices_global_batches_per_process():
    samplers = [PairSampler(range(10), seed=3, num_processes=2, rank=r) for r in (0, 1)]
    first = [s.next_indices(2) for s in samplers]
    assert len(set(first[0]) | set(first[1])) == 4
    seen = first[0] + first[1] + [i for s in samplers for i in s.next_indices(3)]
    assert sorted(seen) == list(range(10))  # one epoch, each pair once
    assert samplers[0].state_dict() == {"epoch": 0, "position": 10}


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError):
        DPOConfig(loss="kto")
    with pytest.raises(ValueError):
        DPOConfig(mixed_precision="fp8")
    with pytest.raises(ValueError):
        DPOConfig(steps=0)


_DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
from worker.dpo_train import CachedPairs, DPOConfig, train
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
config = DPOConfig(steps=2, batch_size=1, grad_accum=2, lora_rank=4, learning_rate=1e-3)
result = train(pipe, CachedPairs.load(Path(sys.argv[2])), config, Path(sys.argv[3]))
rank = torch.distributed.get_rank()
Path(sys.argv[3], f"losses-{rank}.json").write_text(json.dumps([m.loss for m in result.history]))
"""


@pytest.mark.slow
@pytest.mark.long(100)
def test_two_process_data_parallel_run(pipe_dirs, cached, tmp_path):
    """Two CPU processes under torchrun (gloo DDP): one shared set of metrics and checkpoints."""
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    cached["sd"].save(tmp_path / "cache.safetensors")
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [str(script), str(pipe_dirs["sd"]), str(tmp_path / "cache.safetensors")]
    command += [str(tmp_path / "ck")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [(tmp_path / "ck" / f"losses-{r}.json").read_text() for r in (0, 1)]
    assert losses[0] == losses[1]  # metrics are all-reduced
    checkpoint = tmp_path / "ck" / "step-000002"
    assert (checkpoint / "rng-rank0.safetensors").is_file()
    assert (checkpoint / "rng-rank1.safetensors").is_file()
    state = (checkpoint / "trainer_state.json").read_text()
    assert '"position": 3' in state  # 2 steps × 2 micro-batches × 1 pair × 2 processes = 8 of 5


# --- the default recipe ------------------------------------------------------------------------


def _recipe_item(key: str, value: object) -> str:
    return f"`{key}={value:g}`" if isinstance(value, float) else f"`{key}={value}`"


def test_defaults_are_the_documented_recipe():
    from app.jobs.kinds import TrainDPOParams

    # what the job trains with when only model_id is given: the params model is the trainer's
    # config (one definition of every default)
    job_defaults = TrainDPOParams(model_id=1).model_dump()
    assert {k: job_defaults[k] for k in RECIPE} == RECIPE
    assert {k: getattr(DPOConfig(), k) for k in RECIPE} == RECIPE
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The default DPO recipe", 1)[1].split("\n#", 1)[0]
    for key, value in RECIPE.items():
        assert _recipe_item(key, value) in section, key
