"""Online RL from the learned reward (GRPO with a KL anchor): votes → reward model → RL child.

For each simulated preference (the built-ins of `worker.toy.preferences`, plus
`prompted_position`: the image whose shape sits nearer the cell its prompt names wins):
1. the toy model generates training images on train prompts, one seed per (prompt, image) drawn
   from a hash of both (no seed shared across prompts);
2. simulated annotators vote on pairs within a prompt by the preference, each decisive vote
   reversed with probability `flip_noise`, ties dropped, at most `votes` votes;
3. two reward models (toyconv) are trained on those votes with different seeds and validation
   splits: the first is the RL reward, the second the guard that watches for reward hacking;
4. `worker.rl_train.train` fine-tunes a LoRA (attention + conv) on the train prompts with the
   first reward plus, as the job composes it, the toy recogniser's fidelity term
   (`fidelity_weight`, `--rl fidelity_weight=0` leaves it out), probing held-out validation
   prompts with the guard and the toy fidelity reader;
5. the adapter is saved, reloaded through the generator (`worker.generation`, as the platform's
   generate/evaluate jobs load a child) and judged against the parent on held-out test prompts
   and held-out seeds by the preference itself.

Measured: child-vs-parent win-rate at the preference's just-noticeable tolerance (exact ties and
changes below it count half) with a prompt-clustered bootstrap 95 % interval, mean score change,
colour+shape fidelity before/after, the prompted-position share (shape in the named cell, both
axes) before/after, the reward model's accuracy on noise-free pairs of held-out test images,
votes, CPU (or device) minutes. Written: JSON (`--out`) and a reward-vs-KL curve PNG (`--plot`).

`--reward oracle` replaces the learned reward by the preference itself (an ablation: what RL
reaches when the reward sees what the annotator sees); it gives no gradients, so those runs
train by policy gradients (`objective=policy_gradient`).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_loop.py --preference brighter --quick
    .venv/bin/python benchmarks/rl_loop.py --preference all --out /tmp/rl.json --plot /tmp/rl.png

This runs the platform's worker code in one process (no web server, database or queue), so it
also runs on a machine with an accelerator and nothing else; the job path itself is tested in
tests/e2e/test_rl_job.py.

With the spatial reward model, on the 2 shared CPU cores at nice 19 (`--quick`: 600 votes,
300 reward-model steps; RL every step, one update per batch, lr 3e-3, 78 steps in 48 wall
minutes): the reward models were at chance on prompted position (test 0.49), so the probe
reward did not rise and probe fidelity fell 3.2 points; the parent puts 0.125 of corner-prompt
images in the named cell.

Measured on one H200 with today's defaults and the spatial reward model (full size: 1 800 votes,
10 % flipped, 120 train prompts × 6 images, 80 held-out test prompts × 3 held-out seeds; twelve
runs sharing the GPU, each RL phase bounded at about 5 minutes; `benchmarks/device_run.sh`,
results in benchmarks/results/2026-11-27-h200/ and the README): "darker" 100 % and "brighter"
99.4 % at tolerance but 2.6–3.1 points of fidelity lost; every spatial and prompt-conditional
preference 47–53 %, although the reward model orders the parent's held-out images by position
(left 0.99, centered 0.90, prompted position 0.83); with the preference itself as the reward
"left" 57.5 % in 112 steps, prompted position 49.8 % (LoRA, 107 steps) and 51.7 % (whole UNet,
134 steps), named cell 0.085 → 0.085.
On the 2 shared CPU cores (`--quick --rl-minutes 10`, load average 15, an earlier round): 12 RL
steps of 4 × 8 images, "brighter" 48.3 % [41.7, 55.0] at tolerance (mean score +0.026), 2.4 CPU
minutes in 20.5 wall minutes: 12 steps do not reach the goal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.alignment_loop import key_value, within_bound  # noqa: E402
from worker.evaluation import compare, share  # noqa: E402
from worker.toy.preferences import (  # noqa: E402
    NO_FOREGROUND,
    PREFERENCES,
    Preference,
    in_named_cell,
    prompt_fidelity,
    vote_from_scores,
)
from worker.toy.world import parse_prompt, sample_prompts  # noqa: E402

GOAL_WIN_RATE = 0.80
GOAL_MAX_VOTES = 2000
GOAL_POSITION_SHARE = 0.70
GOAL_MINUTES = 45.0
GOAL_MAX_FIDELITY_DROP = 0.02


def cell_shares(
    prompts: Sequence[str], images: Sequence[np.ndarray], seed: int = 0
) -> dict[str, dict[str, Any] | None]:
    """Share of images whose shape sits in the cell the prompt names (prompt-clustered CI):
    "named" on every axis the prompt names, over prompts naming a position; "both" over the
    prompts naming both axes (a corner: chance 1/9) — the figure the goals are stated in."""
    flags: list[bool] = []
    clusters: list[str] = []
    both_flags: list[bool] = []
    both_clusters: list[str] = []
    for prompt, image in zip(prompts, images, strict=True):
        inside = in_named_cell(image, prompt)
        if inside is None:
            continue
        flags.append(inside)
        clusters.append(prompt)
        spec = parse_prompt(prompt)
        if spec.horizontal is not None and spec.vertical is not None:
            both_flags.append(inside)
            both_clusters.append(prompt)
    return {
        "named": share(flags, clusters, seed=seed).as_dict() if flags else None,
        "both": share(both_flags, both_clusters, seed=seed).as_dict() if both_flags else None,
    }


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RLLoopConfig:
    preference: str
    votes: int = 2000
    flip_noise: float = 0.1
    train_prompts: int = 120
    images_per_prompt: int = 6
    pairs_per_prompt: int = 15
    val_prompts: int = 16  # the guard's probe prompts
    test_prompts: int = 80
    eval_seeds: tuple[int, ...] = (1000, 1001, 1002)
    steps: int = 10  # sampling steps of the toy model (its generation setting)
    guidance_scale: float = 4.0
    reward_steps: int = 600
    reward: str = "learned"  # or "oracle"
    rl_minutes: float | None = None  # stop RL after this long and judge what it reached
    rl: dict[str, Any] = field(default_factory=dict)  # RLConfig overrides
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preference not in PREFERENCES:
            raise ValueError(f"unknown preference {self.preference!r}; known: {list(PREFERENCES)}")
        if not 1 <= self.votes <= GOAL_MAX_VOTES:
            raise ValueError(f"votes must be in [1, {GOAL_MAX_VOTES}]")


def quick_config(preference: str, **overrides: Any) -> RLLoopConfig:
    """A reduced run for two shared CPU cores."""
    base: dict[str, Any] = {
        "votes": 800,
        "train_prompts": 60,
        "images_per_prompt": 5,
        "pairs_per_prompt": 10,
        "val_prompts": 8,
        "test_prompts": 30,
        "eval_seeds": (1000, 1001),
        "reward_steps": 300,
        "rl": {"steps": 24, "prompts_per_step": 4, "group_size": 8, "eval_every": 8},
    }
    base.update(overrides)
    return RLLoopConfig(preference=preference, **base)


def image_seed(prompt: str, index: int) -> int:
    """A training seed per (prompt, image): no two prompts share their starting noises."""
    digest = hashlib.sha256(f"{prompt}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def split_prompts(config: RLLoopConfig) -> tuple[list[str], list[str], list[str]]:
    """Train, validation (probe) and test prompts; no prompt in two of them."""
    mention = PREFERENCES[config.preference].mention or None
    pool = sample_prompts(
        8 * (config.train_prompts + config.val_prompts + config.test_prompts),
        seed=config.seed,
        mention=mention,
    )
    distinct = list(dict.fromkeys(pool))
    a = config.train_prompts
    b = a + config.val_prompts
    c = b + config.test_prompts
    if len(distinct) < c:
        raise ValueError(f"the grammar gave only {len(distinct)} distinct prompts, {c} needed")
    return distinct[:a], distinct[a:b], distinct[b:c]


# ---------------------------------------------------------------------------------------------
# Measurement


def reward_accuracy(model: Any, prompts: Sequence[str], images: Sequence[np.ndarray],
                    pref: Preference) -> float:  # fmt: skip
    """Share of perceptibly different same-prompt pairs the reward model orders like the
    preference."""
    from worker.reward_model import score_images

    tol = pref.tolerance
    predicted = score_images(model, list(prompts), list(images))  # (N,)
    truth = np.array([pref.score(im, p) for p, im in zip(prompts, images, strict=True)])
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    right = total = 0
    for rows in by_prompt.values():
        for x in range(len(rows)):
            for y in range(x + 1, len(rows)):
                i, j = rows[x], rows[y]
                if abs(truth[i] - truth[j]) <= tol:
                    continue
                total += 1
                right += (predicted[i] > predicted[j]) == (truth[i] > truth[j])
    return right / total if total else float("nan")


# ---------------------------------------------------------------------------------------------
# The loop


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._start
        self._start = now


def _generate(spec: Any, pipe: Any, prompts: Sequence[str], seeds: Sequence[int],
              batch: int = 64) -> list[np.ndarray]:  # fmt: skip
    from worker.generation import generate_batch

    out: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        images = generate_batch(pipe, spec, prompts[start : start + batch],
                                seeds[start : start + batch])  # fmt: skip
        out.extend(np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images)
    return out


def simulate_votes(
    config: RLLoopConfig, train_prompts: Sequence[str], spec: Any, pipe: Any, timer: Timer
) -> tuple[list[Any], int, int, int]:
    """Steps 1–2: the parent's training images and the simulated annotators' votes on pairs
    within a prompt. Returns the decisive votes as reward-model records, the votes cast, the
    ties and the flipped votes."""
    from worker.reward_model import PreferenceRecord

    pref = PREFERENCES[config.preference]
    items = [(p, image_seed(p, i)) for p in train_prompts for i in range(config.images_per_prompt)]
    images = _generate(spec, pipe, [p for p, _ in items], [s for _, s in items])
    timer.lap("generate")
    rng = np.random.default_rng(config.seed)
    candidates = []
    n = config.images_per_prompt
    for k in range(len(train_prompts)):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        for pick in rng.permutation(len(pairs))[: config.pairs_per_prompt]:
            i, j = pairs[int(pick)]
            candidates.append((k * n + i, k * n + j))
    rng.shuffle(candidates)
    records, ties, flipped = [], 0, 0
    for a, b in candidates[: config.votes]:
        prompt = items[a][0]
        sa, sb = pref.score(images[a], prompt), pref.score(images[b], prompt)
        choice = vote_from_scores(sa, sb, rng, config.flip_noise)
        honest = vote_from_scores(sa, sb, rng)
        if choice == "tie":
            ties += 1
            continue
        flipped += choice != honest
        records.append(PreferenceRecord(prompt, images[a], images[b],
                                        1.0 if choice == "left" else 0.0))  # fmt: skip
    timer.lap("vote")
    return records, min(config.votes, len(candidates)), ties, flipped


def run_loop(
    config: RLLoopConfig,
    work: Path,
    log: Callable[[str], None] = print,
    until: float | None = None,
) -> dict:
    """One preference's loop; `until` (a `time.time()` instant) also ends the RL phase, so that a
    run bounded from outside still judges what it reached."""
    from worker.dpo_train import save_lora
    from worker.generation import GeneratorSpec, load_pipeline
    from worker.reward_model import (
        PreferenceDataset,
        RewardTrainConfig,
        train_reward_model,
    )
    from worker.rl_train import (
        ProbeSet,
        RewardModelScorer,
        RLConfig,
        ToyFidelityScorer,
        ToyRecogniserScorer,
        WeightedSum,
        to_uint8,
        train,
    )

    name = config.preference
    pref = PREFERENCES[name]
    tol = pref.tolerance

    def score(prompt: str, image: np.ndarray) -> float:
        return pref.score(image, prompt)

    timer = Timer()
    cpu_start = time.process_time()
    load_start = os.getloadavg()[0]
    train_prompts, val_prompts, test_prompts = split_prompts(config)
    spec = GeneratorSpec(base="toy", scheduler="ddim", steps=config.steps,
                         guidance_scale=config.guidance_scale)  # fmt: skip
    parent_pipe = load_pipeline(spec)

    def prepare() -> dict[str, Any]:
        """Votes, the two reward models and the parent's test images (cacheable: no RL)."""
        records, votes, ties, flipped = simulate_votes(config, train_prompts, spec, parent_pipe,
                                                       timer)  # fmt: skip

        # 3. reward model and guard
        dataset = PreferenceDataset(records)
        reward_models = []
        for offset in (0, 1):
            trained = train_reward_model(
                dataset,
                RewardTrainConfig(steps=config.reward_steps, seed=config.seed + offset),
                device="cuda" if torch.cuda.is_available() else "cpu",
            )
            reward_models.append(trained)
        timer.lap("train_reward")

        # Parent images on held-out test prompts and seeds (also the reward models' test set).
        test_items = [(p, s) for p in test_prompts for s in config.eval_seeds]
        test_p = [p for p, _ in test_items]
        parent_images = _generate(spec, parent_pipe, test_p, [s for _, s in test_items])
        rm_test_acc = [
            reward_accuracy(t.model.eval(), test_p, parent_images, pref) for t in reward_models
        ]
        timer.lap("evaluate_parent")

        return {
            "votes": votes, "ties": ties, "flipped": flipped, "reward_models": reward_models,
            "parent_images": parent_images, "rm_test_acc": rm_test_acc,
            "seconds": dict(timer.seconds), "cpu_seconds": time.process_time() - cpu_start,
        }  # fmt: skip

    # Exploring RL settings re-runs only RL: RL_LOOP_CACHE keeps the phases before it, and the
    # figures still count their CPU time, measured when they ran.
    cache_root = os.environ.get("RL_LOOP_CACHE")
    cached = None
    if cache_root:
        fields = {
            k: v for k, v in asdict(config).items() if k not in ("rl", "rl_minutes", "reward")
        }
        # Reward models trained by other code are not these: the training settings count too.
        fields["reward_training"] = RewardTrainConfig(steps=config.reward_steps).model_dump()
        fields["reward_restarts"] = RewardTrainConfig().resolved_restarts()
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
        cached = Path(cache_root) / f"prepare-{name}-{digest.hexdigest()[:16]}.pt"
    if cached is not None and cached.exists():
        prep = torch.load(cached, weights_only=False)
        log(f"[{name}] votes, reward models and parent images from {cached}")
    else:
        prep = prepare()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(prep, cached)
    votes, ties, flipped = prep["votes"], prep["ties"], prep["flipped"]
    reward_models, parent_images, rm_test_acc = (
        prep["reward_models"],
        prep["parent_images"],
        prep["rm_test_acc"],
    )
    timer.seconds.update(prep["seconds"])
    log(f"[{name}] {votes} votes ({ties} ties, {flipped} flipped); reward models' accuracy on "
        f"the parent's held-out test images {rm_test_acc[0]:.3f} / {rm_test_acc[1]:.3f}, "
        f"their own test split {[t.test_accuracy for t in reward_models]}")  # fmt: skip
    timer.lap("cache")
    cpu_start = time.process_time() - prep["cpu_seconds"]
    test_items = [(p, s) for p in test_prompts for s in config.eval_seeds]
    test_p = [p for p, _ in test_items]

    # 4. RL
    if config.reward == "oracle":

        class Oracle:
            name = "oracle"

            def __call__(self, prompts: Sequence[str], batch: torch.Tensor) -> torch.Tensor:
                arrays = to_uint8(batch)
                # A lost shape scores NO_FOREGROUND (−1e9) for votes; as a reward that one
                # value would swamp its group's std, so it is floored below every real score.
                values = [max(score(p, a), -2.0) for p, a in zip(prompts, arrays, strict=True)]
                return torch.tensor(values)

        reward_scorer: Any = Oracle()
    else:
        reward_scorer = RewardModelScorer(reward_models[0].model, "reward")
    rl_settings = {"guidance_scale": config.guidance_scale, "seed": config.seed, **config.rl}
    if config.reward == "oracle":
        # The preference reads pixels through thresholds: it gives no gradients, so the
        # oracle ablation trains by policy gradients unless told otherwise (and then fails).
        rl_settings.setdefault("objective", "policy_gradient")
    rl_config = RLConfig(**rl_settings)
    # The training reward as the job composes it (worker.tasks.rl): the reward, plus the
    # recogniser's fidelity term when weighted.
    parts: list[tuple[Any, float]] = [(reward_scorer, 1.0)]
    fidelity_weight = rl_config.fidelity_weight_for(toy=True)
    if fidelity_weight > 0:
        parts.append((ToyRecogniserScorer(), fidelity_weight))
    reward_scorer = WeightedSum(parts)
    probe = ProbeSet(
        prompts=val_prompts,
        guard=RewardModelScorer(reward_models[1].model, "guard"),
        fidelity=ToyFidelityScorer(),
    )
    rl_pipe = load_pipeline(spec)
    history: list[dict[str, float]] = []
    probes: list[dict[str, Any]] = []

    def on_metrics(m: Any) -> None:
        history.append({"step": m.step, **m.as_dict()})
        if m.step % 5 == 0 or m.step == rl_config.steps:
            log(f"[{name}] RL step {m.step}: reward {m.reward_mean:.3f} ± {m.reward_std:.3f}, "
                f"KL {m.kl:.2e}, clip {m.clip_fraction:.2f}")  # fmt: skip

    def on_probe(p: Any) -> None:
        probes.append(asdict(p))
        log(
            f"[{name}] probe step {p.step}: reward {p.reward:.3f} guard {p.guard:.3f} "
            f"fidelity {p.fidelity:.3f}" + (f" STOP {p.stop_reason}" if p.stop_reason else "")
        )

    deadline = time.monotonic() + 60 * config.rl_minutes if config.rl_minutes else math.inf
    if until is not None:
        deadline = min(deadline, time.monotonic() + until - time.time())
    result = train(rl_pipe, train_prompts, reward_scorer, rl_config, work / f"ckpt-{name}",
                   probe=probe, on_metrics=on_metrics, on_probe=on_probe,
                   should_stop=lambda: time.monotonic() > deadline)  # fmt: skip
    # The child as the job writes it: a LoRA as an adapter of the base, full fine-tuning as a
    # whole pipeline.
    if rl_config.lora_rank > 0:
        adapter = save_lora(rl_pipe.unet, work / f"adapter-{name}")
        child_spec = spec.model_copy(update={"adapter": str(adapter)})
    else:
        rl_pipe.save_pretrained(work / f"model-{name}", safe_serialization=True)
        child_spec = spec.model_copy(update={"base": str(work / f"model-{name}")})
    del rl_pipe
    timer.lap("train_rl")

    # 5. the child as the platform loads it, on held-out prompts and seeds
    child_images = _generate(child_spec, load_pipeline(child_spec), test_p,
                             [s for _, s in test_items])  # fmt: skip
    parent_scores = np.array([score(p, im) for p, im in zip(test_p, parent_images, strict=True)])
    child_scores = np.array([score(p, im) for p, im in zip(test_p, child_images, strict=True)])
    valid = (parent_scores > NO_FOREGROUND / 2) & (child_scores > NO_FOREGROUND / 2)
    judged = compare(
        child_scores, parent_scores, test_p, tol, valid=valid,
        parent_classes=[pref.klass(im, p) for p, im in zip(test_p, parent_images, strict=True)],
        child_classes=[pref.klass(im, p) for p, im in zip(test_p, child_images, strict=True)],
        seed=config.seed,
    )  # fmt: skip
    timer.lap("evaluate_child")
    fid_parent = prompt_fidelity(test_p, parent_images).as_dict()
    fid_child = prompt_fidelity(test_p, child_images).as_dict()
    figures = {
        "preference": name,
        "reward_source": config.reward,
        "config": {**asdict(config), "eval_seeds": list(config.eval_seeds)},
        "rl_config": rl_config.model_dump(mode="json"),
        "votes": votes,
        "vote_ties": ties,
        "votes_flipped": flipped,
        "reward_val_accuracy": [t.val_accuracy for t in reward_models],
        "reward_test_accuracy": rm_test_acc,
        "win": judged.as_dict(),
        "tolerance": tol,
        "mean_score_change": judged.score_change,
        "class_flip_rate": judged.class_flip_rate,
        "fidelity_parent": fid_parent["both"],
        "fidelity_child": fid_child["both"],
        "cell_share_parent": cell_shares(test_p, parent_images, seed=config.seed),
        "cell_share_child": cell_shares(test_p, child_images, seed=config.seed),
        "rl_steps": result.step,
        "guard_stop": result.guard_stop,
        "history": history,
        "probes": probes,
        "phase_seconds": timer.seconds,
        "total_seconds": sum(timer.seconds.values()),
        "cpu_seconds": time.process_time() - cpu_start,
        "load_average": [load_start, os.getloadavg()[0]],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    w = figures["win"]
    log(f"[{name}] child wins {w['win_rate']:.1%} [{w['ci_low']:.1%}, {w['ci_high']:.1%}] "
        f"at tol {tol:.3g} (n {w['n']}); fidelity {figures['fidelity_parent']:.3f} -> "
        f"{figures['fidelity_child']:.3f}; in the named cell (both axes) "
        f"{both_share(figures, 'parent'):.3f} -> {both_share(figures, 'child'):.3f}; "
        f"{figures['cpu_seconds'] / 60:.1f} CPU min")  # fmt: skip
    return figures


# ---------------------------------------------------------------------------------------------
# Reporting


def both_share(r: dict[str, Any], who: str) -> float:
    """The in-named-cell share over prompts naming both axes (nan where none was judged)."""
    shares = r.get(f"cell_share_{who}") or {}
    both = shares.get("both")
    return float(both["value"]) if both else float("nan")


def goals(r: dict[str, Any]) -> dict[str, bool]:
    met = {
        "win_rate": r["win"]["win_rate"] >= GOAL_WIN_RATE,
        "votes": r["votes"] <= GOAL_MAX_VOTES,
        "minutes": r["cpu_seconds"] <= 60 * GOAL_MINUTES,
        "fidelity": within_bound(
            r["fidelity_parent"] - r["fidelity_child"], GOAL_MAX_FIDELITY_DROP
        ),
    }
    if r["preference"] == "prompted_position":
        met["position_share"] = both_share(r, "child") >= GOAL_POSITION_SHARE
    return met


def objective_label(rl_config: dict[str, Any]) -> str:
    """The table's short name: "pg" (policy gradient, also runs recorded before the option
    existed) or "backprop", with "+fW" when the recogniser's fidelity term weighs W."""
    objective = rl_config.get("objective", "policy_gradient")
    label = "backprop" if objective == "reward_backprop" else "pg"
    weight = rl_config.get("fidelity_weight", 0.0)  # runs from before the option: none
    if weight is None:
        from app.jobs.kinds import TOY_FIDELITY_WEIGHT

        weight = TOY_FIDELITY_WEIGHT
    return f"{label}+f{weight:g}" if weight else label


def format_table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'preference':<18} {'reward':<7} {'objective':<12} {'rank':>4} {'lr':>6} {'kl':>5} "
        f"{'votes':>5} "
        f"{'win@tol [95% CI]':>22} {'n':>4} "
        f"{'Δscore':>8} {'fid':>11} {'cell both':>11} {'RM acc':>11} {'steps':>5} "
        f"{'cpu min':>7} {'wall':>6}  goals"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        w = r["win"]
        lines.append(
            f"{r['preference']:<18} {r['reward_source']:<7} {objective_label(r['rl_config']):<12} "
            f"{r['rl_config']['lora_rank']:>4} "
            f"{r['rl_config']['learning_rate']:>6.0e} {r['rl_config']['kl_coef']:>5g} "
            f"{r['votes']:>5} "
            f"{w['win_rate']:>7.1%} [{w['ci_low']:>5.1%}, {w['ci_high']:>6.1%}] {w['n']:>4} "
            f"{r['mean_score_change']:>+8.4f} "
            f"{r['fidelity_parent']:.3f}>{r['fidelity_child']:.3f} "
            f"{both_share(r, 'parent'):.2f}>{both_share(r, 'child'):.2f}  "
            f"{r['reward_test_accuracy'][0]:.2f}/{r['reward_test_accuracy'][1]:.2f}   "
            f"{r['rl_steps']:>5} {r['cpu_seconds'] / 60:>7.1f} {r['total_seconds'] / 60:>5.1f}m  "
            + " ".join(f"{k}:{'ok' if v else 'MISS'}" for k, v in goals(r).items())
            + (" (guard stop)" if r["guard_stop"] else "")
        )
    return "\n".join(lines)


