"""Tiny random diffusers pipelines built from configs, for tests that must not touch a model hub.

Every builder saves with `save_pretrained` and returns the directory, so tests exercise the same
`from_pretrained(path)` code path that real models go through. Generation with these pipelines
at 32x32 and a few steps takes well under a second on one CPU core.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

# The text encoders' hidden size; the SD UNet cross-attends to it directly, the SDXL UNet to the
# concatenation of both encoders' hidden states.
TEXT_HIDDEN = 32
# SDXL's pooled text embedding size (text_encoder_2's projection).
SDXL_PROJECTION_DIM = 32
# SDXL "text_time" conditioning: 6 size/crop numbers, each embedded with this many channels.
SDXL_TIME_EMBED_DIM = 8
# Latent side = UNet sample_size; images are sample_size * 2 (the VAE has 2 blocks -> factor 2).
LATENT_SIZE = 16
# Image side that tests should request: latents of LATENT_SIZE after the VAE's factor-2 encoder.
IMAGE_SIZE = 2 * LATENT_SIZE
# Short context keeps the text encoder cheap; real CLIP uses 77.
MAX_TOKENS = 16

_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """Write a minimal CLIP BPE vocabulary (bytes, word-final bytes, a few merges)."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    # Word-final symbols carry the "</w>" suffix, as in CLIP's own merges.
    merges = ["a b", "c a", "t h", "h e</w>", "o g</w>", "q u", "r e", "i n"]
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def _tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as workdir:
        _write_tokenizer_files(Path(workdir))
        return CLIPTokenizer.from_pretrained(workdir, model_max_length=MAX_TOKENS)


def _text_config(tokenizer: CLIPTokenizer, **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
        **extra,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )


def _tiny_scheduler(prediction_type: str) -> DDIMScheduler:
    # SD-like noise schedule so every scheduler built from this config behaves like on SD.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd(path: Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a random SD 1.x-class `StableDiffusionPipeline` under `path` and return `path`."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl(path: Path, *, seed: int = 0) -> Path:
    """Save a random SDXL-class `StableDiffusionXLPipeline` under `path` and return `path`."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        # Both encoders' hidden states are concatenated along channels.
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # pooled text embedding + 6 embedded numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=SDXL_PROJECTION_DIM + 6 * SDXL_TIME_EMBED_DIM,
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer_2, projection_dim=SDXL_PROJECTION_DIM)
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_tiny_scheduler("epsilon"),
        image_encoder=None,
        feature_extractor=None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _pipeline_class(pipe_path: Path) -> type[StableDiffusionPipeline | StableDiffusionXLPipeline]:
    index = json.loads((Path(pipe_path) / "model_index.json").read_text(encoding="utf-8"))
    if index["_class_name"] == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def build_tiny_lora(pipe_path: Path, out_dir: Path, seed: int = 0, *, rank: int = 4) -> Path:
    """Save a random, non-zero UNet LoRA for the pipeline at `pipe_path` in diffusers format.

    Both LoRA matrices are random (a fresh adapter has B = 0, which would change nothing), so
    `pipe.load_lora_weights(out_dir)` visibly changes the pipeline's output.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    unet = UNet2DConditionModel.from_pretrained(Path(pipe_path) / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights=False,
            target_modules=_LORA_TARGETS,
        )
    )
    unet_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    _pipeline_class(pipe_path).save_lora_weights(
        out_dir, unet_lora_layers=unet_lora, safe_serialization=True
    )
    return out_dir
