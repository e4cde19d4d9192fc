"""The JSON API of one's own account (tokens, password) and the admin's user management."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import AdminUser, CurrentUser, token_project
from app.users import service
from app.users.models import ApiToken, User

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
        details={"token_id": row.id, "name": row.name},
    )
    return TokenCreated(**token_public(row), token=secret)


@router.get("/me/tokens", response_model=list[TokenPublic])
def my_tokens(session: SessionDep, user: OwnerUser) -> list[dict[str, Any]]:
    return [token_public(row) for row in service.tokens_of(session, user)]


@router.post("/me/tokens", status_code=201, response_model=TokenCreated)
def create_my_token(body: TokenCreate, session: SessionDep, user: OwnerUser) -> TokenCreated:
    return _create(session, user, body.name, user)


@router.delete("/me/tokens/{token_id}", status_code=204)
def revoke_my_token(token_id: int, session: SessionDep, user: OwnerUser) -> Response:
    row = service.revoke_token(session, user, token_id)
    if row is None:
        raise HTTPException(404, f"token {token_id} not found")
    record(
        session,
        actor=user,
        action="token.revoke",
        target=f"user:{user.id}",
        details={"token_id": row.id},
    )
    return Response(status_code=204)


@router.post("/users/{user_id}/tokens", status_code=201, response_model=TokenCreated)
def create_token_for_user(
    user_id: int, body: TokenCreate, session: SessionDep, admin: AdminUser
) -> TokenCreated:
    """Admins may issue a token for any account (as `prefloop user token` does)."""
    owner = session.get(User, user_id)
    if owner is None:
        raise HTTPException(404, f"user {user_id} not found")
    return _create(session, owner, body.name, admin)
