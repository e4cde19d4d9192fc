"""Generation layer against tiny random SD 1.x and SDXL pipelines built on disk (no hub)."""

from __future__ import annotations

import importlib.metadata
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from PIL import Image, PngImagePlugin

import worker.toy
from tests.tiny_pipelines import IMAGE_SIZE, build_tiny_lora, build_tiny_sd, build_tiny_sdxl
from worker import generation
from worker.generation import (
    SCHEDULER_NAMES,
    GeneratorSpec,
    ModelLoadError,
    batch_size_for_memory,
    clear_cache,
    default_batch_size,
    generate_batch,
    get_pipeline,
    hub_failure_reason,
    initial_latents,
    iter_generate,
    load_pipeline,
    make_scheduler,
    native_size,
    png_bytes,
    provenance,
    resolve_dtype,
    sha256_hex,
)

STEPS = 3
# The tests run on whatever the worker would use: the CPU here, CUDA on a GPU machine.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AUTO_DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


@dataclass(frozen=True)
class TinyModels:
    sd: Path
    sd_v: Path
    sdxl: Path
    sd_lora: Path
    sdxl_lora: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("tiny-models")
    sd = build_tiny_sd(root / "sd")
    sdxl = build_tiny_sdxl(root / "sdxl")
    return TinyModels(
        sd=sd,
        sd_v=build_tiny_sd(root / "sd-v", prediction_type="v_prediction", seed=1),
        sdxl=sdxl,
        sd_lora=build_tiny_lora(sd, root / "sd-lora", seed=1),
        sdxl_lora=build_tiny_lora(sdxl, root / "sdxl-lora", seed=1),
    )


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    torch.set_num_threads(1)
    clear_cache()
    yield
    clear_cache()


def spec_for(base: Path | str, **overrides: object) -> GeneratorSpec:
    params: dict[str, object] = {
        "scheduler": "ddim",
        "steps": STEPS,
        "guidance_scale": 5.0,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
    }
    params.update(overrides)
    return GeneratorSpec(base=str(base), **params)  # type: ignore[arg-type]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def one_image(spec: GeneratorSpec, prompt: str = "a red circle", seed: int = 7) -> Image.Image:
    [image] = generate_batch(get_pipeline(spec), spec, [prompt], [seed])
    return image


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "pipeline_class"),
    [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")],
)
def test_pipeline_loads_by_path_and_generates(
    models: TinyModels, which: str, pipeline_class: str
) -> None:
    spec = spec_for(getattr(models, which))
    pipe = get_pipeline(spec)
    assert type(pipe).__name__ == pipeline_class
    assert pipe.device.type == DEVICE.type
    assert pipe.unet.dtype == AUTO_DTYPE
    images = generate_batch(pipe, spec, ["a red circle", "a blue square"], [1, 2])
    assert len(images) == 2
    for image in images:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert image.mode == "RGB"
        assert pixels(image).std() > 1  # a random model still gives a non-constant image


def test_safety_checker_is_off(models: TinyModels) -> None:
    pipe = get_pipeline(spec_for(models.sd))
    assert pipe.safety_checker is None


def test_native_size_when_height_and_width_are_unset(models: TinyModels) -> None:
    image = one_image(spec_for(models.sd, height=None, width=None))
    # unet.sample_size (16) times the tiny VAE's scale factor (2)
    assert image.size == (32, 32)


def test_v_prediction_model_generates(models: TinyModels) -> None:
    pipe = get_pipeline(spec_for(models.sd_v))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = one_image(spec_for(models.sd_v, scheduler="euler"))
    assert get_pipeline(spec_for(models.sd_v)).scheduler.config.prediction_type == "v_prediction"
    assert pixels(image).std() > 1


@pytest.mark.parametrize(("which", "lora"), [("sd", "sd_lora"), ("sdxl", "sdxl_lora")])
def test_lora_adapter_loads_and_changes_the_output(
    models: TinyModels, which: str, lora: str
) -> None:
    base = getattr(models, which)
    plain = one_image(spec_for(base))
    adapted = one_image(spec_for(base, adapter=str(getattr(models, lora))))
    assert np.abs(pixels(plain) - pixels(adapted)).mean() > 1.0


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_each_dtype_loads_and_generates(models: TinyModels, dtype: str) -> None:
    spec = spec_for(models.sd, dtype=dtype)
    pipe = get_pipeline(spec)
    expected = AUTO_DTYPE if dtype == "auto" else getattr(torch, dtype)
    assert pipe.unet.dtype == expected
    assert one_image(spec).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_unknown_path_raises_model_load_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(spec_for(missing))
    message = str(info.value)
    assert message.startswith(f"cannot load model '{missing}': ")
    assert "no such directory" in message


