"""Invite links: a signed, expiring token that lets an annotator set their password once.

The token is `<user id>.<expiry unix seconds>.<hmac>`; the HMAC (keyed by the server's secret
key) covers the id, the expiry and the user's current password hash, so a link stops working
when it expires, when the password is set (the hash changes), or when the secret key changes.
Nothing is stored.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.db import SessionDep, utcnow
from app.core.security import sign, tokens_equal
from app.core.web import render
from app.users import service
from app.users.models import User

INVITE_DAYS = 7.0
# A reset link (made by an admin for an account that may have a password) lives shorter.
RESET_DAYS = 1.0

router = APIRouter(include_in_schema=False)


class InviteError(ValueError):
    """The link is malformed, forged, expired, already used, or its account is deactivated."""


def _signature(secret: str, user: User, expires: int) -> str:
    return sign(secret, f"invite:{user.id}:{expires}:{user.password_hash or ''}")


def make_invite_token(
    user: User,
    *,
    secret: str | None = None,
    now: dt.datetime | None = None,
    days: float = INVITE_DAYS,
) -> str:
    secret = secret or get_settings().effective_secret_key()
    expires = int(((now or utcnow()) + dt.timedelta(days=days)).timestamp())
    return f"{user.id}.{expires}.{_signature(secret, user, expires)}"


def invite_path(token: str) -> str:
    return f"/invite/{token}"


def reset_path(user: User) -> str:
    """A one-time link that sets `user`'s password: for the admin to pass on, never a lead."""
    return invite_path(make_invite_token(user, days=RESET_DAYS))


def read_invite_token(
    session: Session, token: str, *, secret: str | None = None, now: dt.datetime | None = None
) -> User:
    """The invited user, or InviteError saying why the link cannot be used."""
    secret = secret or get_settings().effective_secret_key()
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise InviteError("this invite link is not valid")
    user = session.get(User, int(parts[0]))
    expires = int(parts[1])
    if user is None or not tokens_equal(parts[2], _signature(secret, user, expires)):
        # A used link lands here too: setting the password changed the signed hash.
        raise InviteError("this invite link is not valid or has already been used")
    if (now or utcnow()).timestamp() > expires:
        raise InviteError("this invite link has expired; ask your project lead for a new one")
    if not user.is_active:
        raise InviteError("this account is deactivated")
    return user


@router.get("/invite/{token}", response_class=HTMLResponse)
def invite_page(token: str, request: Request, session: SessionDep) -> HTMLResponse:
    try:
        user = read_invite_token(session, token)
    except InviteError as exc:
        return render(
            request, "pages/invite.html", {"error": str(exc), "user": None}, status_code=400
        )
    return render(request, "pages/invite.html", {"error": None, "user": user, "token": token})


@router.post("/invite/{token}", response_class=HTMLResponse)
def accept_invite(
    token: str,
    request: Request,
    session: SessionDep,
    password: str = Form(max_length=1000),
    confirm: str = Form(max_length=1000),
) -> Response:
    try:
        user = read_invite_token(session, token)
    except InviteError as exc:
        return render(
            request, "pages/invite.html", {"error": str(exc), "user": None}, status_code=400
        )
    problem = None
    if password != confirm:
        problem = "the two passwords differ"
    else:
        try:
            service.set_password(session, user, password)
        except service.UserError as exc:
            problem = str(exc)
    if problem is not None:
        ctx = {"error": None, "problem": problem, "user": user, "token": token}
        return render(request, "pages/invite.html", ctx, status_code=422)
    from app.audit.service import record
    from app.users.pages import log_in

    record(session, actor=user, action="user.password_set", target=f"user:{user.id}")

    return log_in(request, session, user, RedirectResponse("/", status_code=303))
