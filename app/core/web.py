"""Template rendering shared by every page: the layout gets the user and the CSRF token."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.core.resources import shared_dir

templates = Jinja2Templates(directory=str(shared_dir("templates")))
templates.env.globals["json"] = json.dumps


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200
) -> HTMLResponse:
    user_session = getattr(request.state, "user_session", None)
    ctx = {
        "csrf_token": user_session.csrf_token if user_session else "",
        "current_user": user_session.user if user_session else None,
        **(context or {}),
    }
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    # Same URL serves a full page or an htmx partial: caches must keep them apart.
    response.headers["Vary"] = "HX-Request"
    return response