def reward_kl_curve(r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """At each probe: the mean KL of the steps since the last probe, and the held-out probe
    reward's gain over step 0 in units of the first training batch's reward spread."""
    h, probes = r["history"], r["probes"]
    if not h or not probes:
        return np.zeros(0), np.zeros(0)
    spread = max(h[0]["reward_std"], 1e-6)
    kl_by_step = {p["step"]: p["kl"] for p in h}
    xs, ys, previous = [], [], 0
    for probe in probes:
        window = [kl_by_step[s] for s in range(previous + 1, probe["step"] + 1) if s in kl_by_step]
        xs.append(float(np.mean(window)) if window else 0.0)
        ys.append((probe["reward"] - probes[0]["reward"]) / spread)
        previous = probe["step"]
    return np.array(xs), np.array(ys)


def plot_reward_vs_kl(results: list[dict[str, Any]], path: Path) -> None:
    """Reward vs KL per run (:func:`reward_kl_curve`), one line each, as a PNG."""
    from PIL import Image, ImageDraw

    width, height, margin = 1000, 640, 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
               (0, 0, 0), (255, 0, 255)]  # fmt: skip
    curves = []
    for r in results:
        kl, gain = reward_kl_curve(r)
        if kl.size:
            lr = r["rl_config"]["learning_rate"]
            how = f"{r['reward_source']}, {objective_label(r['rl_config'])}, lr {lr:g}"
            label = f"{r['preference']} ({how})"
            curves.append((label, kl, gain))
    if not curves:
        return
    x_max = max(float(c[1].max()) for c in curves) or 1.0
    y_min = min(0.0, min(float(c[2].min()) for c in curves))
    y_max = max(y_min + 1e-6, max(float(c[2].max()) for c in curves))

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = margin + (width - 2 * margin - 260) * x / x_max
        py = height - margin - (height - 2 * margin) * (y - y_min) / (y_max - y_min)
        return px, py

    draw.line([to_px(0, y_min), to_px(x_max, y_min)], fill="black")
    draw.line([to_px(0, y_min), to_px(0, y_max)], fill="black")
    draw.line([to_px(0, 0), to_px(x_max, 0)], fill=(200, 200, 200))
    draw.text((margin + 150, height - margin + 25),
              "mean KL(policy || parent) per transition since the previous probe",
              fill="black")  # fmt: skip
    draw.text((8, margin - 45), "held-out probe reward gain over step 0 (training-reward sd)",
              fill="black")  # fmt: skip
    for frac in (0.0, 0.5, 1.0):
        x, y = to_px(frac * x_max, y_min)
        draw.text((x - 15, y + 5), f"{frac * x_max:.1e}", fill="black")
        yv = y_min + frac * (y_max - y_min)
        x, y = to_px(0, yv)
        draw.text((x - 45, y - 5), f"{yv:+.2f}", fill="black")
    for i, (label, kl, gain) in enumerate(curves):
        colour = colours[i % len(colours)]
        points = [to_px(float(a), float(b)) for a, b in zip(kl, gain, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((width - margin - 240, margin + 16 * i), label, fill=colour)
    img.save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preference", action="append", default=None,
                        help=f"one of {', '.join(PREFERENCES)} or 'all' (repeatable)")  # fmt: skip
    parser.add_argument("--reward", choices=("learned", "oracle"), default="learned")
    parser.add_argument("--votes", type=int, default=None)
    parser.add_argument("--rl-steps", type=int, default=None)
    parser.add_argument("--kl-coef", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--prompts-per-step", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--rl", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="any other RLConfig field, e.g. --rl minibatches=4")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rl-minutes", type=float, default=None, help="cap on the RL phase")
    parser.add_argument("--rl-until", type=float, default=None, metavar="EPOCH",
                        help="end RL by this Unix time (a run bounded from outside)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a reduced run for two CPU cores")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="only print the table (and plot) of earlier --out files")  # fmt: skip
    return parser.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> list[RLLoopConfig]:
    names: list[str] = []
    for name in args.preference or ["brighter", "prompted_position"]:
        names += list(PREFERENCES) if name == "all" else [name]
    configs = []
    for name in dict.fromkeys(names):
        base = quick_config(name) if args.quick else RLLoopConfig(preference=name)
        rl = dict(base.rl)
        for key, value in (("steps", args.rl_steps), ("kl_coef", args.kl_coef),
                           ("learning_rate", args.lr),
                           ("prompts_per_step", args.prompts_per_step),
                           ("group_size", args.group_size)):  # fmt: skip
            if value is not None:
                rl[key] = value
        rl.update(dict(args.rl))
        votes = args.votes if args.votes is not None else base.votes
        configs.append(replace(base, reward=args.reward, seed=args.seed, votes=votes, rl=rl,
                               rl_minutes=args.rl_minutes))  # fmt: skip
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merged = [r for path in args.merge if path.exists() for r in json.loads(path.read_text())]
        print(format_table(merged))
        if args.out is not None:
            args.out.write_text(json.dumps(merged, indent=2))
        if args.plot is not None:
            plot_reward_vs_kl(merged, args.plot)
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"{os.cpu_count()} CPUs, {device}, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="prefloop-rl-") as tmp:
        # The child is reloaded as the platform loads one: its adapter must lie under a model
        # root, so this run's scratch directory becomes one (beside the default roots).
        from app.core.config import get_settings

        roots = get_settings().resolved_model_roots
        os.environ["PREFLOOP_MODEL_ROOTS"] = ",".join([*map(str, roots), tmp])
        get_settings.cache_clear()
        for config in configs_from_args(args):
            log = lambda s: print(s, flush=True)  # noqa: E731
            results.append(run_loop(config, Path(tmp), log=log, until=args.rl_until))
            if args.out is not None:
                args.out.write_text(json.dumps(results, indent=2))
            if args.plot is not None:
                plot_reward_vs_kl(results, args.plot)
    print()
    print(format_table(results))
    print(f"\ngoals: ≥ {GOAL_WIN_RATE:.0%} win-rate at tolerance from ≤ {GOAL_MAX_VOTES} votes, "
          f"prompted-position share ≥ {GOAL_POSITION_SHARE}, ≤ {GOAL_MINUTES:.0f} CPU minutes; "
          f"load average at the end {os.getloadavg()[0]:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
