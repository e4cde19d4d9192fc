"""JSON API for jobs: create, read, cancel, retry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.deps import AdminUser, CurrentUser, get_project_for
from app.jobs import service
from app.jobs.models import Job
from app.jobs.schemas import JobCreate, JobCreated
from app.projects.lifecycle import refuse_archived
from app.users.models import User

router = APIRouter(prefix="/api/v1", tags=["jobs"])


def _create(session: Session, body: JobCreate, project_id: int | None, user: User) -> JobCreated:
    try:
        job = service.create_job(
            session,
            kind=body.kind,
            params=body.params,
            project_id=project_id,
            created_by_id=user.id,
            max_attempts=get_settings().job_max_attempts,
        )
    except service.JobParamsError as exc:
        raise HTTPException(422, exc.errors) from None
    record(
        session,
        actor=user,
        action="job.launch",
        target=f"job:{job.id}",
        project_id=project_id,
        details={"kind": job.kind},
    )
    return JobCreated(id=job.id, status=job.status)


@router.post("/projects/{project_id}/jobs", status_code=202, response_model=JobCreated)
def create_project_job(
    project_id: int, body: JobCreate, session: SessionDep, user: CurrentUser
) -> JobCreated:
    project = get_project_for(session, user, project_id, lead=True)
    refuse_archived(project)
    return _create(session, body, project_id, user)


@router.post("/jobs", status_code=202, response_model=JobCreated)
def create_system_job(body: JobCreate, session: SessionDep, user: AdminUser) -> JobCreated:
    """Jobs outside any project (diagnostics such as `selftest`); admins only."""
    return _create(session, body, None, user)


def job_for(session: Session, user: User, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    if job.project_id is None:
        if user.role != "admin":
            raise HTTPException(403, "only admins can see system jobs")
    else:
        get_project_for(session, user, job.project_id, lead=True)
    return job


@router.get("/jobs/{job_id}")
def get_job(job_id: int, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    return service.to_public(job_for(session, user, job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202)
def cancel_job(job_id: int, session: SessionDep, user: CurrentUser) -> JSONResponse:
    job = job_for(session, user, job_id)
    service.request_cancel(session, job)
    record(session, actor=user, action="job.cancel", target=f"job:{job.id}",
           project_id=job.project_id)  # fmt: skip
    return JSONResponse({"id": job.id, "status": job.status}, status_code=202)


@router.post("/jobs/{job_id}/retry", status_code=202, response_model=JobCreated)
def retry_job(job_id: int, session: SessionDep, user: CurrentUser) -> JobCreated:
    job = job_for(session, user, job_id)
    service.retry_job(session, job)
    record(session, actor=user, action="job.retry", target=f"job:{job.id}",
           project_id=job.project_id)  # fmt: skip
    return JobCreated(id=job.id, status=job.status)
