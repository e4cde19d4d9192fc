"""The JSON API of one's own account (tokens, password) and the admin's user management."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import AdminUser, CurrentUser, OptionalAuth, token_project
from app.projects.models import Membership
from app.users import service
from app.users.invites import RESET_DAYS, reset_path
from app.users.models import ROLES, ApiToken, User

router = APIRouter(prefix="/api/v1", tags=["account"])


def account_owner(user: CurrentUser) -> User:
    """The signed-in owner of the account, acting with full powers over it.

    A token confined to one project (the one a lead got with an account they created) is not:
    with it, that lead could otherwise mint an unconfined token or lock the owner out.
    """
    if token_project(user) is not None:
        raise HTTPException(403, "a project-confined token cannot manage the account")
    return user


OwnerUser = Annotated[User, Depends(account_owner)]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=service.TOKEN_NAME_MAX)


class TokenPublic(BaseModel):
    id: int
    name: str | None
    prefix: str
    project_id: int | None
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


class TokenCreated(TokenPublic):
    # The secret, shown this once.
    token: str


def token_public(row: ApiToken) -> dict[str, Any]:
    return TokenPublic.model_validate(row, from_attributes=True).model_dump()


def _target(session: Any, user_id: int) -> User:
    target = session.get(User, user_id)
    if target is None:
        raise HTTPException(404, f"user {user_id} not found")
    return target


def _create(session: Any, owner: User, name: str, actor: User) -> TokenCreated:
    try:
        row, secret = service.create_token(session, owner, name, created_by=actor)
    except service.UserError as exc:
        raise HTTPException(409, str(exc)) from None
    record(
        session,
        actor=actor,
        action="token.create",
        target=f"user:{owner.id}",
        details={"credential_id": row.id, "name": row.name},
    )
    return TokenCreated(**token_public(row), token=secret)


@router.get("/me/tokens", response_model=list[TokenPublic])
def my_tokens(session: SessionDep, user: OwnerUser) -> list[dict[str, Any]]:
    return [token_public(row) for row in service.tokens_of(session, user)]


@router.post("/me/tokens", status_code=201, response_model=TokenCreated)
def create_my_token(body: TokenCreate, session: SessionDep, user: OwnerUser) -> TokenCreated:
    return _create(session, user, body.name, user)


def revoke_own_token(session: Any, user: User, token_id: int) -> None:
    """Revoke one of the account's own tokens (the API's and the tokens page's)."""
    row = service.revoke_token(session, user, token_id)
    if row is None:
        raise HTTPException(404, f"token {token_id} not found")
    record(
        session,
        actor=user,
        action="token.revoke",
        target=f"user:{user.id}",
        details={"credential_id": row.id},
    )


@router.delete("/me/tokens/{token_id}", status_code=204)
def revoke_my_token(token_id: int, session: SessionDep, user: OwnerUser) -> Response:
    revoke_own_token(session, user, token_id)
    return Response(status_code=204)


@router.post("/users/{user_id}/tokens", status_code=201, response_model=TokenCreated)
def create_token_for_user(
    user_id: int, body: TokenCreate, session: SessionDep, admin: AdminUser
) -> TokenCreated:
    """Admins may issue a token for any account (as `prefloop user token` does)."""
    return _create(session, _target(session, user_id), body.name, admin)


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=1000)
    new_password: str = Field(min_length=service.PASSWORD_MIN, max_length=1000)


@router.post("/me/password", status_code=204)
def change_my_password(
    body: PasswordChange, session: SessionDep, user: OwnerUser, auth: OptionalAuth
) -> Response:
    """Change one's own password; every other browser session of the account ends."""
    keep = auth.user_session if auth is not None else None
    try:
        service.change_own_password(
            session, user, body.current_password, body.new_password, keep=keep
        )
    except service.UserError as exc:
        raise HTTPException(422, str(exc)) from None
    record(session, actor=user, action="user.password_change", target=f"user:{user.id}")
    return Response(status_code=204)


# -- admins: every account -------------------------------------------------------------------


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str | None = Field(default=None, max_length=16)
    is_active: bool | None = None


def user_public(session: Any, user: User) -> dict[str, Any]:
    memberships = session.execute(
        select(Membership.project_id, Membership.role, Membership.is_active).where(
            Membership.user_id == user.id
        )
    ).all()
    return {
        "id": user.id,
        "email": user.email,
        "role": user.role,
        "is_active": user.is_active,
        "has_password": user.password_hash is not None,
        "created_at": user.created_at,
        "last_login_at": user.last_login_at,
        "memberships": [
            {"project_id": p, "role": r, "active": a} for p, r, a in memberships
        ],
    }


def update_account(session: Any, admin: User, target: User, body: UserUpdate) -> None:
    """Role and active state of an account, by an admin; never their own (no lock-out)."""
    if target.id == admin.id and (
        body.is_active is False or (body.role is not None and body.role != "admin")
    ):
        raise HTTPException(409, "admins cannot deactivate or demote themselves")
    if body.role is not None and body.role not in ROLES:
        raise HTTPException(422, f"unknown role {body.role!r}; expected one of {', '.join(ROLES)}")
    changes: dict[str, Any] = {}
    if body.role is not None and body.role != target.role:
        service.set_account_role(session, target, body.role)
        changes["role"] = body.role
    if body.is_active is not None and body.is_active != target.is_active:
        service.set_account_active(session, target, body.is_active)
        changes["is_active"] = body.is_active
    # One row per admin action, also when it changed nothing (that was still asked for).
    if set(changes) == {"is_active"}:
        action = "user.activate" if body.is_active else "user.deactivate"
    else:
        action = "user.role" if set(changes) == {"role"} else "user.update"
    record(session, actor=admin, action=action, target=f"user:{target.id}", details=changes)


@router.get("/users")
def list_users(session: SessionDep, admin: AdminUser) -> list[dict[str, Any]]:
    return [user_public(session, u) for u in session.scalars(select(User).order_by(User.id))]


@router.patch("/users/{user_id}")
def patch_user(
    user_id: int, body: UserUpdate, session: SessionDep, admin: AdminUser
) -> dict[str, Any]:
    target = _target(session, user_id)
    update_account(session, admin, target, body)
    return user_public(session, target)


@router.post("/users/{user_id}/password-reset", status_code=201)
def password_reset_link(
    user_id: int, request: Request, session: SessionDep, admin: AdminUser
) -> dict[str, Any]:
    """A one-time link that sets the account's password, for the admin to pass on."""
    target = _target(session, user_id)
    if not target.is_active:
        raise HTTPException(409, "this account is deactivated")
    record(session, actor=admin, action="user.password_reset", target=f"user:{target.id}")
    url = str(request.base_url).rstrip("/") + reset_path(target)
    return {"user_id": target.id, "url": url, "valid_days": RESET_DAYS}
