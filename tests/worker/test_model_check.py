"""The model check and a generate job's per-model failures, through the job runner (in-process)
on committed Postgres data: a loadable model becomes `ready`, a missing one `failed` with the
loader's reason, and a generate job with one bad model ends `partial` with the good ones paired."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.models import Job
from app.jobs.service import create_job
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from tests.tiny_pipelines import build_tiny_sd
from worker import runner

MISSING = "prefloop-test/no-such-model"


@pytest.fixture()
def project(pg_url: str, sent_jobs, tmp_path: Path) -> Iterator[dict]:  # type: ignore[no-untyped-def,type-arg]
    tiny = str(build_tiny_sd(tmp_path / "tiny-sd"))
    with session_scope() as s:
        project = Project(name=f"check-{uuid.uuid4().hex[:6]}", description="", settings={})
        s.add(project)
        s.flush()
        s.add_all(
            Prompt(project_id=project.id, text=text, split="train", tags=[])
            for text in ("a red circle", "a blue square")
        )
        params = {"steps": 2, "scheduler": "ddim"}
        models = [
            ModelVersion(project_id=project.id, name=name, base=base, params=params,
                         evaluation={}, check_status="pending")  # fmt: skip
            for name, base in (("tiny-a", tiny), ("missing", MISSING), ("tiny-b", tiny))
        ]
        s.add_all(models)
        s.flush()
        ids = {"project": project.id, **{m.name: m.id for m in models}}
    yield ids
    with session_scope() as s:
        s.delete(s.get(Project, ids["project"]))


def _run(kind: str, project_id: int, params: dict) -> tuple[str, Job]:  # type: ignore[type-arg]
    with session_scope() as s:
        job_id = create_job(s, kind=kind, params=params, project_id=project_id,
                            created_by_id=None, max_attempts=3).id  # fmt: skip
    status = runner.execute(job_id)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
    return status, job


@pytest.mark.slow
def test_the_check_marks_models_ready_or_failed_with_the_reason(project: dict) -> None:  # type: ignore[type-arg]
    status, job = _run("check_model", project["project"], {"model_id": project["tiny-a"]})
    assert status == "succeeded", job.error
    assert job.result is not None and job.result["check_status"] == "ready"
    status, job = _run("check_model", project["project"], {"model_id": project["missing"]})
    assert status == "failed" and job.attempts == 1
    assert "cannot load model" in (job.error or "") and MISSING in (job.error or "")
    with session_scope() as s:
        good = s.get(ModelVersion, project["tiny-a"])
        bad = s.get(ModelVersion, project["missing"])
        assert good is not None and good.check_status == "ready" and good.check_error is None
        assert bad is not None and bad.check_status == "failed"
        assert "cannot load model" in (bad.check_error or "")
        # Nothing of the check is kept as project data.
        assert s.scalar(select(Image.id).where(Image.project_id == project["project"])) is None


@pytest.mark.slow
def test_generate_with_one_bad_model_ends_partial_with_the_good_ones_paired(
    project: dict,  # type: ignore[type-arg]
) -> None:
    wanted = [project["tiny-a"], project["missing"], project["tiny-b"]]
    params = {"model_ids": wanted, "images_per_prompt": 1, "make_pairs": True}
    status, job = _run("generate", project["project"], params)
    assert status == "partial" and job.status == "partial"
    result = job.result or {}
    assert result["images"] == 4  # 2 prompts × 2 good models
    assert result["failed_models"] == [
        {"model_id": project["missing"], "reason": result["failed_models"][0]["reason"]}
    ]
    assert "cannot load model" in result["failed_models"][0]["reason"]
    assert "1 of 3 models failed" in (job.error or "") and MISSING in (job.error or "")
    with session_scope() as s:
        made = {m for (m,) in s.execute(
            select(Image.model_version_id).where(Image.project_id == project["project"])
        )}  # fmt: skip
        assert made == {project["tiny-a"], project["tiny-b"]}
        pairs = list(s.scalars(select(Pair).where(Pair.project_id == project["project"])))
        # One eval pair per prompt, tiny-a against tiny-b.
        assert result["pairs"] == len(pairs) == 2 and {p.purpose for p in pairs} == {"eval"}
    # With every model bad, the job fails outright, naming the reason.
    status, job = _run("generate", project["project"], {"model_ids": [project["missing"]]})
    assert status == "failed" and "cannot load model" in (job.error or "")
