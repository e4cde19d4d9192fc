"""The home page: the projects a person can work on."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.core.db import SessionDep
from app.core.deps import PageUser
from app.core.web import render
from app.projects import service

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    return render(request, "pages/home.html", {"projects": service.projects_for(session, user)})