def test_directory_without_model_index_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_pipeline(spec_for(tmp_path))


def test_unknown_hub_id_offline_is_a_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(spec_for("prefloop-absent/no-model"))
    assert str(info.value) == (
        "cannot load model 'prefloop-absent/no-model': "
        "not in the local model-hub cache, and HF_HUB_OFFLINE forbids downloading"
    )


def _hub_error(cls: type[Exception]) -> Exception:
    # HTTP errors want a live response object; the reason only looks at the exception type.
    error = cls.__new__(cls)
    Exception.__init__(error, "http error")
    return error


def _raised_from(outer: Exception, cause: Exception) -> Exception:
    try:
        try:
            raise cause
        except Exception as inner:
            raise outer from inner
    except Exception as caught:
        return caught


@pytest.mark.parametrize(
    ("cause", "local_only", "expected"),
    [
        (LocalEntryNotFoundError("gone"), False, "model hub could not be reached"),
        (LocalEntryNotFoundError("gone"), True, "HF_HUB_OFFLINE forbids downloading"),
        (_hub_error(RepositoryNotFoundError), False, "no such model"),
        (_hub_error(GatedRepoError), False, "gated"),
        (ValueError("odd config"), False, "does not appear to have"),
    ],
)
def test_hub_failure_reasons(cause: Exception, local_only: bool, expected: str) -> None:
    diffusers_error = OSError("org/model does not appear to have a file named model_index.json.")
    reason = hub_failure_reason(_raised_from(diffusers_error, cause), local_only)
    assert expected in reason


def test_missing_adapter_is_a_model_load_error(models: TinyModels, tmp_path: Path) -> None:
    spec = spec_for(models.sd, adapter=str(tmp_path / "no-adapter"))
    with pytest.raises(ModelLoadError, match="cannot load adapter") as info:
        load_pipeline(spec)
    assert str(tmp_path / "no-adapter") in str(info.value)


def test_toy_base_is_resolved_through_worker_toy(
    models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def fake_resolve_toy(base: str) -> Path:
        asked.append(base)
        return models.sd

    monkeypatch.setattr(worker.toy, "resolve_toy", fake_resolve_toy, raising=False)
    pipe = load_pipeline(spec_for("toy-v0"))
    assert asked == ["toy-v0"]
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize(
    ("resolved", "message"),
    [(None, "no toy model has this name"), ("missing", "toy model weights are missing at")],
)
def test_unusable_toy_names_are_model_load_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resolved: str | None, message: str
) -> None:
    toy_dir = None if resolved is None else tmp_path / resolved
    monkeypatch.setattr(worker.toy, "resolve_toy", lambda base: toy_dir, raising=False)
    with pytest.raises(ModelLoadError, match=f"cannot load model 'toy-v9': {message}"):
        load_pipeline(spec_for("toy-v9"))


def test_toy_base_without_toy_models_is_a_model_load_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(worker.toy, "resolve_toy", raising=False)
    monkeypatch.setitem(sys.modules, "worker.toy.resolve_toy", None)
    with pytest.raises(ModelLoadError, match="cannot load model 'toy': toy models are not"):
        load_pipeline(spec_for("toy"))


# --- schedulers ------------------------------------------------------------------------------

EXPECTED_SCHEDULER_CLASS = {
    "default": "DDIMScheduler",  # what the tiny models were saved with
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def test_every_scheduler_name_is_covered() -> None:
    assert set(SCHEDULER_NAMES) == set(EXPECTED_SCHEDULER_CLASS)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_scheduler_runs(models: TinyModels, name: str) -> None:
    spec = spec_for(models.sd, scheduler=name)
    pipe = get_pipeline(spec)
    image = one_image(spec)
    assert type(pipe.scheduler).__name__ == EXPECTED_SCHEDULER_CLASS[name]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert pixels(image).std() > 1
    # Same seed, same scheduler: the scheduler's randomness also comes from the seed.
    assert png_bytes(one_image(spec)) == png_bytes(image)


def test_schedulers_change_the_image(models: TinyModels) -> None:
    ddim = one_image(spec_for(models.sd, scheduler="ddim"))
    euler_a = one_image(spec_for(models.sd, scheduler="euler_ancestral"))
    assert np.abs(pixels(ddim) - pixels(euler_a)).mean() > 1.0


def test_dpmpp_2m_is_dpm_solver_plus_plus() -> None:
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}
    scheduler = make_scheduler("dpmpp_2m", config)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert make_scheduler("dpmpp_2m_karras", config).config.use_karras_sigmas is True


