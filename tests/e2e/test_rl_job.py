"""train_rl through a real worker on the toy model: time-limit chunks, resume, guard, child."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.support import Stack, bearer, wait_for, wait_job
from worker.toy.world import extract_area_fraction, sample_prompts


def _vote_by_area(stack: Stack, pid: int, token: str, limit: int) -> int:
    """Simulated annotator: the image with the larger shape wins."""
    client = stack.client
    assert client is not None
    votes = 0
    while votes < limit:
        served = client.get(f"/api/v1/projects/{pid}/pairs/next", headers=bearer(token))
        if served.status_code == 204:
            break
        pair = served.json()
        areas = []
        for side in ("left", "right"):
            png = client.get(pair[side]["url"], headers=bearer(token)).content
            areas.append(
                extract_area_fraction(np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")))
            )
        response = client.post(
            f"/api/v1/pairs/{pair['pair_id']}/votes",
            json={
                "choice": "left" if areas[0] >= areas[1] else "right",
                "left_image_id": pair["left"]["image_id"],
            },
            headers=bearer(token),
        )
        assert response.status_code == 201, response.text
        votes += 1
    return votes


def _run(stack: Stack, pid: int, kind: str, params: dict, timeout: float = 300) -> dict:
    created = stack.post(f"/api/v1/projects/{pid}/jobs", {"kind": kind, "params": params})
    assert created.status_code == 202, created.text
    return wait_job(stack.client, created.json()["id"], {}, timeout)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int, int]]:
    tmp = tmp_path_factory.mktemp("rl")
    with Stack(tmp) as stack:
        pid = stack.post(
            "/api/v1/projects",
            {"name": "rl", "settings": {"votes_per_pair": 1, "votes_per_second": 100}},
        ).json()["id"]
        texts = sample_prompts(12, seed=4)
        prompts = [{"text": t, "split": "train"} for t in texts[:8]]
        prompts += [{"text": t, "split": "val"} for t in texts[8:]]
        assert (
            stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": prompts}).status_code == 201
        )
        mid = stack.post(
            f"/api/v1/projects/{pid}/models",
            {"name": "toy", "base": "toy", "params": {"steps": 6, "scheduler": "ddim"}},
        ).json()["id"]
        generated = _run(stack, pid, "generate", {"model_ids": [mid], "images_per_prompt": 3})
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

    token = stack.post(f"/api/v1/projects/{pid}/annotators", {"email": "s@example.com"}).json()[
        "token"
    ]
    assert _vote_by_area(stack, pid, token, 30) >= 10
    reward_ids = []
    for seed in (0, 1):  # two independently initialised reward models: reward and guard
        job = _run(stack, pid, "train_reward", {"steps": 30, "seed": seed})
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
    job = _run(stack, pid, "train_rl", params)
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
