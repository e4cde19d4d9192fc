"""Services refuse with domain errors, never HTTP ones; the web layer picks the status."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from app.core.errors import Conflict, DomainError, Invalid, NotFound, http_status
from app.generators.schemas import ModelCreate
from app.generators.service import ModelNameTaken, UnknownParent, register_model
from app.jobs.service import JobStateError, create_job, request_cancel, retry_job
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project


def test_statuses_of_the_error_kinds() -> None:
    assert [http_status(e("x")) for e in (NotFound, Conflict, Invalid, DomainError)] == [
        404,
        409,
        422,
        400,
    ]


def test_model_and_job_services_raise_domain_errors(db, make_user) -> None:  # type: ignore[no-untyped-def]
    lead, _ = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    register_model(db, project=project, data=ModelCreate(name="m", base="toy"))
    with pytest.raises(ModelNameTaken) as taken:
        register_model(db, project=project, data=ModelCreate(name="m", base="toy"))
    with pytest.raises(UnknownParent) as parent:
        register_model(db, project=project, data=ModelCreate(name="n", base="toy", parent_id=10**6))
    assert http_status(taken.value) == 409 and http_status(parent.value) == 422

    job = create_job(
        db, kind="fit_ratings", params={}, project_id=project.id, created_by_id=None, max_attempts=1
    )
    with pytest.raises(JobStateError) as running:
        retry_job(db, job)  # only failed or cancelled jobs
    request_cancel(db, job)
    with pytest.raises(JobStateError) as finished:
        request_cancel(db, job)
    for exc in (running.value, finished.value):
        assert not isinstance(exc, HTTPException) and http_status(exc) == 409
