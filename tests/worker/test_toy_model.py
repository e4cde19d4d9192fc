import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline

from worker.toy import TOY_MODELS, resolve_toy, world
from worker.toy.cli import toy_group
from worker.toy.evaluate import evaluate_alignment, generate
from worker.toy.model import (
    ToyModelConfig,
    bpe,
    build_tokenizer,
    load_pipeline,
    tokenizer_files,
)
from worker.toy.train import (
    drop_captions,
    ema_update,
    kl_to_standard_normal,
    min_snr_weights,
    to_model_range,
)

# Guards the size budget for shipped weights (both checkpoints together).
MAX_WEIGHTS_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def toy_pipe() -> StableDiffusionPipeline:
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(
        TOY_MODELS["toy"], safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- pure pieces ---------------------------------------------------------------------------


def test_min_snr_weights_hand_values() -> None:
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1])  # SNR = 9, 1, 1/9
    weights = min_snr_weights(torch.tensor([0, 1, 2]), alphas_cumprod, gamma=5.0)
    torch.testing.assert_close(weights, torch.tensor([5.0 / 9.0, 1.0, 1.0]))


def test_kl_to_standard_normal_hand_values() -> None:
    assert float(kl_to_standard_normal(torch.zeros(4), torch.zeros(4))) == 0.0
    # mean 1, var 1: KL = 0.5 * (1 + 1 - 1 - 0) = 0.5
    assert float(kl_to_standard_normal(torch.ones(3), torch.zeros(3))) == pytest.approx(0.5)
    # mean 0, logvar = log 2: KL = 0.5 * (2 - 1 - log 2)
    value = kl_to_standard_normal(torch.zeros(2), torch.full((2,), np.log(2.0)))
    assert float(value) == pytest.approx(0.5 * (1 - np.log(2.0)))


def test_drop_captions_rate_and_content() -> None:
    captions = [f"c{i}" for i in range(2000)]
    dropped = drop_captions(captions, np.random.default_rng(0), p=0.1)
    empty = sum(d == "" for d in dropped)
    assert 150 < empty < 250
    assert all(d in ("", c) for d, c in zip(dropped, captions, strict=True))
    assert drop_captions(captions[:5], np.random.default_rng(0), p=0.0) == captions[:5]


def test_ema_update_moves_towards_model() -> None:
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        ema.weight.fill_(0.0)
        model.weight.fill_(1.0)
    ema_update(ema, model, decay=0.75)
    assert float(ema.weight.detach()) == pytest.approx(0.25)


def test_to_model_range() -> None:
    images = np.array([[[[0, 255, 127]]]], dtype=np.uint8)  # (1, 1, 1, 3)
    x = to_model_range(images)
    assert x.shape == (1, 3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1.0]))


def test_bpe_merges_by_rank() -> None:
    ranks = {("a", "b"): 0, ("b", "c"): 1, ("ab", "c"): 2}
    assert bpe(["a", "b", "c"], ranks) == ["abc"]
    assert bpe(["b", "c", "a"], ranks) == ["bc", "a"]
    assert bpe(["x", "y"], ranks) == ["x", "y"]


def test_tokenizer_keeps_every_grammar_word_whole() -> None:
    tokenizer = build_tokenizer(ToyModelConfig())
    for word in world.vocabulary():
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids)
        assert tokens[1:-1] == [word + "</w>"], tokens
    # Words sharing letters in different orders ("large" / "black") would split naively.
    vocab, merges = tokenizer_files(["large", "black"])
    assert "large</w>" in vocab and "black</w>" in vocab
    longest = max(len(tokenizer(p).input_ids) for p in world.sample_prompts(500, seed=0))
    assert longest <= tokenizer.model_max_length
    # Unknown words still tokenize, as pieces.
    assert len(tokenizer("zebra").input_ids) > 3


# --- shipped weights -----------------------------------------------------------------------


def test_resolve_toy() -> None:
    assert resolve_toy("toy") == TOY_MODELS["toy"]
    assert resolve_toy("toy-v0") == TOY_MODELS["toy-v0"]
    assert resolve_toy("runwayml/stable-diffusion-v1-5") is None


