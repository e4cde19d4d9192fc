"""Creation-time checks of the amplification options: a clear 422 naming what is wrong."""

from __future__ import annotations

from typing import Any

from app.ratings.models import RewardModel
from tests.support import bearer


def _setup(client: Any, make_user: Any) -> tuple[dict[str, str], int, int]:
    _, token = make_user("lead")
    h = bearer(token)
    pid = client.post("/api/v1/projects", json={"name": "amp"}, headers=h).json()["id"]
    mid = client.post(
        f"/api/v1/projects/{pid}/models", json={"name": "m", "base": "toy"}, headers=h
    ).json()["id"]
    return h, pid, mid


def test_best_of_model_versions_need_a_reward_model_of_the_project(
    client: Any, make_user: Any, db: Any
) -> None:
    h, pid, mid = _setup(client, make_user)

    def register(name: str, params: dict[str, Any]) -> Any:
        return client.post(
            f"/api/v1/projects/{pid}/models",
            json={"name": name, "base": "toy", "params": params, "parent_id": mid},
            headers=h,
        )

    r = register("bo4", {"best_of": 4})
    assert r.status_code == 422 and "reward_model_id" in r.text
    r = register("bo4", {"best_of": 0, "reward_model_id": 1})
    assert r.status_code == 422 and "best_of" in r.text
    r = register("bo4", {"best_of": 4, "reward_model_id": 987654})
    assert r.status_code == 422 and "987654" in r.text

    other = client.post("/api/v1/projects", json={"name": "other"}, headers=h).json()["id"]
    foreign = RewardModel(project_id=other, version=1, backbone="toyconv", path="x", metrics={})
    mine = RewardModel(project_id=pid, version=1, backbone="toyconv", path="y", metrics={})
    db.add_all([foreign, mine])
    db.commit()
    r = register("bo4", {"best_of": 4, "reward_model_id": foreign.id})
    assert r.status_code == 422 and "not a reward model of this project" in r.text
    r = register("bo4", {"best_of": 4, "reward_model_id": mine.id, "steps": 8})
    assert r.status_code == 201, r.text
    assert r.json()["params"]["best_of"] == 4
    assert r.json()["params"]["reward_model_id"] == mine.id
    # A plain model keeps no policy keys.
    plain = client.get(f"/api/v1/projects/{pid}/models", headers=h).json()
    assert "best_of" not in next(m for m in plain if m["id"] == mid)["params"]


def test_amplification_jobs_refused_without_what_they_need(client: Any, make_user: Any) -> None:
    h, pid, mid = _setup(client, make_user)

    def create(kind: str, **params: object) -> tuple[int, str]:
        r = client.post(
            f"/api/v1/projects/{pid}/jobs", json={"kind": kind, "params": params}, headers=h
        )
        return r.status_code, str(r.json().get("detail"))

    status, detail = create("generate", model_ids=[mid], best_of=4)
    assert status == 422 and "no reward model yet" in detail
    status, detail = create("generate", model_ids=[mid], best_of=0)
    assert status == 422 and "best_of" in detail
    status, detail = create("train_dpo", model_id=mid, data="reward")
    assert status == 422 and "no reward model yet" in detail
    status, detail = create("train_dpo", model_id=mid, data="everything")
    assert status == 422 and "data" in detail
    status, detail = create("train_dpo", model_id=mid, reward_threshold=0.3)
    assert status == 422 and "reward_threshold" in detail
    status, detail = create("train_loop", model_id=mid)
    assert status == 422 and "no votes" in detail
    status, detail = create("train_loop", model_id=mid, rounds=0)
    assert status == 422 and "rounds" in detail
    status, detail = create("train_loop")
    assert status == 422 and "model_id" in detail
