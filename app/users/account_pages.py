"""Pages of one's own account: API tokens and password."""

from __future__ import annotations

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import PageUser
from app.core.web import render
from app.users import service
from app.users.invites import reset_path
from app.users.models import ROLES, User
from app.users.routes import account_owner, revoke_own_token

router = APIRouter(include_in_schema=False)


def _tokens_page(
    request: Request,
    session: Session,
    user: User,
    *,
    created: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    ctx = {"tokens": service.tokens_of(session, user), "created": created, "error": error}
    return render(request, "pages/my_tokens.html", ctx, status_code=status_code)


@router.get("/me/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    return _tokens_page(request, session, account_owner(user))


@router.post("/me/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    session: SessionDep,
    user: PageUser,
    name: str = Form(max_length=service.TOKEN_NAME_MAX),
) -> HTMLResponse:
    account_owner(user)
    if not name.strip():
        return _tokens_page(request, session, user, error="give the token a name", status_code=422)
    try:
        row, secret = service.create_token(session, user, name)
    except service.UserError as exc:
        return _tokens_page(request, session, user, error=str(exc), status_code=409)
    record(
        session,
        actor=user,
        action="token.create",
        target=f"user:{user.id}",
        details={"credential_id": row.id, "name": row.name},
    )
    return _tokens_page(request, session, user, created=secret, status_code=201)


@router.post("/me/tokens/{token_id}/revoke")
def revoke_token(token_id: int, session: SessionDep, user: PageUser) -> Response:
    revoke_own_token(session, account_owner(user), token_id)
    return RedirectResponse("/me/tokens", status_code=303)


# -- password ---------------------------------------------------------------------------------


@router.get("/me/password", response_class=HTMLResponse)
def password_page(request: Request, user: PageUser) -> HTMLResponse:
    account_owner(user)
    return render(request, "pages/my_password.html", {"problem": None, "done": False})


@router.post("/me/password", response_class=HTMLResponse)
def change_password(
    request: Request,
    session: SessionDep,
    user: PageUser,
    current: str = Form(max_length=1000),
    password: str = Form(max_length=1000),
    confirm: str = Form(max_length=1000),
) -> HTMLResponse:
    """Change one's own password; the other browser sessions of the account end."""
    account_owner(user)
    problem = "the two new passwords differ" if password != confirm else None
    if problem is None:
        try:
            service.change_own_password(
                session, user, current, password, keep=getattr(request.state, "user_session", None)
            )
        except service.UserError as exc:
            problem = str(exc)
    if problem is not None:
        ctx = {"problem": problem, "done": False}
        return render(request, "pages/my_password.html", ctx, status_code=422)
    record(session, actor=user, action="user.password_change", target=f"user:{user.id}")
    return render(request, "pages/my_password.html", {"problem": None, "done": True})


# -- admins: users ----------------------------------------------------------------------------


def _admin(user: User) -> User:
    if user.role != "admin":
        raise HTTPException(403, "this page is for admins")
    return account_owner(user)


def _users_page(
    request: Request,
    session: Session,
    *,
    reset: dict[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    from sqlalchemy import select

    from app.users.routes import user_public

    rows = [user_public(session, u) for u in session.scalars(select(User).order_by(User.id))]
    ctx = {"users": rows, "roles": ROLES, "reset": reset, "error": error}
    return render(request, "pages/admin_users.html", ctx, status_code=status_code)


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(request: Request, session: SessionDep, user: PageUser) -> HTMLResponse:
    _admin(user)
    return _users_page(request, session)


@router.post("/admin/users/{user_id}", response_class=HTMLResponse)
def update_user(
    user_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    role: str | None = Form(default=None, max_length=16),
    active: bool | None = Form(default=None),
) -> Response:
    from app.users.routes import UserUpdate, update_account

    admin = _admin(user)
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(404, f"user {user_id} not found")
    try:
        update_account(session, admin, target, UserUpdate(role=role, is_active=active))
    except HTTPException as exc:
        if exc.status_code not in (409, 422):
            raise
        return _users_page(request, session, error=str(exc.detail), status_code=exc.status_code)
    return RedirectResponse("/admin/users", status_code=303)


@router.post("/admin/users/{user_id}/reset", response_class=HTMLResponse)
def reset_password(
    user_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    admin = _admin(user)
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(404, f"user {user_id} not found")
    if not target.is_active:
        return _users_page(request, session, error="this account is deactivated", status_code=409)
    record(session, actor=admin, action="user.password_reset", target=f"user:{target.id}")
    url = str(request.base_url).rstrip("/") + reset_path(target)
    return _users_page(request, session, reset={"email": target.email, "url": url})
