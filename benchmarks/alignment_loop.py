"""Do votes move the model, for every kind of preference? The alignment loop, end to end, measured
honestly.

For each simulated preference of `worker.toy.preferences` (every one in PREFERENCES: the global
image preferences and the prompt-conditional ones, whose prompts all name their attribute):
1. start the distributed platform (`tests.support.Stack`: `serve --no-worker` + a worker on a
   fresh Postgres database and Redis) and create a project through the HTTP API: train prompts
   from the toy grammar, held-out test prompts, the shipped toy model;
2. `generate` several images per train prompt (each prompt its own seeds, `worker.seeds`);
3. simulated annotators vote THROUGH THE HTTP API (`pairs/next`, the two image URLs, `votes`),
   by the preference on (image, prompt), each decisive vote reversed with `--flip-noise`;
4. `train_reward` (toyconv) on those votes;
5. for each METHOD (below) make a child of the parent, `evaluate` parent vs child on held-out
   prompts with per-prompt evaluation seeds (a range no training image uses), download the
   images and judge them with the preference itself.

Measured per preference and method (`worker.evaluation`):
- win-rate at the preference's just-noticeable tolerance (`Preference.tolerance`): a difference
  within it is a tie counted HALF; 95 % interval by a prompt-clustered bootstrap (prompts
  resampled, all their seeds kept);
- mean score change (child − parent, over pairs where both images show a foreground) and the
  class-flip rate (share of pairs whose attribute class — size class, cell, background... —
  differs between child and parent);
- the oracle best-of-4 ceiling: the same win-rate for the preference's own pick of the best of
  4 parent samples against one parent sample (the parent's evaluation images);
- fidelity (colour + shape match rate) before and after; reward-model accuracy (test split when
  the job reports one, else validation, marked v); votes used; CPU minutes of the method
  (reward model + child training, every process of the platform, /proc accounting);
- for prompted_position: the share of held-out images whose shape sits in the named cell on
  every axis the prompt names (and over prompts naming both axes), parent vs child.

Methods: `dpo_votes` (train_dpo on the votes with the job's defaults — the lead's path — unless
`--steps`/`--beta`/... override them); `dpo_votes_reward` (train_dpo `data: votes+reward`: the
votes plus on-policy best-vs-worst pairs the reward model labels); `iterative_x3` (train_loop,
3 rounds, stopping on validation prompts added for it; the last accepted child is judged);
`best_of_4`, `best_of_16` and `best_of_32` (no training: the parent sampling best of N by the
reward model; the cost is at test time); `rl` (train_rl from the reward model with a KL anchor
to the parent, the job's defaults: reward backpropagation through the sampling chain).

Printed: one table per method and the goals (for every preference a method reaching ≥ 80 %
win-rate at tolerance from ≤ 2 000 votes and ≤ 30 CPU minutes with fidelity drop ≤ 2 points;
prompted position ≥ 0.6 of held-out images in the named cell). `--json` writes every figure.

    .venv/bin/python benchmarks/alignment_loop.py --preference all --json /tmp/loop.json
    .venv/bin/python benchmarks/alignment_loop.py --preference brighter --method dpo_votes
    .venv/bin/python benchmarks/alignment_loop.py --quick          # a smoke run, minutes

Needs the test services (Postgres and Redis, as for `tests/e2e`).

Baseline, `dpo_votes` with the train_dpo defaults of the time (β 5000, lr 1e-4, 200 steps,
attention LoRA rank 8), reduced size (400 votes, 10 % flipped; 40 train prompts × 5 seeds;
30 held-out prompts × 5 evaluation seeds; reward model 300 steps), 2 shared CPU cores at load
average 7–20: win-rate at tolerance [95 % cluster CI], ties of 150, class flips, oracle best-of-4:
larger 51.3 % [49.3, 53.7] 140 ties, 1.3 %, 72.7 %; left 49.3 % [48.3, 50.0] 148, 1.3 %, 79.3 %;
centered 50.3 % [50.0, 51.0] 149, 0.7 %, 78.3 %; brighter 55.7 % [52.7, 59.3] 133, 6.0 %,
79.3 %; darker 53.0 % [51.0, 55.7] 141, 2.7 %, 78.0 %; lighter 50.3 % [50.0, 51.0] 149, 0.7 %,
73.0 %; prompted_position 49.3 % [48.3, 50.0] 148, 2.7 %, 77.0 % (in the named cell, prompts
naming both axes: 0.12 → 0.11); prompted_size 49.3 % [48.0, 50.7] 146, 0 %, 67.7 %;
prompted_colour 50.7 % [48.7, 52.3] 144, 0 %, 65.7 %. Fidelity moved by ≤ 1.1 points; reward-model
validation accuracy 0.54–0.81; 1.0–1.4 CPU minutes per method (7–14 min wall under that load).
No preference reaches 80 %; what the parent already holds (oracle best-of-4) is 66–79 %.

Full size with every job's defaults (`--train-prompts 200`: 2 000 votes; 80 held-out prompts × 5
seeds; the README's table, *The alignment battery at full size*): ≥ 80 % within 2 points of
fidelity for darker (`dpo_votes` 98.8 %), and for left, centered, brighter and darker with
`best_of_16` (86.5, 90.8, 86.4, 90.1 %); larger 74.1 % and prompted position 78.2 % at best
(named cell 0.16 → 0.57); prompted size, lighter and prompted colour ≤ 67 % (reward models
0.54–0.62: the parent already draws what these prompts name). `rl` at 60 and 180 steps: 50.5 and
48.8 % on prompted position.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image as PILImage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import Stack, bearer, wait_job  # noqa: E402
from worker.evaluation import compare, oracle_best_of_n, share  # noqa: E402
from worker.seeds import seed_domain  # noqa: E402
from worker.toy.preferences import (  # noqa: E402
    NO_FOREGROUND,
    PREFERENCES,
    Preference,
    get_preference,
    in_named_cell,
    prompt_fidelity,
    vote_from_scores,
)
from worker.toy.world import parse_prompt, sample_prompts  # noqa: E402

GOAL_WIN_RATE = 0.80
GOAL_MAX_VOTES = 2000
GOAL_FIDELITY_DROP = 0.02
GOAL_CPU_MINUTES = 30.0
GOAL_CELL_SHARE = 0.6
ORACLE_N = 4  # the oracle ceiling picks the best of this many parent samples


@dataclass(frozen=True)
class LoopConfig:
    """One run of the loop for one preference, and the methods to compare on it."""

    preference: str
    methods: tuple[str, ...] = ("dpo_votes",)
    votes: int = 2000  # at most this many votes are cast (fewer if the pairs run out)
    flip_noise: float = 0.1  # chance that a decisive vote is reversed
    annotators: int = 2  # simulated annotators voting at the same time
    train_prompts: int = 120
    images_per_prompt: int = 5  # per-prompt training seeds
    train_pairs_per_prompt: int = 10  # pairs within the model per prompt (≤ n(n-1)/2)
    test_prompts: int = 80
    # Per-prompt evaluation seeds; at least ORACLE_N + 1 so the oracle ceiling can be measured.
    eval_images_per_prompt: int = 5
    # Sampling of the toy model (the toy evaluator's defaults: DDIM, 10 steps, guidance 4).
    model_params: dict[str, Any] = field(
        default_factory=lambda: {"scheduler": "ddim", "steps": 10, "guidance_scale": 4.0}
    )
    # train_dpo params beyond model_id; empty: the job's defaults (what a lead gets).
    dpo: dict[str, Any] = field(default_factory=dict)
    # train_rl params beyond model_id and the reward model; empty: the job's defaults.
    rl: dict[str, Any] = field(default_factory=dict)
    reward_steps: int | None = None  # None: the train_reward job's default
    seed: int = 0

    def __post_init__(self) -> None:
        get_preference(self.preference)
        if not 1 <= self.votes <= GOAL_MAX_VOTES:
            raise ValueError(f"votes must be in [1, {GOAL_MAX_VOTES}], got {self.votes}")
        if not 0.0 <= self.flip_noise <= 1.0:
            raise ValueError("flip_noise must be in [0, 1]")
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHOD_NAMES)}")
        if self.eval_images_per_prompt < 2:
            raise ValueError("eval_images_per_prompt must be ≥ 2")


def quick_config(preference: str, **overrides: Any) -> LoopConfig:
    """A reduced loop (a few minutes on two cores): fewer prompts, votes and steps."""
    base: dict[str, Any] = {
        "votes": 240,
        "train_prompts": 40,
        "images_per_prompt": 4,
        "train_pairs_per_prompt": 6,
        "test_prompts": 30,
        "eval_images_per_prompt": ORACLE_N + 1,
        "dpo": {"steps": 60, "learning_rate": 2e-4, "beta": 2000.0},
        "reward_steps": 200,
        "annotators": 1,
    }
    base.update(overrides)
    return LoopConfig(preference=preference, **base)


# ---------------------------------------------------------------------------------------------
# Timing: wall seconds and CPU seconds of every process of the platform


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime + reaped children's cutime + cstime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime..cstime are fields 14..17.
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    children = [int(x) for x in out.split()]
    return children + [d for c in children for d in _descendants(c)]


def platform_cpu_seconds(stack: Stack | None) -> float:
    """CPU seconds so far of this process (the annotators, the judge) and the platform's."""
    times = os.times()
    total = times.user + times.system
    if stack is not None:
        roots = [p.pid for p in ([stack.serve] if stack.serve else []) + stack.workers]
        for root in roots:
            total += _proc_cpu_seconds(root) + sum(
                _proc_cpu_seconds(child) for child in _descendants(root)
            )
    return total


