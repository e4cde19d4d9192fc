"""A job's live page: status, progress and log, refreshed by htmx polling."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.core.db import SessionDep
from app.core.deps import PageUser
from app.core.web import is_htmx, render
from app.jobs.models import TERMINAL
from app.jobs.routes import job_for

router = APIRouter(include_in_schema=False)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: int, request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    job = job_for(session, user, job_id)
    template = "partials/job_status.html" if is_htmx(request) else "pages/job.html"
    return render(request, template, {"job": job, "finished": job.status in TERMINAL})