def test_switching_scheduler_starts_from_the_model_config(models: TinyModels) -> None:
    one_image(spec_for(models.sd, scheduler="dpmpp_2m_karras"))
    one_image(spec_for(models.sd, scheduler="euler"))
    pipe = get_pipeline(spec_for(models.sd))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert not pipe.scheduler.config.use_karras_sigmas
    one_image(spec_for(models.sd, scheduler="default"))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_unknown_scheduler_is_a_value_error_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'heun_xl'.*ddim.*dpmpp_2m"):
        GeneratorSpec(base="toy", scheduler="heun_xl")
    with pytest.raises(ValueError, match="valid schedulers: .*euler_ancestral"):
        make_scheduler("heun_xl", {"_class_name": "DDIMScheduler"})


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_the_same_image(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    first = one_image(spec, seed=11)
    clear_cache()  # a fresh load must not matter either
    second = one_image(spec, seed=11)
    assert png_bytes(first) == png_bytes(second)


def test_image_does_not_depend_on_its_batch_neighbours(models: TinyModels) -> None:
    spec = spec_for(models.sd, scheduler="euler_ancestral")  # noise at every step, too
    pipe = get_pipeline(spec)
    batch = generate_batch(pipe, spec, ["a red circle", "a blue square", "a cross"], [1, 2, 3])
    alone = generate_batch(pipe, spec, ["a blue square"], [2])[0]
    # Batched kernels may round differently; one 8-bit level is the most we allow.
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(alone)).mean() > 1.0


