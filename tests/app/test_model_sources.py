"""A model's `base` and `adapter` are confined: toy names, hub ids, this project's own models and
jobs by id, or directories under PREFLOOP_MODEL_ROOTS; refusals say nothing about the disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.generators.models import ModelVersion
from app.jobs.service import create_job
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project
from tests.support import bearer


@pytest.fixture()
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "models"
    (root / "sd").mkdir(parents=True)
    (tmp_path / "outside" / "sd").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path / "outside")
    monkeypatch.setenv("PREFLOOP_MODEL_ROOTS", str(root))
    get_settings.cache_clear()
    yield root
    monkeypatch.delenv("PREFLOOP_MODEL_ROOTS")
    get_settings.cache_clear()


def _register(client: Any, token: str, project_id: int, **body: str) -> Any:
    return client.post(
        f"/api/v1/projects/{project_id}/models",
        json={"name": f"m{abs(hash(tuple(body.items())))}", **body},
        headers=bearer(token),
    )


def test_paths_outside_the_roots_are_refused_alike(
    client: Any, db: Session, make_user: Any, roots: Path, tmp_path: Path
) -> None:
    lead, token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    for ok in ("toy", "toy-v0", "org/name", "stabilityai/sd-turbo", str(roots / "sd")):
        answer = _register(client, token, project.id, base=ok)
        assert answer.status_code == 201, (ok, answer.text)
        assert answer.json()["base"] == ok
    refused = [
        "/etc/passwd",  # a file
        "/etc",  # a directory outside the roots
        "/no/such/dir",  # missing
        str(tmp_path / "outside" / "sd"),
        str(roots / "escape" / "sd"),  # a symlink out of the roots
        str(roots / ".." / "outside" / "sd"),
        "~root",
        "~/models",
        "../../etc",
        "./sd",
        "sd",  # relative
        "a/b/c",
        "org/..",
        str(get_settings().resolved_media_dir),
    ]
    details = set()
    for bad in refused:
        answer = _register(client, token, project.id, base=bad)
        assert answer.status_code == 422, (bad, answer.text)
        details.add(answer.json()["detail"])
        adapter = _register(client, token, project.id, base="toy", adapter=bad)
        assert adapter.status_code == 422, (bad, adapter.text)
        assert bad not in adapter.text
    # One message whatever the reason: nothing tells a missing path from a forbidden one.
    assert len(details) == 1, details
    assert "not an allowed model source" in details.pop()


def test_artifacts_of_a_job_serve_only_models_of_its_project(
    client: Any, db: Session, make_user: Any, roots: Path
) -> None:
    lead, token = make_user("lead")
    other, other_token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    elsewhere = create_project(db, data=ProjectCreate(name="q"), creator=other)
    job = create_job(
        db, kind="fit_ratings", params={}, project_id=project.id, created_by_id=lead.id,
        max_attempts=1,
    )
    adapter_dir = get_settings().resolved_media_dir / "jobs" / str(job.id) / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    child = ModelVersion(
        project_id=project.id,
        name="child",
        base="toy",
        adapter=str(adapter_dir),
        params={},
        produced_by_job_id=job.id,
    )
    db.add(child)
    db.commit()
    # The other project: not by path, not by job id, not by model id.
    for value in (str(adapter_dir), f"job:{job.id}", f"model:{child.id}"):
        answer = _register(client, other_token, elsewhere.id, base="toy", adapter=value)
        assert answer.status_code == 422, (value, answer.text)
        assert str(adapter_dir) not in answer.text
    answer = _register(client, other_token, elsewhere.id, base=f"model:{child.id}")
    assert answer.status_code == 422
    # Its own project refers to it by id.
    by_job = _register(client, token, project.id, base="toy", adapter=f"job:{job.id}")
    assert by_job.status_code == 201 and by_job.json()["adapter"] == str(adapter_dir)
    by_model = _register(client, token, project.id, base=f"model:{child.id}")
    assert by_model.status_code == 201, by_model.text
    assert by_model.json()["base"] == "toy" and by_model.json()["adapter"] == str(adapter_dir)
    # But not by path either: artifacts are reached by id only.
    raw = _register(client, token, project.id, base="toy", adapter=str(adapter_dir))
    assert raw.status_code == 422


def test_the_worker_refuses_stored_paths_outside_the_roots(
    roots: Path, tmp_path: Path
) -> None:
    from worker.generation import ModelLoadError, resolve_base

    for bad in (str(tmp_path / "outside" / "sd"), str(roots / "escape" / "sd")):
        with pytest.raises(ModelLoadError, match="not an allowed model source"):
            resolve_base(bad)
    # Inside the roots it goes on to the usual checks (no model_index.json here).
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_base(str(roots / "sd"))
