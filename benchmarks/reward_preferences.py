"""Can the toy reward model see each simulated preference? Test accuracy per preference.

For every preference of `worker/toy/preferences.py`: ~2 000 noise-free votes at the
preference's just-noticeable tolerance (imperceptible pairs are ties, dropped as under the
"drop" policy) on 1 000 prompts, the spatial toy reward model trained with early stopping on a
prompt-disjoint split, and its tie-aware accuracy on the held-out test prompts. The recipe is
`worker.toy.reward_data.train_on_preference`, which the tests use for the preferences they
keep (`left`, `prompted_position`); this script runs the whole list, a CPU minute each.

    python benchmarks/reward_preferences.py [--preferences left,brighter] [--json out.json]

Goal (issue: "a reward model that sees what annotators see"): ≥ 0.9 on every preference.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from worker.toy.preferences import PREFERENCES
from worker.toy.reward_data import train_on_preference

GOAL = 0.9


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preferences", default=",".join(PREFERENCES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.preferences.split(",") if n]
    unknown = sorted(set(names) - set(PREFERENCES))
    if unknown:
        parser.error(f"unknown preferences {unknown}; known: {', '.join(PREFERENCES)}")

    rows = []
    print(f"{'preference':<18} {'test acc':>8} {'pairs':>6} {'best step':>9} {'CPU s':>6}  goal")
    for name in names:
        cpu, wall = _cpu_seconds(), time.perf_counter()
        result = train_on_preference(name)
        row = {
            "preference": name,
            "test_accuracy": result.test_accuracy,
            "test_pairs": result.n_test,
            "best_step": result.best_step,
            "steps_run": result.steps_run,
            "cpu_seconds": _cpu_seconds() - cpu,
            "wall_seconds": time.perf_counter() - wall,
        }
        rows.append(row)
        met = "met" if result.test_accuracy >= GOAL else "NOT met"
        print(
            f"{name:<18} {result.test_accuracy:>8.3f} {result.n_test:>6} {result.best_step:>9} "
            f"{row['cpu_seconds']:>6.0f}  ≥ {GOAL}: {met}",
            flush=True,
        )
    met_all = sum(r["test_accuracy"] >= GOAL for r in rows)
    print(f"summary: {met_all} of {len(rows)} preferences at ≥ {GOAL}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
