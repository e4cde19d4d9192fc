"""The toy text-to-image model: a tiny Stable Diffusion pipeline sized for the toy world.

Every component is an ordinary diffusers / transformers class, so the saved directory loads with
plain `StableDiffusionPipeline.from_pretrained(path)` and runs the same code paths as a real
SD 1.x checkpoint, only small enough to generate 32×32 images quickly on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from worker.toy.world import vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy pipeline; comments say why each number is what it is."""

    image_size: int = 32  # the toy world's native resolution
    # VAE: three blocks -> two downsamplings -> 8×8 latents, enough to place a shape on a 3×3
    # grid; the narrow first block keeps decoding 32×32 images cheap.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    # UNet on 8×8 latents: two cross-attention levels (8×8, 4×4); wide enough to tell four
    # shapes apart, small enough for hundreds of denoiser evaluations per second on a CPU.
    unet_channels: tuple[int, ...] = (48, 96)
    unet_heads: int = 8
    norm_groups: int = 16
    # Text encoder: the grammar has ~40 words, so a 2-layer, 64-wide CLIP is plenty.
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 20  # longest prompt is 13 words + BOS/EOS

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def _byte_alphabet() -> list[str]:
    """CLIP's byte-level alphabet (printable stand-ins for all 256 bytes), in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none is left."""
    symbols = list(symbols)
    while len(symbols) > 1:
        adjacent = zip(symbols[:-1], symbols[1:], strict=True)
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(adjacent)]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP BPE vocabulary and merges in which every grammar word is one token.

    Merges only apply by rank, so one word's merges can split another ("la" from "large" inside
    "black"): each word whose pieces do not join yet gets merges joining its current pieces,
    appended at the lowest rank, until every word is whole. The bytes stay in the vocabulary
    so an unknown word still tokenizes, as pieces.
    """
    alphabet = _byte_alphabet()
    merges: list[tuple[str, str]] = []
    for _ in range(len(words) + 1):
        ranks = {m: r for r, m in enumerate(merges)}
        broken = False
        for word in words:
            pieces = bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(pieces) == 1:
                continue
            broken = True
            current = pieces[0]
            for piece in pieces[1:]:
                if (current, piece) not in ranks:
                    ranks[(current, piece)] = len(merges)
                    merges.append((current, piece))
                current += piece
        if not broken:
            break
    else:
        raise RuntimeError("could not build whole-word merges")
    pieces_vocab = [a + b for a, b in merges]
    tokens = alphabet + [c + "</w>" for c in alphabet] + pieces_vocab + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for a, b in merges]


def build_tokenizer(config: ToyModelConfig) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is built from the toy grammar."""
    vocab, merges = tokenizer_files(vocabulary())
    with tempfile.TemporaryDirectory() as workdir:
        Path(workdir, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(workdir, "merges.txt").write_text(
            "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(workdir, model_max_length=config.max_tokens)


def build_text_encoder(config: ToyModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small randomly initialised CLIP text encoder."""
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        layer_norm_eps=1e-5,
    )
    return CLIPTextModel(text_config)


def build_vae(config: ToyModelConfig) -> AutoencoderKL:
    """A small randomly initialised KL autoencoder (32×32 RGB <-> 8×8×4 latents)."""
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.image_size,
    )


def build_unet(config: ToyModelConfig) -> UNet2DConditionModel:
    """A small randomly initialised text-conditioned UNet on the VAE's latents."""
    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        norm_num_groups=config.norm_groups,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.unet_heads,
    )


def build_scheduler() -> DDIMScheduler:
    """SD 1.x's noise schedule (scaled-linear betas, epsilon prediction), sampled with DDIM."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


@dataclass
class ToyComponents:
    """The trainable parts of a toy pipeline plus its tokenizer and scheduler."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler


def build_components(config: ToyModelConfig, seed: int = 0) -> ToyComponents:
    """Fresh random components; the same seed gives the same weights."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config)
    return ToyComponents(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(config, tokenizer),
        vae=build_vae(config),
        unet=build_unet(config),
        scheduler=build_scheduler(),
    )


def assemble_pipeline(parts: ToyComponents) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without safety checker around the components."""
    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


# Components stored in fp16 on disk. diffusers loads them back in fp32 unless told otherwise;
# transformers would keep a half text encoder in fp16, so the (tiny) text encoder stays fp32.
HALF_COMPONENTS: tuple[str, ...] = ("unet", "vae")


def _halve_safetensors(directory: Path) -> None:
    """Rewrite every floating-point tensor of the safetensors files in `directory` as fp16."""
    for file in directory.glob("*.safetensors"):
        tensors = load_file(file)
        halved = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(halved, file, metadata={"format": "pt"})


def save_pipeline(parts: ToyComponents, out: Path, *, half: bool = True) -> Path:
    """Save as a diffusers directory (safetensors); UNet and VAE in fp16 when `half`."""
    out = Path(out)
    assemble_pipeline(parts).save_pretrained(out, safe_serialization=True)
    if half:
        for name in HALF_COMPONENTS:
            _halve_safetensors(out / name)
    return out


def load_pipeline(path: Path | str, device: str = "cpu") -> StableDiffusionPipeline:
    """Load a toy pipeline in fp32 (the shipped weights are stored in fp16)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path),
        dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
