"""Diffusion-DPO training steps per second: cached latents/embeddings vs encoding every step.

Baselines, as the public Diffusion-DPO example scripts work inside their training loop:
- "decode+encode": decode the stored winner/loser image files (PNG bytes here; the scripts
  decode Pick-a-Pic's JPEG bytes in their dataset transform), preprocess them, VAE-encode them,
  tokenize and text-encode the prompts, then run the UNet step;
- "encode": the same from already decoded images (no file decoding).
Ours ("cached") reads the latents and embeddings that `encode_pairs` computed once. All three
trainers start from the same weights and draw the same pairs, noise and timesteps, in one
process, interleaved in blocks so that machine load hits them alike. All encode with the VAE
posterior mean (the scripts sample it), so the losses must agree step by step.

    .venv/bin/python benchmarks/dpo_step.py [--model toy|tiny-sd] [--steps 40] [--batch 8]

The model is the shipped toy model (worker/toy/weights/toy-v1) when present, else the toy
architecture with random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from diffusers import DiffusionPipeline
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.dpo_train import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    PairBatch,
    PairSampler,
    PreferencePair,
    encode_batch,
    encode_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
TOY_WEIGHTS = ROOT / "worker" / "toy" / "weights" / "toy-v1"


def load_pipes(model: str, workdir: Path) -> tuple[list[DiffusionPipeline], str]:
    """Three independent copies of the same pipeline, and a description of it."""
    if model == "toy" and TOY_WEIGHTS.is_dir():
        from worker.toy.model import load_pipeline

        return [load_pipeline(TOY_WEIGHTS) for _ in range(3)], f"toy model {TOY_WEIGHTS}"
    if model == "toy":
        from worker.toy.model import ToyModelConfig, build_components, save_pipeline

        path = save_pipeline(build_components(ToyModelConfig()), workdir / "toy", half=False)
        label = "toy architecture, random weights"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_pipelines import build_tiny_sd

        path = build_tiny_sd(workdir / "tiny-sd")
        label = "tiny random SD pipeline"
    pipes = [DiffusionPipeline.from_pretrained(path) for _ in range(3)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes, label


def make_images(n: int, side: int, seed: int) -> tuple[list[str], list[bytes], list[bytes]]:
    """Toy-world prompts and rendered winner/loser images as PNG files' bytes."""
    from worker.toy import world

    rng = np.random.default_rng(seed)
    prompts = world.sample_prompts(max(1, n // 2), seed=seed)

    def png(prompt: str) -> bytes:
        scene = world.resolve(world.parse_prompt(prompt), rng)
        buffer = io.BytesIO()
        Image.fromarray(world.render_scene(scene, side)).save(buffer, format="PNG")
        return buffer.getvalue()

    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return chosen, [png(p) for p in chosen], [png(p) for p in chosen]


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def baseline_batch(pipe: DiffusionPipeline, pairs: list[PreferencePair]) -> PairBatch:
    """Encode images and prompts on the fly, as the example scripts do."""
    latents_w, latents_l, embeds, pooled, time_w, time_l = encode_batch(pipe, pairs)
    return PairBatch(
        latents_w=latents_w,
        latents_l=latents_l,
        prompt_embeds=embeds,
        labels=torch.tensor([p.label for p in pairs]),
        pooled_embeds=pooled,
        time_ids_w=time_w,
        time_ids_l=time_l,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toy", "tiny-sd"], default="toy")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # prompts longer than the tiny tokenizer's limit

    with tempfile.TemporaryDirectory() as workdir:
        (pipe_cached, pipe_base, pipe_decode), label = load_pipes(args.model, Path(workdir))
    side = int(pipe_cached.unet.config.sample_size * pipe_cached.vae_scale_factor)
    prompts, png_w, png_l = make_images(args.pairs, side, seed=0)
    config = DPOConfig(
        beta=5000.0, batch_size=args.batch, lora_rank=args.lora_rank, learning_rate=1e-4
    )

    start = time.perf_counter()
    pairs = [
        PreferencePair(prompt, decode(winner), decode(loser))
        for prompt, winner, loser in zip(prompts, png_w, png_l, strict=True)
    ]
    data = encode_pairs(pipe_cached, pairs)
    cache_s = time.perf_counter() - start

    pipes = {"cached": pipe_cached, "encode": pipe_base, "decode+encode": pipe_decode}
    trainers = {name: DPOTrainer(pipe, config, device="cpu") for name, pipe in pipes.items()}
    samplers = {name: PairSampler(range(len(pairs)), 0, 1, 0) for name in trainers}

    def step(name: str, index: int) -> float:
        idx = samplers[name].next_indices(args.batch)
        if name == "cached":
            batch = data.batch(idx, "cpu")
        elif name == "encode":
            batch = baseline_batch(pipes[name], [pairs[i] for i in idx])
        else:
            fresh = [PreferencePair(prompts[i], decode(png_w[i]), decode(png_l[i])) for i in idx]
            batch = baseline_batch(pipes[name], fresh)
        return trainers[name].train_step([batch], index).loss

    losses: dict[str, list[float]] = {name: [] for name in trainers}
    seconds = {name: 0.0 for name in trainers}
    for name in trainers:  # warm-up steps (first-call allocations), also compared
        losses[name].append(step(name, 1))
    done = 0
    while done < args.steps:
        block = min(args.block, args.steps - done)
        for name in trainers:
            start = time.perf_counter()
            for i in range(block):
                losses[name].append(step(name, done + i + 2))
            seconds[name] += time.perf_counter() - start
        done += block

    rates = {name: args.steps / seconds[name] for name in trainers}
    # The encoders' own cost, for reading the ratios below.
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = samplers["encode"].next_indices(args.batch)
        baseline_batch(pipe_base, [pairs[j] for j in idx])
    encode_s = (time.perf_counter() - start) / args.steps
    cached_losses = np.array(losses["cached"])
    diffs = max(np.abs(np.array(v) - cached_losses).max() for v in losses.values())
    print(f"model: {label}; unet {sum(p.numel() for p in pipe_base.unet.parameters()):,} params")
    print(
        f"batch {args.batch} pairs, LoRA rank {args.lora_rank}, {args.steps} timed steps each, "
        f"{args.threads} thread(s)"
    )
    print(f"one-off decode + cache of {len(pairs)} pairs: {cache_s:.2f} s")
    print("loss at step 0: " + ", ".join(f"{k} {v[0]:.7f}" for k, v in losses.items()))
    print(f"max |loss difference| vs cached over {len(cached_losses)} steps: {diffs:.3g}")
    print(
        f"per step: cached step {1e3 / rates['cached']:.1f} ms, VAE + text encoding alone "
        f"{encode_s * 1e3:.1f} ms (timed separately)"
    )
    for name, rate in rates.items():
        versus = "" if name == "cached" else f"   cached is {rates['cached'] / rate:.2f}x faster"
        print(f"{name:>14}: {rate:6.2f} steps/s{versus}")
    print("goal: cached >= 1.5x the decode+encode baseline")


if __name__ == "__main__":
    main()
