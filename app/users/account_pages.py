"""Pages of one's own account: API tokens and password."""

from __future__ import annotations

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import PageUser, token_project
from app.core.web import render
from app.users import service
from app.users.models import User

router = APIRouter(include_in_schema=False)


def _owner(user: User) -> User:
    # See app.users.routes.account_owner: a project-confined token does not own the account.
    if token_project(user) is not None:
        raise HTTPException(403, "a project-confined token cannot manage the account")
    return user


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
    return _tokens_page(request, session, _owner(user))


@router.post("/me/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    session: SessionDep,
    user: PageUser,
    name: str = Form(max_length=service.TOKEN_NAME_MAX),
) -> HTMLResponse:
    _owner(user)
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
        details={"token_id": row.id, "name": row.name},
    )
    return _tokens_page(request, session, user, created=secret, status_code=201)


@router.post("/me/tokens/{token_id}/revoke")
def revoke_token(token_id: int, session: SessionDep, user: PageUser) -> Response:
    row = service.revoke_token(session, _owner(user), token_id)
    if row is None:
        raise HTTPException(404, f"token {token_id} not found")
    record(
        session,
        actor=user,
        action="token.revoke",
        target=f"user:{user.id}",
        details={"token_id": row.id},
    )
    return RedirectResponse("/me/tokens", status_code=303)
