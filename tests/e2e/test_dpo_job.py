"""train_dpo through a real worker on the toy model: SIGKILL mid-run, resume, a loadable adapter."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import numpy as np
import pytest

from tests.factories import create_toy_project, run_stack_job, vote_for_larger_shape
from tests.support import Stack, bearer, wait_for, wait_job
from worker.toy.world import sample_prompts


@pytest.fixture(scope="module")
def voted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int, int]]:
    tmp = tmp_path_factory.mktemp("dpo")
    with Stack(tmp) as stack:
        prompts = [{"text": t} for t in sample_prompts(10, seed=3)]
        pid, mid = create_toy_project(stack, "dpo", prompts, {"steps": 8, "scheduler": "ddim"})
        generate = {"model_ids": [mid], "images_per_prompt": 3}
        assert run_stack_job(stack, pid, "generate", generate, 240)["status"] == "succeeded"
        token = stack.post(
            f"/api/v1/projects/{pid}/annotators", {"email": "sim@example.com"}
        ).json()["token"]
        assert vote_for_larger_shape(stack, pid, token, 30) >= 10
        yield stack, pid, mid


@pytest.mark.slow
def test_killed_dpo_job_resumes_and_its_adapter_loads(voted: tuple[Stack, int, int]) -> None:
    stack, pid, mid = voted
    created = stack.post(
        f"/api/v1/projects/{pid}/jobs",
        {
            "kind": "train_dpo",
            "params": {
                "model_id": mid,
                "steps": 30,
                "checkpoint_every": 5,
                "batch_size": 4,
                "lora_rank": 4,
                "beta": 500,
                "learning_rate": 1e-3,
                "closed_loop": False,
            },
        },
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]

    def last_step() -> int:
        loss = stack.get(f"/api/v1/jobs/{job_id}").json()["metrics"].get("loss", [])
        return int(loss[-1][0]) if loss else 0

    wait_for(lambda: last_step() >= 12, 240, interval=0.2, what="training past step 12")
    stack.workers[-1].kill(signal.SIGKILL)
    killed_at = last_step()
    stack.start_worker()
    job = wait_job(stack.client, job_id, {}, 300)  # type: ignore[arg-type]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    resumed = [
        int(m.group(1))
        for line in job["log"]
        if (m := re.search(r"resuming from checkpoint at step (\d+)", line))
    ]
    assert resumed and killed_at - 5 <= resumed[0] <= killed_at
    # One point per step, 1..30: the resumed run continued from its checkpoint's step.
    steps = [int(s) for s, _ in job["metrics"]["loss"]]
    assert steps == list(range(1, 31))
    assert {
        "implicit_acc",
        "model_err_w",
        "model_err_l",
        "ref_err_w",
        "ref_err_l",
        "grad_norm",
        "lr",
    } <= set(job["metrics"])
    # The project has no val prompts: a stable tenth of the train prompts is held out and
    # checked at every checkpoint, across the resumption too.
    assert [int(s) for s, _ in job["metrics"]["val_implicit_acc"]] == list(range(5, 31, 5))
    assert {"val_reward_margin", "val_loss"} <= set(job["metrics"])
    assert job["result"]["val_pairs"] >= 1

    child_id = job["result"]["model_id"]
    models = {m["id"]: m for m in stack.get(f"/api/v1/projects/{pid}/models").json()}
    child = models[child_id]
    assert child["parent_id"] == mid and child["produced_by_job_id"] == job_id
    assert child["adapter"] == job["result"]["output"]

    # Plain diffusers: a freshly loaded toy pipeline changes its output with the adapter.
    import torch
    from diffusers import StableDiffusionPipeline

    from worker.toy import resolve_toy

    pipe = StableDiffusionPipeline.from_pretrained(resolve_toy("toy"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def sample() -> np.ndarray:
        g = torch.Generator().manual_seed(0)
        return np.asarray(
            pipe("a large red circle", num_inference_steps=8, generator=g, output_type="np").images[
                0
            ]
        )

    before = sample()
    pipe.load_lora_weights(child["adapter"])
    after = sample()
    assert np.abs(after - before).max() > 1e-3


def test_train_dpo_params_refused_at_creation(client, make_user) -> None:  # type: ignore[no-untyped-def]
    _, token = make_user("lead")
    h = bearer(token)
    pid = client.post("/api/v1/projects", json={"name": "p"}, headers=h).json()["id"]
    mid = client.post(
        f"/api/v1/projects/{pid}/models", json={"name": "m", "base": "toy"}, headers=h
    ).json()["id"]

    def create(**params: object) -> tuple[int, str]:
        r = client.post(
            f"/api/v1/projects/{pid}/jobs", json={"kind": "train_dpo", "params": params}, headers=h
        )
        return r.status_code, str(r.json().get("detail"))

    status, detail = create(model_id=mid, beta=0)
    assert status == 422 and "beta" in detail
    status, detail = create(model_id=mid, beta=-5)
    assert status == 422 and "beta" in detail
    status, detail = create(model_id=987654)
    assert status == 422 and "987654" in detail
    status, detail = create(model_id=mid)
    assert status == 422 and "no votes" in detail
