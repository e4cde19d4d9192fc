"""Login and logout pages (server-side sessions in an HttpOnly cookie)."""

from __future__ import annotations

from urllib.parse import urlparse

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import get_settings
from app.core.db import SessionDep, utcnow
from app.core.deps import SESSION_COOKIE, OptionalAuth, same_origin
from app.core.web import render
from app.users import service
from app.users.models import User

router = APIRouter(include_in_schema=False)


def _safe_next(next_url: str | None) -> str:
    # Only same-site paths: an open redirect after login is a phishing tool.
    if not next_url or not next_url.startswith("/") or next_url.startswith("//"):
        return "/"
    parsed = urlparse(next_url)
    return parsed.path + (f"?{parsed.query}" if parsed.query else "")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, auth: OptionalAuth, next: str | None = None) -> Response:
    if auth is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "pages/login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    email: str = Form(max_length=320),
    password: str = Form(max_length=1000),
    next: str = Form(default="/"),
) -> Response:
    settings = get_settings()
    if not same_origin(request):
        # Login CSRF: another site must not sign a browser into an account of its choosing.
        raise HTTPException(403, "cross-site login refused")
    client = getattr(request.state, "client_address", None) or (
        request.client.host if request.client else "?"
    )
    keys = [f"email:{email.strip().lower()}", f"ip:{client}"]
    try:
        claimed = service.claim_login_attempt(
            session, keys, limit=settings.login_attempts_per_minute
        )
    except service.TooManyAttempts:
        return render(
            request,
            "pages/login.html",
            {"next": _safe_next(next), "error": "Too many failed attempts; wait a minute."},
            status_code=429,
        )
    user = service.authenticate(session, email, password)
    if user is None:
        record(session, actor=None, action="login.failed", target=f"email:{email[:180]}")
        return render(
            request,
            "pages/login.html",
            {"next": _safe_next(next), "error": "Wrong email or password."},
            status_code=400,
        )
    service.forget_login_attempt(session, claimed)
    record(session, actor=user, action="login.success", target=f"user:{user.id}")
    return log_in(request, session, user, RedirectResponse(_safe_next(next), status_code=303))


def log_in(request: Request, session: Session, user: User, response: Response) -> Response:
    """Start a server-side session for `user` and set its cookie on `response`."""
    settings = get_settings()
    user.last_login_at = utcnow()
    token, _ = service.start_session(
        session, user, days=settings.session_days, user_agent=request.headers.get("user-agent")
    )
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.session_days * 86400,
        httponly=True,
        secure=settings.cookie_secure,
        samesite="lax",
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, session: SessionDep, auth: OptionalAuth) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token and auth is not None:
        service.end_session(session, token)
        record(session, actor=auth.user, action="logout", target=f"user:{auth.user.id}")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
