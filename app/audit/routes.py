"""The audit log, for admins: JSON and a page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from app.audit import service
from app.core.db import SessionDep
from app.core.deps import AdminUser, PageUser
from app.core.web import render

router = APIRouter(tags=["audit"])


@router.get("/api/v1/audit")
def audit_log(
    session: SessionDep,
    user: AdminUser,
    action: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=200, ge=1, le=5000),
) -> list[dict[str, Any]]:
    return service.recent(session, limit=limit, action=action)


@router.get("/admin/audit", response_class=HTMLResponse, include_in_schema=False)
def audit_page(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    if user.role != "admin":
        from fastapi import HTTPException

        raise HTTPException(403, "the audit log is for admins")
    return render(request, "pages/audit.html", {"events": service.recent(session, limit=500)})