def test_shipped_weights_are_small_safetensors() -> None:
    total = 0
    for path in TOY_MODELS.values():
        files = [f for f in path.rglob("*") if f.is_file()]
        assert any(f.suffix == ".safetensors" for f in files)
        assert not any(f.suffix in (".bin", ".pt", ".ckpt") for f in files)
        total += sum(f.stat().st_size for f in files)
    assert total <= MAX_WEIGHTS_BYTES


def test_shipped_model_loads_in_fp32(toy_pipe: StableDiffusionPipeline) -> None:
    for module in (toy_pipe.unet, toy_pipe.vae, toy_pipe.text_encoder):
        assert module.dtype == torch.float32
    assert toy_pipe.unet.config.sample_size * toy_pipe.vae_scale_factor == 32


def test_same_seed_same_image(toy_pipe: StableDiffusionPipeline) -> None:
    prompts = ["a large red circle", "a small blue square on the left"]
    a = generate(toy_pipe, prompts, seed=3, steps=4)
    b = generate(toy_pipe, prompts, seed=3, steps=4)
    c = generate(toy_pipe, prompts, seed=4, steps=4)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.slow
@pytest.mark.long(70)
def test_shipped_model_draws_what_is_prompted(toy_pipe: StableDiffusionPipeline) -> None:
    report = evaluate_alignment(toy_pipe, n=200, seed=0)
    print("toy:", report.summary())
    assert report.accuracy["colour"] >= 0.90
    assert report.accuracy["shape"] >= 0.70


@pytest.mark.slow
def test_toy_v0_is_a_weaker_contestant(toy_pipe: StableDiffusionPipeline) -> None:
    weak = load_pipeline(TOY_MODELS["toy-v0"])
    strong_report = evaluate_alignment(toy_pipe, n=64, seed=1)
    weak_report = evaluate_alignment(weak, n=64, seed=1)
    print("toy:", strong_report.summary())
    print("toy-v0:", weak_report.summary())
    strong = np.mean([strong_report.accuracy[a] for a in ("colour", "shape")])
    weak_mean = np.mean([weak_report.accuracy[a] for a in ("colour", "shape")])
    assert strong - weak_mean >= 0.1


# --- CLI -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_train_smoke(tmp_path: Path) -> None:
    out, early = tmp_path / "toy", tmp_path / "toy-early"
    args = ["train", "--out", str(out), "--minutes", "2", "--seed", "1", "--threads", "1"]
    args += ["--device", "cpu", "--dataset-size", "64", "--max-steps", "2", "--vae-steps", "2"]
    args += ["--snapshot", f"1={early}"]
    result = CliRunner().invoke(toy_group, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "training_info.json").read_text())
    assert info["unet"]["steps"] == 2 and info["vae"]["steps"] == 2
    assert json.loads((early / "training_info.json").read_text())["unet"]["steps"] == 1
    pipe = load_pipeline(out)
    images = generate(pipe, ["a red circle"], seed=0, steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_cli_train_rejects_bad_snapshot(tmp_path: Path) -> None:
    result = CliRunner().invoke(toy_group, ["train", "--out", str(tmp_path), "--snapshot", "x"])
    assert result.exit_code != 0
    assert "STEP=DIR" in result.output


def test_cli_evaluate(tmp_path: Path) -> None:
    args = ["evaluate", "toy-v0", "-n", "4", "--steps", "2", "--seed", "1", "--threads", "1"]
    result = CliRunner().invoke(toy_group, args)
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "colour" in result.output
    missing = CliRunner().invoke(toy_group, ["evaluate", str(tmp_path)])
    assert missing.exit_code != 0


@pytest.mark.slow
def test_training_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from worker.toy.train import ToyTrainConfig, train_toy_model

    def unet_weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        cfg = ToyTrainConfig(
            minutes=2, seed=seed, dataset_size=32, vae_max_steps=1, unet_max_steps=2
        )
        out = train_toy_model(tmp_path / name, cfg)
        return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")

    a, b, c = unet_weights(5, "a"), unet_weights(5, "b"), unet_weights(6, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
