"""Text-to-image generation with diffusers: model loading, a pipeline cache, batched sampling.

An image depends only on (prompt, model spec, seed): every image gets its own CPU
`torch.Generator`, so neither the batch it was generated in nor the device changes its noise.

torch and diffusers are imported inside functions so that the web side can import
`SCHEDULER_NAMES` without loading torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ConfigDict, Field, field_validator

from app.generators.schemas import DType, GenerationParams
from worker.cache import LoadedCache

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from PIL.Image import Image

log = logging.getLogger(__name__)

# Scheduler name -> (diffusers class name, config overrides). "default" keeps the model's own.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("", {}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)
DTYPES: tuple[str, ...] = get_args(DType)

# "toy" and "toy-<version>" name the project's own toy models, resolved by worker.toy.
_TOY_RE = re.compile(r"^toy(-[\w.]+)?$")
# "org/name" or a bare legacy name; anything else that is not on disk cannot be a hub id.
_HUB_ID_RE = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")

# Pipelines held per process; each SD-class pipeline holds several GB of weights on a GPU.
DEFAULT_MAX_CACHED = 2


class ModelLoadError(RuntimeError):
    """A model or adapter could not be loaded; the message is shown on the failed job."""

    def __init__(self, base: str, reason: str) -> None:
        self.base = base
        self.reason = reason
        super().__init__(f"cannot load model {base!r}: {reason}")


def _check_scheduler_name(name: str) -> None:
    if name not in _SCHEDULERS:
        valid = ", ".join(SCHEDULER_NAMES)
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {valid}")


# A model version's sampling policy: keys of its params that choose among samples rather than
# change one (best-of-N with a reward model). They are not part of the GeneratorSpec.
SAMPLING_POLICY_KEYS: tuple[str, ...] = ("best_of", "reward_model_id")


def sampling_free_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A model version's params without its sampling policy."""
    return {k: v for k, v in params.items() if k not in SAMPLING_POLICY_KEYS}


@dataclass(frozen=True)
class SamplingPolicy:
    """Best-of-N: draw `best_of` candidates per requested image, the reward model keeps one.

    `reward_model_id` None means the project's latest reward model at generation time.
    """

    best_of: int = 1
    reward_model_id: int | None = None

    def __post_init__(self) -> None:
        if self.best_of < 1:
            raise ValueError(f"best_of must be at least 1, got {self.best_of}")

    @property
    def active(self) -> bool:
        return self.best_of > 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> SamplingPolicy:
        params = params or {}
        return cls(
            best_of=int(params.get("best_of") or 1), reward_model_id=params.get("reward_model_id")
        )


class GeneratorSpec(GenerationParams):
    """Everything that determines a model's images, apart from the prompt and the seed.

    The sampling fields and their defaults are the API's `GenerationParams`: a model version's
    stored params are exactly what the worker samples with.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(min_length=1)
    adapter: str | None = None

    @field_validator("scheduler", mode="before")
    @classmethod
    def _known_scheduler(cls, value: Any) -> Any:
        _check_scheduler_name(value)  # a message that names every valid scheduler
        return value

    @classmethod
    def from_params(
        cls, base: str, adapter: str | None = None, params: Mapping[str, Any] | None = None
    ) -> GeneratorSpec:
        """Build a spec from a model version's `params` JSON; unknown keys are an error."""
        params = sampling_free_params(params or {})
        allowed = set(GenerationParams.model_fields) - set(SAMPLING_POLICY_KEYS)
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"unknown generation params {unknown}; valid params: {', '.join(sorted(allowed))}"
            )
        return cls(base=base, adapter=adapter or None, **params)

    @property
    def cache_key(self) -> str:
        """Identity of the loaded weights; the scheduler and sampling params are not part of it."""
        return "\x1f".join((self.base, self.adapter or "", self.dtype))


# ---------------------------------------------------------------------------------------------
# Devices and dtypes


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """ "auto" is float16 on CUDA (half the memory, tensor cores) and float32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def batch_size_for_memory(total_memory_bytes: int) -> int:
    """Images per pipeline call that fit an SD/SDXL-class model in this much accelerator memory."""
    gib = total_memory_bytes / 2**30
    if gib >= 40:
        return 8
    if gib >= 20:
        return 4
    return 2


def default_batch_size(device: torch.device | str) -> int:
    """A safe number of images per pipeline call on `device`."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return batch_size_for_memory(torch.cuda.get_device_properties(device).total_memory)
    # CPU: batching barely raises throughput, and small batches keep cancellation responsive.
    return 4


# ---------------------------------------------------------------------------------------------
# Schedulers


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler by name, configured from a model's original scheduler `config`."""
    import diffusers

    _check_scheduler_name(name)
    class_name, overrides = _SCHEDULERS[name]
    if not class_name:
        class_name = config["_class_name"]
    scheduler_cls = getattr(diffusers, class_name)
    return scheduler_cls.from_config(config, **overrides)


