"""Which DPO recipe moves the toy model? A sweep of β, lr, steps, LoRA rank and targets.

In-process and platform-free (no database, no HTTP), so a sweep point costs only its training
and its evaluation images:

1. a pool of training images: ``--prompts`` train prompts × ``--images`` images each, every
   image with its own seed (a hash of prompt and index), generated once and cached;
2. simulated votes: every pair of images of a prompt gets one vote by the preference, each
   decisive vote reversed with probability ``--flip-noise``; equal scores give no vote;
3. ``worker.dpo_train.train`` with the sweep point's recipe (latents encoded once per pool);
4. parent and child generate held-out prompts × held-out seeds (disjoint from the pool's);
   the preference judges child against parent, same prompt and seed, and a change counts only
   past the preference's just-noticeable tolerance (``Preference.tolerance``); ties count half.
   Fidelity is the colour + shape match rate of the images (``prompt_fidelity``).

Preferences: those of ``worker.toy.preferences`` (their scores and tolerances), among them
``prompted_position`` (the shape closer to the cell the prompt names wins; trained and judged on
prompts naming one).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_recipe.py --preference left \\
        --point targets=attention+conv,lr=1e-3,beta=2000,steps=300,rank=8 --out /tmp/sweep.jsonl

Each point appends one JSON line to ``--out``; ``--table`` prints the lines collected so far.
The measured sweep and the recipe it chose: the README and ``app.jobs.kinds.DPO_RECIPE``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.jobs.kinds import DPO_RECIPE  # noqa: E402
from worker.evaluation import paired_outcomes  # noqa: E402
from worker.toy.preferences import (  # noqa: E402
    NO_FOREGROUND,
    get_preference,
    in_named_cell,
    prompt_fidelity,
)
from worker.toy.world import (  # noqa: E402
    parse_prompt,
    sample_prompts,  # noqa: E402
)


def score(preference: str, image: np.ndarray, prompt: str) -> float:
    return get_preference(preference).score(image, prompt)


def image_seed(prompt: str, index: int, salt: str = "train") -> int:
    """A seed per (prompt, index): no two prompts share starting noises."""
    digest = hashlib.sha256(f"{salt}\x1f{prompt}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def generate(pipe: Any, prompts: list[str], seeds: list[int], batch: int = 64) -> np.ndarray:
    """uint8 images (N, H, W, 3), the toy evaluator's sampling (DDIM 10 steps, guidance 4)."""
    import torch

    out = []
    for start in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch]]
        images = pipe(
            prompts[start : start + batch],
            num_inference_steps=10,
            guidance_scale=4.0,
            generator=gens,
            output_type="np",
        ).images
        out.append(np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def prompt_sets(preference: str, n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    """Distinct train and held-out prompts (position-naming ones for prompted_position)."""
    mention = {"position": 1.0} if preference == "prompted_position" else None
    pool = list(dict.fromkeys(sample_prompts(4 * (n_train + n_test), seed=11, mention=mention)))
    if preference == "prompted_position":
        pool = [p for p in pool if parse_prompt(p).horizontal not in (None, "center")
                or parse_prompt(p).vertical not in (None, "middle")]  # fmt: skip
    if len(pool) < n_train + n_test:
        raise ValueError("not enough distinct prompts")
    return pool[:n_train], pool[n_train : n_train + n_test]


@dataclass(frozen=True)
class Point:
    """One sweep point: the recipe plus the data budget."""

    preference: str
    # The defaults are the job's default recipe: a point with no overrides is what a lead gets.
    targets: str = DPO_RECIPE["lora_targets"]
    lr: float = DPO_RECIPE["learning_rate"]
    beta: float = DPO_RECIPE["beta"]
    steps: int = DPO_RECIPE["steps"]
    rank: int = DPO_RECIPE["lora_rank"]
    batch: int = DPO_RECIPE["batch_size"]
    prompts: int = 120
    images: int = 5
    flip_noise: float = 0.1
    test_prompts: int = 48
    test_seeds: int = 3
    seed: int = 0


def _cache_dir() -> Path:
    path = Path(os.environ.get("DPO_RECIPE_CACHE", Path(tempfile.gettempdir()) / "dpo_recipe"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached_images(name: str, make: Any) -> np.ndarray:
    path = _cache_dir() / f"{name}.npy"
    if path.exists():
        return np.load(path)
    images = make()
    np.save(path, images)
    return images


def run_point(point: Point) -> dict[str, Any]:
    import torch

    from worker.dpo_train import CachedPairs, DPOConfig, encode_images, encode_prompts, train
    from worker.toy.model import load_pipeline

    torch.set_num_threads(1)
    weights = REPO / "worker" / "toy" / "weights" / "toy-v1"
    kind = "pos" if point.preference == "prompted_position" else "all"
    train_prompts, test_prompts = prompt_sets(point.preference, point.prompts, point.test_prompts)
    # Everything on one device (a GPU where there is one): the trainer would otherwise move only
    # the UNet there.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parent = load_pipeline(weights, device=device)
    tag = f"{kind}-{point.prompts}x{point.images}"
    flat_prompts = [p for p in train_prompts for _ in range(point.images)]
    flat_seeds = [image_seed(p, i) for p in train_prompts for i in range(point.images)]
    pool = _cached_images(f"pool-{tag}", lambda: generate(parent, flat_prompts, flat_seeds))
    test_flat = [p for p in test_prompts for _ in range(point.test_seeds)]
    test_seeds = [image_seed(p, i, "test") for p in test_prompts for i in range(point.test_seeds)]
    tag_test = f"{kind}-test-{point.test_prompts}x{point.test_seeds}"
    before = _cached_images(tag_test, lambda: generate(parent, test_flat, test_seeds))

    # votes: every pair of a prompt's images, one vote each, flip noise on decisive ones
    rng = np.random.default_rng(point.seed)
    scores = np.array(
        [score(point.preference, im, p) for im, p in zip(pool, flat_prompts, strict=True)]
    )
    winners, losers = [], []
    for j in range(point.prompts):
        base = j * point.images
        for a in range(point.images):
            for b in range(a + 1, point.images):
                sa, sb = scores[base + a], scores[base + b]
                if sa == sb:
                    continue
                w, lo = (base + a, base + b) if sa > sb else (base + b, base + a)
                if rng.random() < point.flip_noise:
                    w, lo = lo, w
                winners.append(w)
                losers.append(lo)

    t0, wall0 = time.process_time(), time.perf_counter()
    latents = encode_images(parent, [_pil(im) for im in pool], 32)  # (N, C, h, w)
    embeds, _ = encode_prompts(parent, [*train_prompts, ""])  # (P + 1, L, D)
    data = CachedPairs(
        latents_w=latents[winners],
        latents_l=latents[losers],
        prompt_index=torch.tensor([w // point.images for w in winners]),
        prompt_embeds=embeds[:-1],
        labels=torch.ones(len(winners)),
        empty_prompt_embeds=embeds[-1],
    )
    config = DPOConfig(
        beta=point.beta,
        learning_rate=point.lr,
        steps=point.steps,
        batch_size=point.batch,
        lora_rank=point.rank,
        lora_targets=point.targets,  # type: ignore[arg-type]
        checkpoint_every=point.steps,
        seed=point.seed,
    )
    child = load_pipeline(weights, device=device)
    with tempfile.TemporaryDirectory() as ckpt:
        result = train(child, data, config, Path(ckpt), device=device)
    train_cpu, train_wall = time.process_time() - t0, time.perf_counter() - wall0
    after = generate(child, test_flat, test_seeds)

    s_before = np.array(
        [score(point.preference, im, p) for im, p in zip(before, test_flat, strict=True)]
    )
    s_after = np.array(
        [score(point.preference, im, p) for im, p in zip(after, test_flat, strict=True)]
    )
    outcomes = paired_outcomes(s_after, s_before, tol=get_preference(point.preference).tolerance)
    low, high = cluster_bootstrap(outcomes, point.test_seeds)
    fid_before = prompt_fidelity(test_flat, list(before)).both
    fid_after = prompt_fidelity(test_flat, list(after)).both
    valid = (s_before > NO_FOREGROUND / 2) & (s_after > NO_FOREGROUND / 2)
    row: dict[str, Any] = {
        **asdict(point),
        "votes": len(winners),
        "win_rate": float(outcomes.mean()),
        "ci_low": low,
        "ci_high": high,
        "changed": float((outcomes != 0.5).mean()),
        "score_change": float((s_after - s_before)[valid].mean()),
        "fidelity_before": fid_before,
        "fidelity_after": fid_after,
        "final_loss": float(np.mean([m.loss for m in result.history[-20:]])),
        "final_implicit_acc": float(np.mean([m.implicit_acc for m in result.history[-20:]])),
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    if point.preference == "prompted_position":
        for name, images in (("in_cell_before", before), ("in_cell_after", after)):
            hits = [in_named_cell(im, p) for im, p in zip(images, test_flat, strict=True)]
            row[name] = float(np.mean(hits))
    return row


def _pil(image: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(image)


def cluster_bootstrap(
    outcomes: np.ndarray, per_prompt: int, draws: int = 2000
) -> tuple[float, float]:
    """95 % interval of the mean, resampling whole prompts (their seeds are not independent)."""
    by_prompt = outcomes.reshape(-1, per_prompt).mean(axis=1)  # (P,)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(by_prompt), (draws, len(by_prompt)))
    means = by_prompt[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def parse_point(preference: str, text: str) -> Point:
    names = {"targets": str, "lr": float, "beta": float, "steps": int, "rank": int,
             "batch": int, "prompts": int, "images": int, "seed": int}  # fmt: skip
    values: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"unknown point field {key!r}; known: {', '.join(names)}")
        values[key] = names[key](value)
    return Point(preference=preference, **values)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'preference':<18}{'targets':<15}{'rank':>4}{'β':>7}{'lr':>8}{'steps':>6}"
        f"{'votes':>6}{'win@tol':>9}{'95% CI':>14}{'changed':>8}{'fid Δ':>7}{'cpu s':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        fid = 100 * (r["fidelity_after"] - r["fidelity_before"])
        extra = (f"  in-cell {r['in_cell_before']:.2f}→{r['in_cell_after']:.2f}"
                 if "in_cell_after" in r else "")  # fmt: skip
        ci = f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(
            f"{r['preference']:<18}{r['targets']:<15}{r['rank']:>4}{r['beta']:>7g}{r['lr']:>8g}"
            f"{r['steps']:>6}{r['votes']:>6}{r['win_rate']:>9.3f}"
            f"{ci:>14}{r['changed']:>8.2f}{fid:>+7.1f}"
            f"{r['train_cpu_s']:>7.0f}{extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preference", default="left")
    parser.add_argument("--point", action="append", default=[], help="k=v,... (see Point)")
    parser.add_argument("--out", type=Path, default=Path("dpo_recipe.jsonl"))
    parser.add_argument("--table", action="store_true", help="print the collected rows")
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        print(format_table(rows))
        return 0
    for text in args.point or [""]:
        row = run_point(parse_point(args.preference, text))
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(format_table([row]).splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
