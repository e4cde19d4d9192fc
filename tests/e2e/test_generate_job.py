"""`generate` jobs through a real worker on Postgres + Redis: kill and retry, cancel, bad model."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack, wait_for, wait_job
from tests.tiny_pipelines import build_tiny_sd
from worker.seeds import prompt_seeds


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("generate")
    with Stack(tmp) as running:
        running.model_path = build_tiny_sd(tmp / "data" / "models" / "tiny-sd")  # type: ignore[attr-defined]
        yield running


def _project(stack: Stack, prompts: int, base: str, name: str) -> tuple[int, int]:
    pid = stack.post("/api/v1/projects", {"name": name}).json()["id"]
    texts = [{"text": f"a red circle number {i}"} for i in range(prompts)]
    assert stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": texts}).status_code == 201
    model = stack.post(
        f"/api/v1/projects/{pid}/models",
        {"name": "tiny", "base": base, "params": {"steps": 4, "scheduler": "ddim"}},
    )
    assert model.status_code == 201, model.text
    return pid, model.json()["id"]


def _images(stack: Stack, pid: int) -> list[dict]:  # type: ignore[type-arg]
    return stack.get(f"/api/v1/projects/{pid}/images").json()


def _generate(stack: Stack, pid: int, mid: int, **params: object) -> int:
    body = {"kind": "generate", "params": {"model_ids": [mid], "make_pairs": False} | params}
    response = stack.post(f"/api/v1/projects/{pid}/jobs", body)
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


@pytest.mark.slow
def test_killed_generate_job_continues_without_duplicates(stack: Stack) -> None:
    pid, mid = _project(stack, 20, str(stack.model_path), "kill")  # type: ignore[attr-defined]
    job_id = _generate(stack, pid, mid, images_per_prompt=2, batch_size=2)
    wait_for(
        lambda: 0.1 < stack.get(f"/api/v1/jobs/{job_id}").json()["progress"] < 0.9,
        120,
        interval=0.1,
        what="progress between 10 and 90 %",
    )
    stack.workers[-1].kill(signal.SIGKILL)
    before = len(_images(stack, pid))
    assert 0 < before < 40
    stack.start_worker()
    job = wait_job(stack.client, job_id, {}, 180)  # type: ignore[arg-type]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    images = _images(stack, pid)
    keys = [(i["prompt_id"], i["seed"]) for i in images]
    assert len(images) == 40 and len(set(keys)) == 40
    # The second attempt skipped what the first had stored.
    assert (
        job["result"]["skipped"] >= before
        and job["result"]["images"] == 40 - job["result"]["skipped"]
    )
    # Each prompt its own two training seeds.
    wanted = {(i["prompt_id"], s) for i in images for s in prompt_seeds(i["prompt_id"], 2)}
    assert set(keys) == wanted


@pytest.mark.slow
def test_cancelled_generate_job_stops_between_batches(stack: Stack) -> None:
    pid, mid = _project(stack, 40, str(stack.model_path), "cancel")  # type: ignore[attr-defined]
    job_id = _generate(stack, pid, mid, images_per_prompt=2, batch_size=1)
    wait_for(
        lambda: stack.get(f"/api/v1/jobs/{job_id}").json()["progress"] > 0,
        120,
        interval=0.1,
        what="first images",
    )
    assert stack.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    job = wait_job(stack.client, job_id, {}, 60)  # type: ignore[arg-type]
    assert job["status"] == "cancelled", job
    stored = len(_images(stack, pid))
    assert 0 < stored < 80
    time.sleep(2)
    assert len(_images(stack, pid)) == stored, "images kept coming after the cancel"


@pytest.mark.slow
def test_unknown_model_path_fails_with_a_clear_error_and_no_retry(
    stack: Stack, tmp_path: Path
) -> None:
    # A path outside the model roots is refused at registration; a hub id is only tried by the
    # worker (offline here), which fails once, naming it.
    refused = stack.post(
        f"/api/v1/projects/{_project(stack, 1, 'toy', 'roots')[0]}/models",
        {"name": "outside", "base": str(tmp_path / "no-such-model")},
    )
    assert refused.status_code == 422 and "not an allowed model source" in refused.text
    missing = "prefloop-test/no-such-model"
    pid, mid = _project(stack, 2, missing, "missing")
    job = wait_job(stack.client, _generate(stack, pid, mid), {}, 60)  # type: ignore[arg-type]
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert "cannot load model" in job["error"] and missing in job["error"]


def test_generate_params_are_checked_at_creation(client, make_user) -> None:  # type: ignore[no-untyped-def]
    from tests.support import bearer

    _, token = make_user("lead")
    h = bearer(token)
    pid = client.post("/api/v1/projects", json={"name": "p"}, headers=h).json()["id"]
    bad = client.post(
        f"/api/v1/projects/{pid}/jobs",
        json={"kind": "generate", "params": {"model_ids": [999999]}},
        headers=h,
    )
    assert bad.status_code == 422 and "999999" in str(bad.json()["detail"])
    mid = client.post(
        f"/api/v1/projects/{pid}/models", json={"name": "m", "base": "toy"}, headers=h
    ).json()["id"]
    seeds = client.post(
        f"/api/v1/projects/{pid}/jobs",
        json={
            "kind": "generate",
            "params": {"model_ids": [mid], "images_per_prompt": 2, "seeds": [1]},
        },
        headers=h,
    )
    assert seeds.status_code == 422 and "seeds" in str(seeds.json()["detail"])
    empty = client.post(
        f"/api/v1/projects/{pid}/jobs", json={"kind": "generate", "params": {}}, headers=h
    )
    assert empty.status_code == 422 and "model_ids" in str(empty.json()["detail"])


@pytest.mark.slow
def test_generate_job_tops_up_gold_pairs_to_the_rate(stack: Stack) -> None:
    import math

    pid = stack.post(
        "/api/v1/projects", {"name": "gold", "settings": {"gold_rate": 0.5}}
    ).json()["id"]
    texts = [{"text": f"a blue square number {i}"} for i in range(3)]
    assert stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": texts}).status_code == 201
    model = stack.post(
        f"/api/v1/projects/{pid}/models",
        {"name": "tiny", "base": str(stack.model_path), "params": {"steps": 4}},  # type: ignore[attr-defined]
    )
    job_id = _generate(stack, pid, model.json()["id"], images_per_prompt=2, make_pairs=True)
    job = wait_job(stack.client, job_id, {}, 180)  # type: ignore[arg-type]
    assert job["status"] == "succeeded", job
    made, gold = job["result"]["pairs"], job["result"]["gold_pairs"]
    assert made > 0 and gold == math.ceil(0.5 * made)
    # The degraded copies are stored images of the project, next to the generated ones.
    images = _images(stack, pid)
    assert len(images) == 3 * 2 + gold
    # A lead asking for more gets none: the project is at its rate.
    again = stack.post(f"/api/v1/projects/{pid}/gold", {})
    assert again.status_code == 200 and again.json() == {
        "created": 0, "pair_ids": [], "gold_pairs": gold
    }


@pytest.mark.slow
@pytest.mark.long(55)
def test_one_bad_model_ends_partial_with_pairs_for_the_good_ones(stack: Stack) -> None:
    # The lead launches before the checks ran (no worker yet): the bad model is still pending.
    stack.workers[-1].stop()
    pid = stack.post("/api/v1/projects", {"name": "partial"}).json()["id"]
    texts = [{"text": f"a green triangle number {i}"} for i in range(3)]
    assert stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": texts}).status_code == 201
    missing = "prefloop-test/no-such-model"
    ids = []
    tiny = str(stack.model_path)  # type: ignore[attr-defined]
    for name, base, steps in (("tiny-a", tiny, 3), ("missing", missing, 3), ("tiny-b", tiny, 4)):
        made = stack.post(f"/api/v1/projects/{pid}/models",
                          {"name": name, "base": base, "params": {"steps": steps}})  # fmt: skip
        assert made.status_code == 201 and made.json()["check_status"] == "pending"
        ids.append(made.json()["id"])
    job_id = _generate(stack, pid, ids[0], model_ids=ids, images_per_prompt=1, make_pairs=True)
    stack.start_worker()
    job = wait_job(stack.client, job_id, {}, 240)  # type: ignore[arg-type]
    assert job["status"] == "partial", job
    result = job["result"]
    assert result["images"] == 6 and result["pairs"] == 3
    assert [f["model_id"] for f in result["failed_models"]] == [ids[1]]
    assert missing in job["error"] and "1 of 3 models failed" in job["error"]
    images = _images(stack, pid)
    assert {i["model_id"] for i in images} == {ids[0], ids[2]}
    # The checks ran too: the good models are ready, the bad one failed with the loader's words.
    def checked() -> list[dict]:  # type: ignore[type-arg]
        models = stack.get(f"/api/v1/projects/{pid}/models").json()
        return models if all(m["check_status"] != "pending" for m in models) else []

    models = {m["id"]: m for m in wait_for(checked, 120, what="the model checks")}
    assert [models[i]["check_status"] for i in ids] == ["ready", "failed", "ready"]
    assert "cannot load model" in models[ids[1]]["check_error"]
    # From now on the failed model cannot be picked.
    again = stack.post(f"/api/v1/projects/{pid}/jobs",
                       {"kind": "generate", "params": {"model_ids": ids}})  # fmt: skip
    assert again.status_code == 409 and "failed its check" in again.text
