"""LoRA adapters on diffusion UNets: which layers they adapt, and how they are saved and loaded.

Target sets (``LORA_TARGETS``), resolved to exact module names of a given UNet:

- ``attention``: the attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), the
  usual choice for SD fine-tunes. On the toy UNet this cannot move objects: its attention sees
  no position signal (no positional embedding), so a spatial preference ("left") is unlearnable
  (measured: win-rate 0.49–0.53 where conv LoRA reaches 0.78–0.79).
- ``attention+conv``: plus every convolution of the resnet blocks, the down/up-samplers and the
  UNet's input/output convolutions — the layers that carry spatial structure.
- ``all``: every ``Linear`` and ``Conv2d`` of the UNet (transformer in/out projections,
  feed-forward layers, time embeddings too).

Saving writes the PEFT state dict as it is (``lora_A``/``lora_B`` keys under ``unet.``) with
``save_lora_weights``; diffusers' ``load_lora_weights`` reads that format directly. Converting
it first (``convert_state_dict_to_diffusers``) renames only some keys (attention projections to
``lora.down``/``lora.up``, convolutions left as ``lora_A``/``lora_B``); faced with a mix,
diffusers keeps one format and silently drops the rest — the attention LoRA of an
``attention+conv`` adapter vanished on reload. :func:`load_lora` is the one loader: generation
and the tests go through it, and it is plain ``pipe.load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from app.core.storage import atomic_dir
from app.jobs.kinds import LoraTargets

if TYPE_CHECKING:  # torch is imported lazily
    from torch import nn

LORA_TARGETS: tuple[str, ...] = get_args(LoraTargets)
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# Leaf names of the attention projections in diffusers' `Attention` (SD 1.x/2.x, SDXL, toy).
_ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0")


def _is_attention(name: str) -> bool:
    return any(name == leaf or name.endswith("." + leaf) for leaf in _ATTENTION_LEAVES)


def _is_spatial_conv(name: str) -> bool:
    """A convolution of a resnet block, a resampler, or the UNet's input/output convolution."""
    if name in ("conv_in", "conv_out"):
        return True
    parts = name.split(".")
    return any(p in ("resnets", "downsamplers", "upsamplers") for p in parts)


def _adapts(name: str, is_conv: bool, targets: str) -> bool:
    """Whether a Linear (or, if ``is_conv``, Conv2d) module called ``name`` is in ``targets``."""
    if targets == "all":
        return True
    if not is_conv and _is_attention(name):
        return True
    return targets == "attention+conv" and is_conv and _is_spatial_conv(name)


def lora_target_modules(unet: nn.Module, targets: LoraTargets | str) -> list[str]:
    """Exact names of the modules of ``unet`` that a LoRA on ``targets`` adapts, in module order.

    Works on any UNet built from diffusers blocks (``UNet2DConditionModel`` for SD 1.x/2.x, SDXL
    and the toy model): attention projections are recognised by name, the rest by type. Exact
    names rather than suffixes, so a target set never silently catches more than it says.
    """
    from torch import nn

    if targets not in LORA_TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; known: {', '.join(LORA_TARGETS)}")
    chosen = [
        name
        for name, module in unet.named_modules()
        if name
        and isinstance(module, nn.Linear | nn.Conv2d)
        and _adapts(name, isinstance(module, nn.Conv2d), targets)
    ]
    if not chosen:
        raise ValueError(f"{type(unet).__name__} has no modules for LoRA targets {targets!r}")
    return chosen


def freeze_plain_unet(unet: nn.Module) -> None:
    """Freeze every weight of a UNet about to be trained; the trainer then unfreezes what it
    trains (a fresh adapter, or the whole UNet). One that already carries an adapter is refused:
    its adapter would be trained, or stacked under a second one."""
    if getattr(unet, "peft_config", None):
        raise ValueError("the UNet already carries an adapter; load a fresh pipeline")
    unet.requires_grad_(False)


def add_lora(unet: nn.Module, targets: LoraTargets | str, rank: int) -> list[str]:
    """Add a fresh trainable adapter to ``unet``; returns the adapted module names.

    ``lora_alpha`` equals the rank (scale 1), so the saved adapter loads in plain diffusers at
    its trained strength; B starts at zero, so the adapted UNet equals the base at step 0.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
    modules = lora_target_modules(unet, targets)
    # diffusers' PEFT mixin method; nn.Module's attribute lookup types it as a Tensor | Module.
    unet.add_adapter(  # type: ignore[operator]
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules)
    )
    return modules


def lora_state_dict(unet: nn.Module) -> dict[str, Any]:
    """The adapter's weights in PEFT format (``<module>.lora_A.weight``), fp32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def _is_sdxl(unet: nn.Module) -> bool:
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def save_lora(unet: nn.Module, out_dir: Path, *, sdxl: bool | None = None) -> Path:
    """Write the UNet's adapter so that :func:`load_lora` (``load_lora_weights``) restores it.

    Written to a temporary directory, then renamed: a reader never sees half an adapter.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    sdxl = _is_sdxl(unet) if sdxl is None else sdxl
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    with atomic_dir(out_dir) as tmp:
        pipeline_cls.save_lora_weights(
            tmp, unet_lora_layers=lora_state_dict(unet), safe_serialization=True
        )
    return out_dir


def load_lora(pipe: Any, adapter: str | Path, *, local_files_only: bool = False) -> None:
    """Load an adapter written by :func:`save_lora` (or any diffusers LoRA) into ``pipe``."""
    pipe.load_lora_weights(str(adapter), local_files_only=local_files_only)


__all__ = [
    "LORA_TARGETS",
    "LORA_WEIGHTS_NAME",
    "LoraTargets",
    "add_lora",
    "load_lora",
    "lora_state_dict",
    "lora_target_modules",
    "save_lora",
]
