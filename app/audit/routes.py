"""The audit log, for admins: JSON and a page, filterable and paginated."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from app.audit import service
from app.core.db import SessionDep
from app.core.deps import AdminUser, PageUser
from app.core.web import render

router = APIRouter(tags=["audit"])

PAGE_SIZE = 100


@router.get("/api/v1/audit")
def audit_log(
    session: SessionDep,
    user: AdminUser,
    action: str | None = Query(default=None, max_length=64),
    project_id: int | None = Query(default=None, ge=0, le=2**31 - 1),
    actor: str | None = Query(default=None, max_length=320),
    limit: int = Query(default=200, ge=1, le=5000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    return service.recent(
        session, limit=limit, offset=offset, action=action, project_id=project_id, actor=actor
    )


@router.get("/admin/audit", response_class=HTMLResponse, include_in_schema=False)
def audit_page(
    request: Request,
    session: SessionDep,
    user: PageUser,
    action: str = Query(default="", max_length=64),
    project_id: str = Query(default="", max_length=12),
    actor: str = Query(default="", max_length=320),
    page: int = Query(default=1, ge=1, le=100_000),
) -> HTMLResponse:
    if user.role != "admin":
        raise HTTPException(403, "the audit log is for admins")
    project = int(project_id) if project_id.strip().isdigit() else None
    # One row more than shown tells whether there is a next page.
    events = service.recent(
        session,
        limit=PAGE_SIZE + 1,
        offset=(page - 1) * PAGE_SIZE,
        action=action or None,
        project_id=project,
        actor=actor or None,
    )
    filters = {"action": action, "project_id": project_id, "actor": actor}

    def page_url(n: int) -> str:
        return "/admin/audit?" + urlencode({**{k: v for k, v in filters.items() if v}, "page": n})

    ctx = {
        "events": events[:PAGE_SIZE],
        "filters": filters,
        "actions": service.actions(session),
        "page": page,
        "prev_url": page_url(page - 1) if page > 1 else None,
        "next_url": page_url(page + 1) if len(events) > PAGE_SIZE else None,
    }
    return render(request, "pages/audit.html", ctx)
