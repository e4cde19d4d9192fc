"""train_rl through a real worker on the toy model: time-limit chunks, resume, guard, child."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.factories import create_toy_project, run_stack_job, vote_for_larger_shape
from tests.support import Stack, wait_for, wait_job
from worker.toy.world import sample_prompts


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int, int]]:
    tmp = tmp_path_factory.mktemp("rl")
    with Stack(tmp) as stack:
        texts = sample_prompts(12, seed=4)
        prompts = [{"text": t, "split": "train"} for t in texts[:8]]
        prompts += [{"text": t, "split": "val"} for t in texts[8:]]
        pid, mid = create_toy_project(stack, "rl", prompts, {"steps": 6, "scheduler": "ddim"})
        generate = {"model_ids": [mid], "images_per_prompt": 3}
        generated = run_stack_job(stack, pid, "generate", generate)
        assert generated["status"] == "succeeded"
        yield stack, pid, mid


@pytest.mark.slow
def test_rl_job_refuses_bad_params_then_trains_in_chunks_and_enters_the_arena(
    project: tuple[Stack, int, int],
) -> None:
    stack, pid, mid = project
    # No reward model yet: a clear 422 naming the problem.
    refused = stack.post(
        f"/api/v1/projects/{pid}/jobs", {"kind": "train_rl", "params": {"model_id": mid}}
    )
    assert refused.status_code == 422 and "no reward model" in refused.text
    bad = stack.post(
        f"/api/v1/projects/{pid}/jobs",
        {"kind": "train_rl", "params": {"model_id": mid, "fidelity_weight": 1.0,
                                        "reward_weight": 0, "train_timesteps": 20}},
    )  # fmt: skip
    assert bad.status_code == 422 and "sample_steps" in bad.text
    # An unknown objective lists the known ones.
    unknown = stack.post(
        f"/api/v1/projects/{pid}/jobs",
        {"kind": "train_rl", "params": {"model_id": mid, "objective": "evolution"}},
    )
    assert unknown.status_code == 422 and "reward_backprop" in unknown.text

    token = stack.post(f"/api/v1/projects/{pid}/annotators", {"email": "s@example.com"}).json()[
        "token"
    ]
    assert vote_for_larger_shape(stack, pid, token, 30) >= 10
    reward_ids = []
    for seed in (0, 1):  # two independently initialised reward models: reward and guard
        job = run_stack_job(stack, pid, "train_reward", {"steps": 30, "seed": seed})
        assert job["status"] == "succeeded", job
        reward_ids.append(job["result"]["reward_model_id"])

    params = {
        "model_id": mid,
        "steps": 3,
        "prompts_per_step": 2,
        "group_size": 2,
        "sample_steps": 4,
        "train_timesteps": 2,
        "eval_every": 1,
        "probe_prompts": 2,
        "checkpoint_every": 1,
        "learning_rate": 1e-3,
        # Two probe prompts are too few for the guard's default limits to mean anything.
        "max_fidelity_drop": 0.5,
        "max_reward_divergence": 100.0,
        # Each run stops after one step: three runs, each resuming the last.
        "time_limit_minutes": 0.001,
    }
    job = run_stack_job(stack, pid, "train_rl", params)
    assert job["status"] == "succeeded", job
    # Chunks that made progress do not use up attempts (a time limit is not a failure).
    assert job["attempts"] == 1
    assert sum("resuming from checkpoint" in line for line in job["log"]) == 2
    metrics = job["metrics"]
    for name in ("reward_mean", "reward_std", "kl", "clip_fraction", "advantage_std"):
        assert [int(s) for s, _ in metrics[name]] == [1, 2, 3], name
    assert [int(s) for s, _ in metrics["probe_fidelity"]] == [0, 1, 2, 3]
    assert [int(s) for s, _ in metrics["probe_guard"]] == [0, 1, 2, 3]
    result = job["result"]
    assert result["reward_model_id"] == reward_ids[1]  # the latest trains
    assert result["guard_reward_model_id"] == reward_ids[0]  # the other one watches
    assert result["probe_source"] == "val" and result["steps"] == 3
    assert result["stopped_by_guard"] is False

    models = {m["id"]: m for m in stack.get(f"/api/v1/projects/{pid}/models").json()}
    child = models[result["model_id"]]
    assert child["parent_id"] == mid and child["produced_by_job_id"] == job["id"]
    assert child["adapter"] == result["output"]
    arena = wait_job(stack.client, result["arena_job_id"], {}, 300)  # type: ignore[arg-type]
    assert arena["status"] == "succeeded", arena
    images = stack.get(f"/api/v1/projects/{pid}/images?model_id={child['id']}&limit=1000").json()
    # The child generated from its saved adapter (arena pairs, and the evaluation's images).
    assert len(images) >= 8 * 2 and {i["model_id"] for i in images} == {child["id"]}
    assert "evaluate_job_id" in result


@pytest.mark.slow
def test_rl_job_cancel(project: tuple[Stack, int, int]) -> None:
    stack, pid, mid = project
    created = stack.post(
        f"/api/v1/projects/{pid}/jobs",
        # The recogniser's fidelity term alone (no reward model yet), by the default objective:
        # reward backpropagation through the toy model's chains.
        {"kind": "train_rl", "params": {"model_id": mid, "steps": 500, "prompts_per_step": 2,
                                        "reward_weight": 0, "fidelity_weight": 1,
                                        "group_size": 2, "sample_steps": 4,
                                        "train_timesteps": 2}},
    )  # fmt: skip
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    def started() -> bool:
        return bool(stack.get(f"/api/v1/jobs/{job_id}").json()["metrics"].get("reward_mean"))

    wait_for(started, 300, interval=0.5, what="the first RL step")
    assert stack.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_job(stack.client, job_id, {}, 120)  # type: ignore[arg-type]
    assert job["status"] == "cancelled"
