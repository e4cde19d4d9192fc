"""Real-size throughput: an SD 1.5-architecture pipeline (random weights) through prefloop's code.

Nothing can be downloaded here, so the pipeline is built from SD 1.5's published configs (UNet
860 M parameters, 4-block VAE, a CLIP ViT-L/14-sized text encoder) with random weights and saved
with `save_pretrained`; speed does not depend on the weights. Then, in one process:

1. generation: `worker.generation` loads it by path exactly as a registered model version
   (`GeneratorSpec`, `get_pipeline`, `generate_batch`), 512×512, DDIM, classifier-free guidance;
   images/s at several batch sizes;
2. Diffusion-DPO: `worker.dpo_train` with the job's default parameters (LoRA targets, rank, β)
   on cached latents (`encode_pairs`), pairs/s at 512×512 (64×64 latents).

    python benchmarks/sd15.py --device cuda --out /tmp/sd15.json
    python benchmarks/sd15.py --device cpu --gen-batches 1 --gen-steps 2 --dpo-steps 2  # smoke

On a CPU this is minutes per image; it is meant for a machine with an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# SD 1.5's published component configs (the v1-5 repository's config.json files), trimmed to the
# fields that differ from the diffusers / transformers defaults.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def build_sd15(directory: Path) -> Path:
    """Save an SD 1.5-architecture StableDiffusionPipeline with random weights (fp16 files)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_pipelines import _tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = _tiny_tokenizer()
    tokenizer.model_max_length = 77
    text_config = CLIPTextConfig(vocab_size=max(len(tokenizer), 1000), **TEXT_CONFIG)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET_CONFIG),
        vae=AutoencoderKL(**VAE_CONFIG),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(directory)
    return directory


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generation(
    path: Path, device: str, batches: list[int], steps: int, repeats: int
) -> list[dict[str, float]]:
    from worker.generation import GeneratorSpec, generate_batch, get_pipeline

    spec = GeneratorSpec(
        base=str(path), scheduler="ddim", steps=steps, guidance_scale=7.5, height=512, width=512
    )
    pipe = get_pipeline(spec)
    rows = []
    for batch in batches:
        prompts = [f"a photo of a red circle number {i}" for i in range(batch)]
        generate_batch(pipe, spec, prompts[:1], [0])  # warm-up: kernels, allocator
        _sync(device)
        start = time.perf_counter()
        for r in range(repeats):
            generate_batch(pipe, spec, prompts, [r * batch + i for i in range(batch)])
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            {"batch": batch, "images_per_s": batch * repeats / seconds, "seconds": seconds}
        )
        print(f"generate batch {batch:3d}: {rows[-1]['images_per_s']:7.2f} images/s", flush=True)
    return rows


def bench_dpo(
    path: Path, device: str, pairs_n: int, batch: int, steps: int, mixed_precision: str
) -> dict[str, Any]:
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from app.jobs.kinds import TrainDPOParams
    from worker.dpo_train import DPOTrainer, PairSampler, PreferencePair, encode_pairs

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))

    pairs = [PreferencePair(f"prompt {i}", image(), image()) for i in range(pairs_n)]
    start = time.perf_counter()
    data = encode_pairs(pipe, pairs, resolution=512)
    encode_s = time.perf_counter() - start
    # The job's defaults (only model_id given), at this batch size and precision.
    params = TrainDPOParams(model_id=0, batch_size=batch, mixed_precision=mixed_precision)
    pipe.unet.to(torch.float32)  # trainable weights in fp32; autocast does the half precision
    trainer = DPOTrainer(pipe, params, device=device)
    sampler = PairSampler(range(len(pairs)), 0, 1, 0)
    trainer.train_step([data.batch(sampler.next_indices(batch), device)], 1)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for step in range(steps):
        trainer.train_step([data.batch(sampler.next_indices(batch), device)], step + 2)
    _sync(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    result = {
        "batch_pairs": batch,
        "steps": steps,
        "steps_per_s": steps / seconds,
        "pairs_per_s": steps * batch / seconds,
        "encode_pairs_s": encode_s,
        "mixed_precision": mixed_precision,
        "lora_rank": params.lora_rank,
        "lora_targets": getattr(params, "lora_targets", "attention"),
        "peak_gib": memory,
    }
    print(
        f"DPO ({result['lora_targets']}, rank {params.lora_rank}, {mixed_precision}): "
        f"{result['steps_per_s']:.2f} steps/s = {result['pairs_per_s']:.1f} pairs/s "
        f"at batch {batch}; peak {memory or 0:.1f} GiB",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gen-batches", default="1,8,32")
    parser.add_argument("--gen-steps", type=int, default=25)
    parser.add_argument("--gen-repeats", type=int, default=2)
    parser.add_argument("--dpo-pairs", type=int, default=64)
    parser.add_argument("--dpo-batch", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_sd15(Path(tmp) / "sd15-random")
        os.environ.setdefault("PREFLOOP_MODEL_ROOTS", str(tmp))
        batches = [int(b) for b in args.gen_batches.split(",")]
        generation = bench_generation(
            path, args.device, batches, args.gen_steps, args.gen_repeats
        )
        dpo = bench_dpo(
            path, args.device, args.dpo_pairs, args.dpo_batch, args.dpo_steps, args.mixed_precision
        )
    report = {
        "device": device_name,
        "generation": {"steps": args.gen_steps, "size": 512, "rows": generation},
        "dpo": dpo,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