# The scheduler each pipeline was loaded with: switching by name always starts from it, so
# options of one scheduler (e.g. Karras sigmas) never leak into the next.
_ORIGINAL_SCHEDULERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _original_scheduler_config(pipe: DiffusionPipeline) -> Mapping[str, Any]:
    scheduler = _ORIGINAL_SCHEDULERS.setdefault(pipe, pipe.scheduler)
    return scheduler.config


# ---------------------------------------------------------------------------------------------
# Loading


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _short(exc: BaseException) -> str:
    """First line of an exception, clipped, for an error message people read on a job page."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def hub_failure_reason(exc: BaseException, local_only: bool) -> str:
    """Why a hub id did not load, in words; diffusers' own message hides the cause."""
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "the model hub repository is gated: accept its licence and set HF_TOKEN"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "no such model on the model hub (or it is private and HF_TOKEN is not set)"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        if local_only:
            return "not in the local model-hub cache, and HF_HUB_OFFLINE forbids downloading"
        return "the model hub could not be reached and the model is not in the local cache"
    return _short(exc)


def resolve_base(base: str) -> str:
    """The local directory or hub id that `from_pretrained` should read for `base`."""
    if _TOY_RE.match(base) and not Path(base).exists():
        try:
            from worker.toy import resolve_toy
        except ImportError:
            raise ModelLoadError(
                base, "toy models are not available in this installation"
            ) from None
        try:
            toy_dir = resolve_toy(base)
        except Exception as exc:
            raise ModelLoadError(base, _short(exc)) from exc
        if toy_dir is None:
            raise ModelLoadError(base, "no toy model has this name")
        if not (Path(toy_dir) / "model_index.json").is_file():
            raise ModelLoadError(
                base, f"toy model weights are missing at {toy_dir} (run `prefloop toy train`)"
            )
        return str(toy_dir)
    _refuse_unconfined(base)
    path = Path(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(base, f"directory {base} has no model_index.json")
        return str(path)
    if path.exists():
        raise ModelLoadError(base, f"{base} is a file, not a diffusers model directory")
    if base.startswith(("/", ".", "~")) or not _HUB_ID_RE.match(base):
        raise ModelLoadError(base, f"no such directory: {base}")
    return base


def _refuse_unconfined(value: str) -> None:
    """A stored base/adapter that is a path on this disk must lie under the model roots or be
    a job artifact (rows from before the check, or a relative path diffusers would read)."""
    from app.generators.sources import loadable_local

    if Path(value).exists() and not loadable_local(value):
        raise ModelLoadError(value, "not an allowed model source (outside the model roots)")


def _dtype_kwarg() -> str:
    # diffusers renamed `torch_dtype` to `dtype` (keeping the old name deprecated); older
    # releases only know `torch_dtype`.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _remappable_pipeline_names() -> set[str]:
    from diffusers.pipelines.auto_pipeline import (
        AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        AUTO_INPAINT_PIPELINES_MAPPING,
    )

    mappings = (AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, AUTO_INPAINT_PIPELINES_MAPPING)
    return {cls.__name__ for mapping in mappings for cls in mapping.values()}


def load_pipeline(spec: GeneratorSpec, device: torch.device | str | None = None) -> Any:
    """Load the text-to-image pipeline for `spec` (uncached); raises ModelLoadError."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars in worker logs are noise; jobs report progress themselves.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    device = default_device() if device is None else device
    dtype = resolve_dtype(spec.dtype, device)
    source = resolve_base(spec.base)
    local_only = _hub_offline()
    try:
        index = DiffusionPipeline.load_config(source, local_files_only=local_only)
    except Exception as exc:
        reason = _short(exc) if Path(source).is_dir() else hub_failure_reason(exc, local_only)
        raise ModelLoadError(spec.base, reason) from exc

    extra: dict[str, Any] = {}
    if "safety_checker" in index:
        # Annotators judge raw samples; a blacked-out image would be a vote on the filter.
        extra = {"safety_checker": None, "requires_safety_checker": False}
    # Text-to-image and custom pipeline classes load as they are; an img2img or inpainting
    # checkpoint is mapped onto its text-to-image sibling (same weights).
    loader = (
        AutoPipelineForText2Image
        if index.get("_class_name") in _remappable_pipeline_names()
        else DiffusionPipeline
    )
    try:
        pipe = loader.from_pretrained(
            source, **{_dtype_kwarg(): dtype}, local_files_only=local_only, **extra
        )
    except Exception as exc:
        raise ModelLoadError(spec.base, _short(exc)) from exc

    if spec.adapter:
        _refuse_unconfined(spec.adapter)
        from worker.lora import load_lora

        try:
            load_lora(pipe, spec.adapter, local_files_only=local_only)
        except Exception as exc:
            raise ModelLoadError(
                spec.base, f"cannot load adapter {spec.adapter!r}: {_short(exc)}"
            ) from exc

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _ORIGINAL_SCHEDULERS[pipe] = pipe.scheduler
    log.info(
        "generation.model_loaded",
        extra={"base": spec.base, "adapter": spec.adapter, "device": str(device)},
    )
    return pipe


# ---------------------------------------------------------------------------------------------
# Per-process pipeline cache (LRU)


def get_pipeline(spec: GeneratorSpec, *, max_cached: int = DEFAULT_MAX_CACHED) -> Any:
    """The cached pipeline for `spec`, loading it (and evicting the least recent) when needed."""
    return _cache.get(spec.cache_key, lambda: load_pipeline(spec), size=max_cached)


def clear_cache() -> None:
    """Drop every cached pipeline."""
    _cache.clear()


def _release_memory() -> None:
    import torch

    # Only a GPU needs the memory back at once; a full collection costs ~0.5 s on a big heap.
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


_cache: LoadedCache[str, Any] = LoadedCache(DEFAULT_MAX_CACHED, on_evict=_release_memory)


# ---------------------------------------------------------------------------------------------
# Sampling


def generate_batch(
    pipe: Any, spec: GeneratorSpec, prompts: Sequence[str], seeds: Sequence[int]
) -> list[Image]:
    """One pipeline call: image i is sampled from prompts[i] with its own generator seeds[i]."""
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    for seed in seeds:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    # A fresh scheduler per call: multistep schedulers keep state between steps.
    pipe.scheduler = make_scheduler(spec.scheduler, _original_scheduler_config(pipe))
    # CPU generators: noise is drawn on the CPU and moved, so a seed means the same noise on
    # every device. Ancestral schedulers keep drawing their per-step noise from them.
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    call: dict[str, Any] = {
        "prompt": list(prompts),
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "output_type": "pil",
    }
    if spec.height is not None:
        call["height"] = spec.height
    if spec.width is not None:
        call["width"] = spec.width
    latents = initial_latents(pipe, spec, generators)
    if latents is not None:
        call["latents"] = latents
    call["generator"] = generators
    with torch.inference_mode():
        return list(pipe(**call).images)


def native_size(pipe: Any) -> tuple[int, int]:
    """(height, width) a UNet pipeline generates when none is asked for."""
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    rows, cols = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
    return rows * pipe.vae_scale_factor, cols * pipe.vae_scale_factor


def initial_latents(
    pipe: Any, spec: GeneratorSpec, generators: Sequence[torch.Generator]
) -> torch.Tensor | None:
    """Starting noise for a UNet pipeline: float32 draws on the CPU, one generator per image.

    Drawing in float32 and casting afterwards gives a seed the same noise whatever the model's
    dtype: torch's half-precision CPU sampler does not always draw the float32 numbers. None for
    pipelines that take no `latents` (they draw from the generators themselves).
    """
    import inspect

    import torch

    unet = getattr(pipe, "unet", None)
    if unet is None or "latents" not in inspect.signature(pipe.__call__).parameters:
        return None
    native_height, native_width = native_size(pipe)
    height = spec.height or native_height
    width = spec.width or native_width
    shape = (
        1,
        unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device=pipe.device, dtype=unet.dtype)  # (B, C, h, w)


def iter_generate(
    spec: GeneratorSpec,
    items: Sequence[tuple[str, int]],
    batch_size: int | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[str, int, Image]]:
    """Yield (prompt, seed, image) for every item, generated batch by batch.

    `should_cancel` is asked before each batch; when it answers True the iteration stops
    quietly, so the caller keeps what it received and records the cancellation itself.
    `on_batch(done, total)` runs after a batch's images have been yielded (and so handled).
    """
    pipe = get_pipeline(spec)
    if batch_size is None:
        batch_size = default_batch_size(pipe.device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    total = len(items)
    for start in range(0, total, batch_size):
        if should_cancel is not None and should_cancel():
            log.info("generation.cancelled", extra={"done": start, "total": total})
            return
        chunk = items[start : start + batch_size]
        images = generate_batch(pipe, spec, [p for p, _ in chunk], [s for _, s in chunk])
        for (prompt, seed), image in zip(chunk, images, strict=True):
            yield prompt, seed, image
        if on_batch is not None:
            on_batch(start + len(chunk), total)


# ---------------------------------------------------------------------------------------------
# Provenance and encoding


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(spec: GeneratorSpec, seed: int) -> dict[str, Any]:
    """What an image record stores so that the image can be regenerated and audited."""
    device = default_device()
    return {
        "base": spec.base,
        "adapter": spec.adapter,
        "seed": seed,
        "scheduler": spec.scheduler,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "height": spec.height,
        "width": spec.width,
        "dtype": str(resolve_dtype(spec.dtype, device)).removeprefix("torch."),
        "device": device.type,
        "diffusers": _version("diffusers"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
    }


def png_bytes(image: Image) -> bytes:
    """PNG encoding that depends only on the pixels (no metadata), so equal images hash equal."""
    from PIL import Image as PILImage

    if image.mode not in {"RGB", "RGBA", "L"}:
        image = image.convert("RGB")
    # A fresh image carries no info dict (ICC profile, text chunks, dpi) into the file.
    bare = PILImage.frombytes(image.mode, image.size, image.tobytes())
    buffer = io.BytesIO()
    bare.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