def test_initial_noise_is_drawn_in_float32_one_generator_per_image(models: TinyModels) -> None:
    spec = spec_for(models.sd, dtype="float32")
    fp32 = get_pipeline(spec)
    bf16 = get_pipeline(spec_for(models.sd, dtype="bfloat16"))

    def noise(pipe: object, seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        latents = initial_latents(pipe, spec, generators)
        assert latents is not None
        return latents.cpu()

    pair = noise(fp32, [1, 2])
    assert pair.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert pair.dtype == torch.float32
    assert torch.equal(pair[1:], noise(fp32, [2]))
    expected = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(pair[1:], expected)
    # Reduced precision: the same float32 draw, rounded.
    assert torch.equal(noise(bf16, [2]), expected.to(torch.bfloat16))


def test_native_size_of_sd_and_sdxl(models: TinyModels) -> None:
    assert native_size(get_pipeline(spec_for(models.sd))) == (32, 32)
    assert native_size(get_pipeline(spec_for(models.sdxl))) == (32, 32)


def test_different_seeds_give_different_images(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    a, b = generate_batch(get_pipeline(spec), spec, ["a red circle"] * 2, [1, 2])
    assert np.abs(pixels(a) - pixels(b)).mean() > 1.0


def test_generate_batch_checks_its_arguments(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    pipe = get_pipeline(spec)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_batch(pipe, spec, ["a", "b"], [1])
    with pytest.raises(ValueError, match="seed must be"):
        generate_batch(pipe, spec, ["a"], [-1])
    assert generate_batch(pipe, spec, [], []) == []


# --- cache -----------------------------------------------------------------------------------


@pytest.fixture
def load_count(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []
    real_load = generation.load_pipeline

    def counting_load(spec: GeneratorSpec, device: object = None) -> object:
        loaded.append(spec.base)
        return real_load(spec)

    monkeypatch.setattr(generation, "load_pipeline", counting_load)
    return loaded


def test_cache_returns_the_same_pipeline_and_loads_once(
    models: TinyModels, load_count: list[str]
) -> None:
    spec = spec_for(models.sd)
    first = get_pipeline(spec)
    # Sampling params do not change the weights, so they share the cached pipeline.
    same_weights = spec_for(models.sd, scheduler="euler", steps=5, guidance_scale=1.0)
    assert get_pipeline(spec) is first
    assert get_pipeline(same_weights) is first
    assert load_count == [str(models.sd)]


def test_cache_keys_on_adapter_and_dtype(models: TinyModels, load_count: list[str]) -> None:
    plain = get_pipeline(spec_for(models.sd))
    adapted = get_pipeline(spec_for(models.sd, adapter=str(models.sd_lora)))
    assert adapted is not plain
    assert len(load_count) == 2
    assert spec_for(models.sd).cache_key != spec_for(models.sd, dtype="bfloat16").cache_key


def test_cache_evicts_the_least_recently_used(models: TinyModels, load_count: list[str]) -> None:
    sd, sdxl, sd_v = spec_for(models.sd), spec_for(models.sdxl), spec_for(models.sd_v)
    get_pipeline(sd)
    get_pipeline(sdxl)
    get_pipeline(sd)  # sd is now the most recent
    get_pipeline(sd_v)  # evicts sdxl (cache of 2)
    get_pipeline(sd)
    assert len(load_count) == 3
    get_pipeline(sdxl)
    assert load_count == [str(models.sd), str(models.sdxl), str(models.sd_v), str(models.sdxl)]
    clear_cache()
    get_pipeline(sd)
    assert len(load_count) == 5


# --- iteration and cancellation --------------------------------------------------------------

ITEMS = [("a red circle", 1), ("a blue square", 2), ("a cross", 3), ("a triangle", 4), ("x", 5)]


def test_iter_generate_yields_every_item_in_order(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    progress: list[tuple[int, int]] = []
    out = list(
        iter_generate(spec, ITEMS, batch_size=2, on_batch=lambda d, t: progress.append((d, t)))
    )
    assert [(p, s) for p, s, _ in out] == ITEMS
    assert progress == [(2, 5), (4, 5), (5, 5)]
    alone = one_image(spec, prompt="a cross", seed=3)
    assert np.abs(pixels(out[2][2]) - pixels(alone)).max() <= 1


def test_cancel_stops_between_batches(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    cancelled = False
    asked = 0

    def should_cancel() -> bool:
        nonlocal asked
        asked += 1
        return cancelled

    def on_batch(done: int, total: int) -> None:
        nonlocal cancelled
        cancelled = True  # cancel arrives while the first batch is being stored

    out = list(
        iter_generate(spec, ITEMS, batch_size=2, should_cancel=should_cancel, on_batch=on_batch)
    )
    assert [(p, s) for p, s, _ in out] == ITEMS[:2]
    assert asked == 2


def test_iter_generate_default_batch_size_and_bad_batch_size(models: TinyModels) -> None:
    spec = spec_for(models.sd)
    progress: list[tuple[int, int]] = []
    list(iter_generate(spec, ITEMS, on_batch=lambda d, t: progress.append((d, t))))
    per_batch = default_batch_size(DEVICE)
    assert progress == [(min(n, 5), 5) for n in range(per_batch, 5 + per_batch, per_batch)]
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_generate(spec, ITEMS, batch_size=0))


def test_default_batch_size() -> None:
    assert default_batch_size("cpu") == 4
    assert batch_size_for_memory(80 * 2**30) == 8
    assert batch_size_for_memory(24 * 2**30) == 4
    assert batch_size_for_memory(12 * 2**30) == 2


# --- spec, provenance, encoding --------------------------------------------------------------


def test_spec_validation_and_from_params() -> None:
    spec = GeneratorSpec.from_params("toy", None, {"steps": 4, "scheduler": "euler", "width": 64})
    assert (spec.steps, spec.scheduler, spec.width, spec.height) == (4, "euler", 64, None)
    with pytest.raises(ValueError, match="unknown generation params \\['seed'\\]"):
        GeneratorSpec.from_params("toy", None, {"seed": 1})
    with pytest.raises(ValueError, match="dtype"):
        GeneratorSpec(base="toy", dtype="int8")
    with pytest.raises(ValueError, match="steps"):
        GeneratorSpec(base="toy", steps=0)
    with pytest.raises(ValueError, match="height"):
        GeneratorSpec(base="toy", height=0)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_provenance_records_model_params_and_versions() -> None:
    spec = GeneratorSpec(base="org/model", adapter="/a", scheduler="dpmpp_2m", steps=9, height=64)
    record = provenance(spec, 42)
    assert record["base"] == "org/model"
    assert record["adapter"] == "/a"
    assert record["seed"] == 42
    assert (record["scheduler"], record["steps"], record["guidance_scale"]) == ("dpmpp_2m", 9, 5.0)
    assert (record["height"], record["width"]) == (64, None)
    assert record["dtype"] == str(AUTO_DTYPE).removeprefix("torch.")
    assert record["device"] == DEVICE.type
    assert record["diffusers"] == importlib.metadata.version("diffusers")
    assert record["torch"] == importlib.metadata.version("torch")
    assert torch.__version__.startswith(record["torch"].split("+")[0])


def test_png_bytes_depend_only_on_pixels() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    with_metadata = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "hello")
    image.save(with_metadata, format="PNG", pnginfo=info)
    reloaded = Image.open(io.BytesIO(with_metadata.getvalue()))
    assert reloaded.info.get("comment") == "hello"
    assert png_bytes(reloaded) == png_bytes(image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(image)))), array)


def test_sha256_hex() -> None:
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_hex(b"abc") == expected