class PhaseTimer:
    """Wall and CPU seconds per named phase, in the order they ran."""

    def __init__(self, stack: Stack | None = None) -> None:
        self.stack = stack
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), platform_cpu_seconds(self.stack)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            used = platform_cpu_seconds(self.stack) - cpu
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + used

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


# ---------------------------------------------------------------------------------------------
# The platform through its HTTP API


def within_bound(value: float, bound: float) -> bool:
    """``value <= bound`` for shares: 0.9822 − 0.9622 is 0.020000000000000018 in floats, and a
    drop of exactly the bound meets it."""
    return round(value, 9) <= bound


def _checked(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json() if response.content else None


def split_prompts(config: LoopConfig) -> tuple[list[str], list[str]]:
    """Train and held-out test prompts from the grammar; no test prompt is a train prompt.

    A prompt-conditional preference samples prompts that all name its attribute (its
    `mention`): a prompt naming nothing for it gives only ties, no signal and no measurement.
    """
    mention = get_preference(config.preference).mention or None
    train = list(
        dict.fromkeys(sample_prompts(config.train_prompts * 2, seed=config.seed, mention=mention))
    )
    train = train[: config.train_prompts]
    seen = set(train)
    test: list[str] = []
    for text in sample_prompts(config.test_prompts * 4, seed=config.seed + 10_000, mention=mention):
        if text not in seen:
            seen.add(text)
            test.append(text)
        if len(test) == config.test_prompts:
            break
    return train, test


@dataclass
class Project:
    """The ids one run works with."""

    id: int
    model_id: int
    annotator_tokens: list[str]
    train_prompts: list[str]
    test_prompts: list[str]


def create_project(stack: Stack, config: LoopConfig, name: str) -> Project:
    """A project with train/test prompts, the toy model and simulated annotator accounts."""
    settings = {
        "votes_per_pair": 1,
        # Simulated annotators vote as fast as the server answers.
        "votes_per_second": 100,
        "train_pairs_per_prompt": config.train_pairs_per_prompt,
        "tie_policy": "drop",
    }
    pid = _checked(stack.post("/api/v1/projects", {"name": name, "settings": settings}), 201)["id"]
    train, test = split_prompts(config)
    prompts = [{"text": t, "split": "train"} for t in train]
    prompts += [{"text": t, "split": "test"} for t in test]
    _checked(stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": prompts}), 201)
    model = _checked(
        stack.post(
            f"/api/v1/projects/{pid}/models",
            {"name": "toy", "base": "toy", "params": config.model_params},
        ),
        201,
    )
    tokens = [
        _checked(
            stack.post(
                f"/api/v1/projects/{pid}/annotators", {"email": f"sim{i}-{pid}@example.com"}
            ),
            201,
        )["token"]
        for i in range(config.annotators)
    ]
    return Project(pid, model["id"], tokens, train, test)


def finished_job(
    stack: Stack, project_id: int, kind: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Create a job, wait for it, return it whole (RuntimeError with its error otherwise)."""
    job = _checked(
        stack.post(f"/api/v1/projects/{project_id}/jobs", {"kind": kind, "params": params}), 202
    )
    assert stack.client is not None
    done = wait_job(stack.client, job["id"], {}, timeout)
    if done["status"] != "succeeded":
        raise RuntimeError(f"{kind} job {job['id']} {done['status']}: {done.get('error')}")
    return dict(done)


def run_job(
    stack: Stack, project_id: int, kind: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Create a job, wait for it, return its result (RuntimeError with its error otherwise)."""
    return dict(finished_job(stack, project_id, kind, params, timeout)["result"] or {})


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    with PILImage.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Simulated annotators


@dataclass
class VoteStats:
    """What the simulated annotators did."""

    votes: int = 0
    ties: int = 0
    flipped: int = 0  # decisive votes reversed by the flip noise
    images_fetched: int = 0

    def add(self, other: VoteStats) -> None:
        self.votes += other.votes
        self.ties += other.ties
        self.flipped += other.flipped
        self.images_fetched += other.images_fetched


class VoteBudget:
    """A shared, thread-safe cap on the number of votes cast."""

    def __init__(self, limit: int) -> None:
        self._left = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._left += 1


def annotate(
    base_url: str,
    project_id: int,
    token: str,
    preference: Preference,
    budget: VoteBudget,
    *,
    flip_noise: float,
    rng: np.random.Generator,
) -> VoteStats:
    """One simulated annotator: fetch a pair, look at both images, vote by the preference.

    An annotator remembers how it judged an image it has already seen (images recur across
    pairs), so each image is downloaded once per annotator.
    """
    stats = VoteStats()
    scores: dict[str, float] = {}
    headers = bearer(token)
    with httpx.Client(base_url=base_url, timeout=30, headers=headers) as client:
        while budget.take():
            served = client.get(f"/api/v1/projects/{project_id}/pairs/next")
            if served.status_code == 204:
                budget.give_back()
                break
            pair = _checked(served, 200)
            side_scores = []
            for side in ("left", "right"):
                image_id = pair[side]["image_id"]
                if image_id not in scores:
                    png = client.get(pair[side]["url"])
                    if png.status_code != 200:
                        raise RuntimeError(f"image {image_id}: {png.status_code}")
                    scores[image_id] = preference.score(decode_png(png.content), pair["prompt"])
                    stats.images_fetched += 1
                side_scores.append(scores[image_id])
            honest = vote_from_scores(side_scores[0], side_scores[1], rng)
            choice = vote_from_scores(side_scores[0], side_scores[1], rng, flip_noise)
            stats.ties += choice == "tie"
            stats.flipped += choice != honest
            vote = {"choice": choice, "left_image_id": pair["left"]["image_id"]}
            _checked(_post_vote(client, pair["pair_id"], vote), 201)
            stats.votes += 1
    return stats


def _post_vote(
    client: httpx.Client, pair_id: int, vote: dict[str, Any], attempts: int = 30
) -> httpx.Response:
    """POST a vote as a well-behaved client: a 429 (the project's vote rate, shared by all its
    annotators) stored nothing, so wait its Retry-After and send it again."""
    for attempt in range(attempts):
        answer = client.post(f"/api/v1/pairs/{pair_id}/votes", json=vote)
        if answer.status_code != 429 or attempt == attempts - 1:
            break
        time.sleep(float(answer.headers.get("Retry-After", "1")))
    return answer


def simulate_votes(
    stack: Stack, project: Project, preference: Preference, config: LoopConfig
) -> VoteStats:
    """All annotators of the project vote at once until `config.votes` or the pairs run out."""
    budget = VoteBudget(config.votes)
    results: list[VoteStats] = []
    errors: list[BaseException] = []

    def work(index: int, token: str) -> None:
        try:
            rng = np.random.default_rng([config.seed, index])
            stats = annotate(
                stack.base,
                project.id,
                token,
                preference,
                budget,
                flip_noise=config.flip_noise,
                rng=rng,
            )
            results.append(stats)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i, token), daemon=True)
        for i, token in enumerate(project.annotator_tokens)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    total = VoteStats()
    for stats in results:
        total.add(stats)
    return total


# ---------------------------------------------------------------------------------------------
# Judging with the preference itself

Images = dict[tuple[int, int], tuple[str, np.ndarray]]  # (prompt id, seed) -> (prompt, image)
IMAGE_LIST_LIMIT = 10_000  # the images listing's largest page


@dataclass(frozen=True)
class Judgement:
    """Child vs parent on the same held-out (prompt, seed) images, by the preference."""

    comparison: dict[str, Any]  # worker.evaluation.Comparison.as_dict()
    fidelity_parent: dict[str, float | int]
    fidelity_child: dict[str, float | int]
    mean_score_parent: float
    mean_score_child: float
    lost_foreground: int  # comparisons where the child has no shape and the parent had one
    # Share of images in the prompt's named cell (None when no test prompt names a position),
    # over every prompt naming a position, and over those naming both axes.
    cell_share_parent: dict[str, Any] | None = None
    cell_share_child: dict[str, Any] | None = None
    cell_share_both_axes_parent: dict[str, Any] | None = None
    cell_share_both_axes_child: dict[str, Any] | None = None

    @property
    def win(self) -> dict[str, Any]:
        return self.comparison

    @property
    def fidelity_drop(self) -> float:
        """Points of colour+shape match rate lost by the child (negative: it gained)."""
        return float(self.fidelity_parent["both"]) - float(self.fidelity_child["both"])


def fetch_images(stack: Stack, project_id: int, model_id: int) -> Images:
    """A model's test-split images at evaluation seeds, by (prompt id, seed)."""
    listed = _checked(
        stack.get(
            f"/api/v1/projects/{project_id}/images?model_id={model_id}&split=test"
            f"&limit={IMAGE_LIST_LIMIT}"
        ),
        200,
    )
    if len(listed) >= IMAGE_LIST_LIMIT:
        raise RuntimeError(f"more than {IMAGE_LIST_LIMIT} test images: the listing is cut off")
    out: Images = {}
    for row in listed:
        if seed_domain(row["seed"]) != "eval":
            continue
        png = stack.get(row["url"])
        if png.status_code != 200:
            raise RuntimeError(f"image {row['id']}: {png.status_code}")
        out[(row["prompt_id"], row["seed"])] = (row["prompt"], decode_png(png.content))
    return out


def _cell_shares(
    keys: list[tuple[int, int]], prompts: list[str], images: list[np.ndarray]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """In-named-cell share over prompts naming a position, and over those naming both axes."""
    flags, clusters, both_flags, both_clusters = [], [], [], []
    for (pid, _), prompt, image in zip(keys, prompts, images, strict=True):
        inside = in_named_cell(image, prompt)
        if inside is None:
            continue
        flags.append(inside)
        clusters.append(pid)
        spec = parse_prompt(prompt)
        if spec.horizontal is not None and spec.vertical is not None:
            both_flags.append(inside)
            both_clusters.append(pid)
    all_axes = share(flags, clusters).as_dict() if flags else None
    both = share(both_flags, both_clusters).as_dict() if both_flags else None
    return all_axes, both


def judge(preference: Preference, parent: Images, child: Images) -> Judgement:
    """Child vs parent (same prompt and seed) at the preference's tolerance, and fidelity."""
    keys = sorted(set(parent) & set(child))
    if not keys or len(keys) != len(parent) or len(keys) != len(child):
        raise RuntimeError(
            f"parent and child images do not pair up: {len(parent)} vs {len(child)}, "
            f"{len(keys)} in common"
        )
    prompts = [parent[k][0] for k in keys]
    parent_images = [parent[k][1] for k in keys]
    child_images = [child[k][1] for k in keys]
    pairs = list(zip(prompts, parent_images, child_images, strict=True))
    parent_scores = np.array([preference.score(im, p) for p, im, _ in pairs])  # (N,)
    child_scores = np.array([preference.score(im, p) for p, _, im in pairs])  # (N,)
    real = (parent_scores > NO_FOREGROUND) & (child_scores > NO_FOREGROUND)  # (N,)
    comparison = compare(
        child_scores,
        parent_scores,
        [pid for pid, _ in keys],
        preference.tolerance,
        valid=real,
        parent_classes=[preference.klass(im, p) for p, im, _ in pairs],
        child_classes=[preference.klass(im, p) for p, _, im in pairs],
    )
    cell_parent, both_parent = _cell_shares(keys, prompts, parent_images)
    cell_child, both_child = _cell_shares(keys, prompts, child_images)
    return Judgement(
        comparison=comparison.as_dict(),
        fidelity_parent=prompt_fidelity(prompts, parent_images).as_dict(),
        fidelity_child=prompt_fidelity(prompts, child_images).as_dict(),
        mean_score_parent=float(parent_scores[real].mean()) if real.any() else math.nan,
        mean_score_child=float(child_scores[real].mean()) if real.any() else math.nan,
        lost_foreground=int(
            ((child_scores <= NO_FOREGROUND) & (parent_scores > NO_FOREGROUND)).sum()
        ),
        cell_share_parent=cell_parent,
        cell_share_child=cell_child,
        cell_share_both_axes_parent=both_parent,
        cell_share_both_axes_child=both_child,
    )


def oracle_ceiling(
    preference: Preference, parent: Images, n: int = ORACLE_N
) -> dict[str, Any] | None:
    """Win-rate of the preference's own best-of-n pick among parent samples vs one sample.

    Uses the parent's evaluation images (prompts with at least n + 1 of them); None otherwise.
    """
    by_prompt: dict[int, list[float]] = {}
    for (pid, _seed), (prompt, image) in sorted(parent.items()):
        by_prompt.setdefault(pid, []).append(preference.score(image, prompt))
    rows = [scores for scores in by_prompt.values() if len(scores) >= n + 1]
    if not rows:
        return None
    width = min(len(r) for r in rows)
    scores = np.array([r[:width] for r in rows])  # (P, M)
    return {"best_of": n, **oracle_best_of_n(scores, n, preference.tolerance).as_dict()}


# ---------------------------------------------------------------------------------------------
# Methods: each makes a child model version of the parent from the project's votes


@dataclass
class MethodRun:
    """What a method produced: the child to judge and what it reports about itself."""

    child_model_id: int
    info: dict[str, Any]


# (stack, project, config, reward job result, timer) -> the child; each method times its own
# training phases under names starting with "method:" (they make its CPU minutes).
MethodFn = Callable[[Stack, "Project", LoopConfig, dict[str, Any], PhaseTimer], MethodRun]


def dpo_params(config: LoopConfig, model_id: int) -> dict[str, Any]:
    """train_dpo params: only model_id (the job's defaults) plus the config's overrides."""
    return {
        "model_id": model_id,
        **config.dpo,
        "seed": config.seed,
        # The evaluation below is launched explicitly, on held-out seeds; no arena images.
        "closed_loop": False,
    }


def dpo_votes(
    stack: Stack, project: Project, config: LoopConfig, reward: dict[str, Any], timer: PhaseTimer
) -> MethodRun:
    """Diffusion-DPO on the human (simulated) votes, with the job's defaults."""
    with timer.phase("method:train_dpo"):
        dpo = run_job(
            stack, project.id, "train_dpo", dpo_params(config, project.model_id), timeout=7200
        )
    keys = ("model_id", "pairs", "steps", "final_loss", "implicit_acc")
    return MethodRun(dpo["model_id"], {k: dpo.get(k) for k in keys})


def dpo_votes_reward(
    stack: Stack, project: Project, config: LoopConfig, reward: dict[str, Any], timer: PhaseTimer
) -> MethodRun:
    """DPO on the votes plus on-policy pairs the reward model labels (best vs worst of 8)."""
    params = {
        **dpo_params(config, project.model_id),
        "data": "votes+reward",
        "reward_model_id": reward["reward_model_id"],
    }
    with timer.phase("method:train_dpo"):
        dpo = run_job(stack, project.id, "train_dpo", params, timeout=7200)
    keys = ("model_id", "pairs", "steps", "final_loss", "implicit_acc", "sources")
    return MethodRun(dpo["model_id"], {k: dpo.get(k) for k in keys})


# Validation prompts the iterative loop's stopping rule looks at (never the reported test prompts).
VAL_PROMPTS = 40


def add_val_prompts(stack: Stack, project: Project, config: LoopConfig) -> int:
    """Validation prompts for the loop's stopping rule, disjoint from train and test prompts."""
    taken = set(project.train_prompts) | set(project.test_prompts)
    mention = get_preference(config.preference).mention or None
    fresh = list(
        dict.fromkeys(sample_prompts(8 * VAL_PROMPTS, seed=config.seed + 20_000, mention=mention))
    )
    val = [p for p in fresh if p not in taken][:VAL_PROMPTS]
    _checked(
        stack.post(
            f"/api/v1/projects/{project.id}/prompts",
            {"prompts": [{"text": t, "split": "val"} for t in val]},
        ),
        201,
    )
    return len(val)


def iterative_x3(
    stack: Stack, project: Project, config: LoopConfig, reward: dict[str, Any], timer: PhaseTimer
) -> MethodRun:
    """train_loop, 3 rounds: on-policy relabelling, the previous child as reference."""
    with timer.phase("setup:val_prompts"):
        n_val = add_val_prompts(stack, project, config)
    params = {
        **dpo_params(config, project.model_id),
        "rounds": 3,
        "reward_model_id": reward["reward_model_id"],
    }
    with timer.phase("method:train_loop"):
        loop = run_job(stack, project.id, "train_loop", params, timeout=4 * 7200)
    rounds = loop["rounds"]
    # The lead's pick: the last child that improved held-out reward; if round 1 already failed
    # the rule, its child is judged all the same (the table must not judge the parent).
    child = loop["best_model_id"]
    if child == project.model_id:
        child = rounds[0]["model_id"]
    info = {
        "rounds": len(rounds),
        "stopped": loop["stopped"],
        "val_prompts": n_val,
        "judged_model_id": child,
        "per_round": [
            {k: r.get(k) for k in ("round", "model_id", "pairs", "reward_gain", "fidelity_child")}
            for r in rounds
        ],
    }
    return MethodRun(child, info)


def best_of(n: int) -> MethodFn:
    """No training: the parent's weights, sampling best of n by the reward model."""

    def make(
        stack: Stack,
        project: Project,
        config: LoopConfig,
        reward: dict[str, Any],
        timer: PhaseTimer,
    ) -> MethodRun:
        with timer.phase("method:register"):
            policy = _checked(
                stack.post(
                    f"/api/v1/projects/{project.id}/models",
                    {
                        "name": f"toy+best-of-{n}",
                        "base": "toy",
                        "params": {
                            **config.model_params,
                            "best_of": n,
                            "reward_model_id": reward["reward_model_id"],
                        },
                        "parent_id": project.model_id,
                    },
                ),
                201,
            )
        # Its cost is at test time (n samples per image, in the evaluate phase), not in training.
        return MethodRun(policy["id"], {"best_of": n, "reward_model_id": reward["reward_model_id"]})

    make.__doc__ = f"No training: the parent sampling best of {n} by the reward model."
    return make


def rl(
    stack: Stack, project: Project, config: LoopConfig, reward: dict[str, Any], timer: PhaseTimer
) -> MethodRun:
    """Online RL (`train_rl`, KL-anchored to the parent) from the reward model, with the
    job's defaults; the guard is the fidelity reader on held-out prompts (one reward model here).
    """
    params = {
        "model_id": project.model_id,
        "reward_model_id": reward["reward_model_id"],
        **config.rl,
        "seed": config.seed,
        # The evaluation below is launched explicitly, on held-out seeds; no arena images.
        "closed_loop": False,
    }
    with timer.phase("method:train_rl"):
        done = finished_job(stack, project.id, "train_rl", params, timeout=4 * 7200)
    job = dict(done["result"] or {})
    keys = ("model_id", "steps", "stopped_by_guard", "guard_stop", "final_reward_mean", "final_kl")
    info = {k: job.get(k) for k in keys}
    # The training curve, for the reader: reward and KL at every step, probe reward when probed.
    info["trace"] = rl_trace(done.get("metrics") or {})
    return MethodRun(job["model_id"], info)


def rl_trace(metrics: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    """A job's reward, KL and probe series ([step, value] points), for the reader."""
    keys = ("reward_mean", "kl", "probe_reward", "probe_guard", "probe_fidelity")
    return {k: metrics[k] for k in keys if k in metrics}


# The table's methods; None would mark a method whose child-making is not written yet (the
# battery reports it as not run).
METHODS: dict[str, MethodFn | None] = {
    "dpo_votes": dpo_votes,
    "dpo_votes_reward": dpo_votes_reward,
    "iterative_x3": iterative_x3,
    "best_of_4": best_of(4),
    # Test-time alignment at a larger budget: how far the reward model alone carries the parent.
    "best_of_16": best_of(16),
    "best_of_32": best_of(32),
    "rl": rl,
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


# ---------------------------------------------------------------------------------------------
# The loop


def run_method(
    stack: Stack,
    project: Project,
    config: LoopConfig,
    method: str,
    reward: dict[str, Any],
    votes: VoteStats,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One method on a voted project: its child, judged against the parent."""
    make = METHODS[method]
    tag = f"[{config.preference}/{method}]"
    if make is None:
        log(f"{tag} not run: no implementation in METHODS yet")
        return {"method": method, "status": "not implemented"}
    preference = get_preference(config.preference)
    timer = PhaseTimer(stack)
    run = make(stack, project, config, reward, timer)
    log(f"{tag} child {run.child_model_id}: {run.info} ({timer.total:.0f} s)")
    with timer.phase("evaluate"):
        evaluation = run_job(
            stack,
            project.id,
            "evaluate",
            {
                "model_ids": [project.model_id, run.child_model_id],
                "split": "test",
                "images_per_prompt": config.eval_images_per_prompt,
                "reward_model_id": reward["reward_model_id"],
            },
            timeout=3600,
        )
    with timer.phase("judge"):
        parent_images = fetch_images(stack, project.id, project.model_id)
        child_images = fetch_images(stack, project.id, run.child_model_id)
        judgement = judge(preference, parent_images, child_images)
        oracle = oracle_ceiling(preference, parent_images)
    c = judgement.comparison
    method_cpu = sum(v for k, v in timer.cpu_seconds.items() if k.startswith("method:"))
    log(
        f"{tag} child wins {c['win_rate']:.1%} [{c['ci_low']:.1%}, {c['ci_high']:.1%}] at "
        f"tolerance {c['tolerance']:.4g} ({c['ties']} of {c['n']} within it); class flips "
        f"{c['class_flip_rate']:.1%}; fidelity {judgement.fidelity_parent['both']:.1%} -> "
        f"{judgement.fidelity_child['both']:.1%}"
    )
    return {
        "method": method,
        "status": "ran",
        "child_model_id": run.child_model_id,
        "info": run.info,
        "comparison": c,
        "oracle_best_of_n": oracle,
        "fidelity_parent": judgement.fidelity_parent,
        "fidelity_child": judgement.fidelity_child,
        "fidelity_drop": judgement.fidelity_drop,
        "mean_score_parent": judgement.mean_score_parent,
        "mean_score_child": judgement.mean_score_child,
        "lost_foreground": judgement.lost_foreground,
        "cell_share_parent": judgement.cell_share_parent,
        "cell_share_child": judgement.cell_share_child,
        "cell_share_both_axes_parent": judgement.cell_share_both_axes_parent,
        "cell_share_both_axes_child": judgement.cell_share_both_axes_child,
        "reward_model_win_rate": {
            k: evaluation.get(k)
            for k in ("win_rate", "ci_low", "ci_high", "cluster_ci_low", "cluster_ci_high", "n")
        },
        "votes_used": votes.votes,
        "reward_accuracy": reward_accuracy(reward),
        # The method's CPU: the reward model it relies on plus its own training.
        "cpu_minutes": (method_cpu + reward["cpu_seconds"]) / 60,
        "phase_seconds": dict(timer.seconds),
        "phase_cpu_seconds": dict(timer.cpu_seconds),
    }


def reward_accuracy(reward: dict[str, Any]) -> dict[str, Any]:
    """The reward model's held-out accuracy: the test split's when reported, else validation."""
    if reward.get("test_accuracy") is not None:
        return {"split": "test", "accuracy": reward["test_accuracy"]}
    return {"split": "val", "accuracy": reward.get("val_accuracy")}


def run_loop(
    stack: Stack, config: LoopConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The whole loop for one preference on a running platform, every method; the figures."""
    preference = get_preference(config.preference)
    timer = PhaseTimer(stack)
    load_before = os.getloadavg()
    tag = f"[{config.preference}]"
    with timer.phase("setup"):
        project = create_project(stack, config, f"alignment-{config.preference}-{config.seed}")
    log(
        f"{tag} project {project.id}: {len(project.train_prompts)} train, "
        f"{len(project.test_prompts)} test prompts"
    )
    with timer.phase("generate"):
        generated = run_job(
            stack,
            project.id,
            "generate",
            {"model_ids": [project.model_id], "images_per_prompt": config.images_per_prompt},
            timeout=3600,
        )
    log(
        f"{tag} generated {generated['images']} images, {generated['pairs']} pairs "
        f"({timer.seconds['generate']:.0f} s)"
    )
    with timer.phase("vote"):
        votes = simulate_votes(stack, project, preference, config)
    log(
        f"{tag} {votes.votes} votes ({votes.ties} ties, {votes.flipped} flipped) "
        f"in {timer.seconds['vote']:.0f} s"
    )
    reward_params: dict[str, Any] = {"backbone": "toyconv", "seed": config.seed}
    if config.reward_steps is not None:
        reward_params["steps"] = config.reward_steps
    with timer.phase("train_reward"):
        reward = run_job(stack, project.id, "train_reward", reward_params, timeout=3600)
    reward["cpu_seconds"] = timer.cpu_seconds["train_reward"]
    accuracy = reward_accuracy(reward)
    log(
        f"{tag} reward model {accuracy['split']} accuracy {accuracy['accuracy']:.3f} "
        f"({timer.seconds['train_reward']:.0f} s)"
    )
    methods = {
        name: run_method(stack, project, config, name, reward, votes, log)
        for name in config.methods
    }
    return {
        "preference": config.preference,
        "description": preference.description,
        "tolerance": preference.tolerance,
        "config": asdict(config),
        "project_id": project.id,
        "votes": asdict(votes),
        "generated": generated,
        "reward": {
            **accuracy,
            "val_accuracy": reward.get("val_accuracy"),
            "reward_model_id": reward.get("reward_model_id"),
            "cpu_seconds": reward["cpu_seconds"],
            **{k: v for k, v in reward.items() if k in ("train_pairs", "val_pairs")},
        },
        "methods": methods,
        "phase_seconds": dict(timer.seconds),
        "phase_cpu_seconds": dict(timer.cpu_seconds),
        "total_seconds": timer.total
        + sum(sum(m.get("phase_seconds", {}).values()) for m in methods.values()),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def goals(result: dict[str, Any], method: str) -> dict[str, bool]:
    """Which goals one method met on one preference."""
    m = result["methods"][method]
    met = {
        "win_rate": m["comparison"]["win_rate"] >= GOAL_WIN_RATE,
        "votes": m["votes_used"] <= GOAL_MAX_VOTES,
        "fidelity": within_bound(m["fidelity_drop"], GOAL_FIDELITY_DROP),
        "cpu": m["cpu_minutes"] <= GOAL_CPU_MINUTES,
    }
    if result["preference"] == "prompted_position":
        both = m["cell_share_both_axes_child"] or m["cell_share_child"]
        met["cell"] = both is not None and both["value"] >= GOAL_CELL_SHARE
    return met


def _pct(x: float | None) -> str:
    return "   –  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.1%}"


def format_tables(results: list[dict[str, Any]]) -> str:
    """One table per method, one row per preference."""
    methods = list(dict.fromkeys(m for r in results for m in r["methods"]))
    out: list[str] = []
    head = (
        f"{'preference':<18} {'win@tol [95% cluster CI]':>25} {'ties':>5} {'Δscore':>9} "
        f"{'flips':>6} {'oracle4':>7} {'fid before':>10} {'fid after':>9} {'RM acc':>7} "
        f"{'votes':>5} {'CPU min':>7} {'cell p→c':>13}  goals"
    )
    for method in methods:
        out += [f"\n== {method} ==", head, "-" * len(head)]
        for r in results:
            m = r["methods"].get(method)
            if m is None:
                continue
            if m["status"] != "ran":
                out.append(f"{r['preference']:<18} {m['status']}")
                continue
            c, oracle, acc = m["comparison"], m["oracle_best_of_n"], m["reward_accuracy"]
            cell = "–"
            parent_cell = m["cell_share_both_axes_parent"] or m["cell_share_parent"]
            child_cell = m["cell_share_both_axes_child"] or m["cell_share_child"]
            if parent_cell and child_cell:
                cell = f"{parent_cell['value']:.2f}→{child_cell['value']:.2f}"
            acc_text = "–" if acc["accuracy"] is None else f"{acc['accuracy']:.3f}"
            acc_text += "" if acc["split"] == "test" else "v"
            out.append(
                f"{r['preference']:<18} {c['win_rate']:>6.1%} [{c['ci_low']:>5.1%}, "
                f"{c['ci_high']:>6.1%}] {c['ties']:>5} {c['score_change']:>+9.4f} "
                f"{_pct(c['class_flip_rate'])} {_pct(oracle['value'] if oracle else None):>7} "
                f"{m['fidelity_parent']['both']:>10.1%} {m['fidelity_child']['both']:>9.1%} "
                f"{acc_text:>7} {m['votes_used']:>5} {m['cpu_minutes']:>7.1f} {cell:>13}  "
                + " ".join(f"{k}:{'ok' if v else 'MISS'}" for k, v in goals(r, method).items())
            )
    return "\n".join(out)


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type for KEY=VALUE: VALUE read as JSON when it is JSON, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def given(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The (name, value) pairs whose value was given on the command line (not None)."""
    return {key: value for key, value in pairs if value is not None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preference",
        action="append",
        default=None,
        help=f"one of {', '.join(PREFERENCES)} or 'all' (repeatable; default: all)",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=None,
        help=f"one of {', '.join(METHOD_NAMES)} (repeatable; default: dpo_votes)",
    )
    parser.add_argument("--votes", type=int, default=None, help=f"≤ {GOAL_MAX_VOTES}")
    parser.add_argument("--flip-noise", type=float, default=None)
    parser.add_argument("--train-prompts", type=int, default=None)
    parser.add_argument("--images-per-prompt", type=int, default=None)
    parser.add_argument("--test-prompts", type=int, default=None)
    parser.add_argument("--eval-images", type=int, default=None, help="evaluation seeds/prompt")
    parser.add_argument("--reward-steps", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="DPO optimizer steps")
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=None, help="pairs per DPO step")
    parser.add_argument("--rl-steps", type=int, default=None, help="train_rl steps")
    parser.add_argument("--rl-lr", type=float, default=None, help="train_rl learning rate")
    parser.add_argument("--rl-kl", type=float, default=None, help="train_rl kl_coef")
    parser.add_argument(
        "--rl-set",
        action="append",
        default=[],
        type=key_value,
        metavar="KEY=VALUE",
        help="any other train_rl param (JSON value), e.g. eta=0.3 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a reduced loop (smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure as JSON")
    return parser.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> list[LoopConfig]:
    names: list[str] = []
    for name in args.preference or ["all"]:
        names += list(PREFERENCES) if name == "all" else [name]
    sizes = given(
        (
            ("votes", args.votes),
            ("flip_noise", args.flip_noise),
            ("train_prompts", args.train_prompts),
            ("images_per_prompt", args.images_per_prompt),
            ("test_prompts", args.test_prompts),
            ("eval_images_per_prompt", args.eval_images),
            ("reward_steps", args.reward_steps),
        )
    )
    dpo = given(
        (
            ("steps", args.steps),
            ("beta", args.beta),
            ("learning_rate", args.lr),
            ("lora_rank", args.rank),
            ("batch_size", args.batch),
        )
    )
    rl = {
        **given((("steps", args.rl_steps), ("learning_rate", args.rl_lr), ("kl_coef", args.rl_kl))),
        **dict(args.rl_set),
    }
    methods = tuple(dict.fromkeys(args.method or ["dpo_votes"]))
    configs = []
    for name in dict.fromkeys(names):
        config = quick_config(name) if args.quick else LoopConfig(preference=name)
        configs.append(
            replace(
                config,
                seed=args.seed,
                methods=methods,
                dpo={**config.dpo, **dpo},
                rl={**config.rl, **rl},
                **sizes,
            )
        )
    return configs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = configs_from_args(args)
    results: list[dict[str, Any]] = []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="prefloop-alignment-") as tmp:
        start = time.perf_counter()
        with Stack(Path(tmp)) as stack:
            startup = time.perf_counter() - start
            print(f"platform up in {startup:.0f} s", flush=True)
            for config in configs:
                result = run_loop(stack, config, log=lambda line: print(line, flush=True))
                result["platform_startup_seconds"] = startup
                results.append(result)
                if args.json is not None:
                    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(format_tables(results))
    for method in dict.fromkeys(m for c in configs for m in c.methods):
        ran = [r for r in results if r["methods"][method]["status"] == "ran"]
        reached = [r["preference"] for r in ran if all(goals(r, method).values())]
        print(
            f"{method}: every goal met for {len(reached)} of {len(ran)} preferences"
            f"{': ' + ', '.join(reached) if reached else ''}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
