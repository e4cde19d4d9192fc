"""Toy-model generation speed: batched vs one pipeline call per prompt, in one run.

Prints images/s for both at 32×32 and their ratio (goal: batched ≥ 3× per-prompt calls, and
≥ 20 images/s batched on a 2-core CPU). Usage: python benchmarks/generation.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()

    import torch

    from worker.generation import GeneratorSpec, generate_batch, get_pipeline
    from worker.toy.world import sample_prompts

    torch.set_num_threads(args.threads)
    spec = GeneratorSpec(
        base="toy", scheduler="ddim", steps=args.steps, guidance_scale=args.guidance
    )
    pipe = get_pipeline(spec)
    prompts = sample_prompts(args.images, seed=0)
    generate_batch(pipe, spec, prompts[:4], list(range(4)))  # warm-up

    start = time.perf_counter()
    for i in range(0, args.images, args.batch):
        chunk = prompts[i : i + args.batch]
        generate_batch(pipe, spec, chunk, list(range(i, i + len(chunk))))
    batched = args.images / (time.perf_counter() - start)

    single_n = max(20, args.images // 5)
    start = time.perf_counter()
    for i in range(single_n):
        generate_batch(pipe, spec, [prompts[i]], [i])
    single = single_n / (time.perf_counter() - start)

    print(f"toy model, 32x32, {args.steps} DDIM steps, guidance {args.guidance}")
    print(f"torch threads: {args.threads}")
    print(f"  batched (batch {args.batch}):     {batched:8.1f} images/s  ({args.images} images)")
    print(f"  one call per prompt:      {single:8.1f} images/s  ({single_n} images)")
    print(f"  ratio batched / single:   {batched / single:8.2f}x   (goal >= 3x)")
    print(f"  absolute batched:         {batched:8.1f} images/s  (goal >= 20)")


if __name__ == "__main__":
    main()
