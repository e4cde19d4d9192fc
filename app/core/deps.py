"""Authentication and authorisation dependencies shared by the JSON API and the pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.db import SessionDep
from app.core.security import tokens_equal
from app.projects.models import Membership, Project
from app.users import service as users
from app.users.models import User, UserSession

SESSION_COOKIE = "prefloop_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass
class Auth:
    user: User
    via: str  # "token" | "session"
    user_session: UserSession | None = None


class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to /login."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


async def _csrf_ok(request: Request, user_session: UserSession) -> bool:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else None
    return sent is not None and tokens_equal(sent, user_session.csrf_token)


def same_origin(request: Request) -> bool:
    """No Origin (not a browser, or an old one) or this very host; "null" and others fail."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def lookup_auth(session: Session, request: Request) -> Auth | None:
    """Who sent this request (Bearer token or session cookie), without the CSRF check; raises
    401 for a token that is invalid or revoked. Blocking: call it from a worker thread."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        user = users.user_for_token(session, header[7:].strip())
        if user is None:
            raise HTTPException(401, "invalid or revoked token", {"WWW-Authenticate": "Bearer"})
        return Auth(user=user, via="token")
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    user_session = users.session_for_token(session, cookie)
    if user_session is None:
        return None
    user_session.user.token_project_id = None  # type: ignore[attr-defined]
    return Auth(user=user_session.user, via="session", user_session=user_session)


async def optional_auth(request: Request, session: SessionDep) -> Auth | None:
    # Async only for the CSRF form read; the database lookups run in the threadpool, since one
    # blocking the event loop while the pool is exhausted stalls every request of the process.
    if not request.headers.get("authorization") and not request.cookies.get(SESSION_COOKIE):
        return None
    auth = await run_in_threadpool(lookup_auth, session, request)
    if auth is None or auth.user_session is None:
        return auth
    # Cookie-authenticated writes need the synchronizer token and a same-origin request.
    if request.method not in SAFE_METHODS and (
        not same_origin(request) or not await _csrf_ok(request, auth.user_session)
    ):
        raise HTTPException(403, "CSRF check failed: missing or wrong CSRF token")
    request.state.user_session = auth.user_session
    return auth


OptionalAuth = Annotated[Auth | None, Depends(optional_auth)]


def current_user(auth: OptionalAuth) -> User:
    if auth is None:
        raise HTTPException(401, "authentication required", {"WWW-Authenticate": "Bearer"})
    return auth.user


CurrentUser = Annotated[User, Depends(current_user)]


def page_user(request: Request, auth: OptionalAuth) -> User:
    if auth is None:
        raise LoginRequired(str(request.url.path))
    return auth.user


PageUser = Annotated[User, Depends(page_user)]


def require_lead(user: CurrentUser) -> User:
    if user.role not in ("admin", "lead"):
        raise HTTPException(403, "this action needs the lead or admin role")
    return user


def require_admin(user: CurrentUser) -> User:
    if user.role != "admin":
        raise HTTPException(403, "this action needs the admin role")
    return user


LeadUser = Annotated[User, Depends(require_lead)]
AdminUser = Annotated[User, Depends(require_admin)]


def token_project(user: User) -> int | None:
    """The one project a project-confined API token may reach (None: not confined)."""
    return getattr(user, "token_project_id", None)


def project_role(user: User, project_id: int, member_role: str | None) -> str | None:
    """The user's standing in a project given their active membership's role (or None)."""
    scope = token_project(user)
    if scope is not None and scope != project_id:
        return None
    if user.role == "admin":
        return "admin"
    return member_role


def membership_role(session: Session, user: User, project_id: int) -> str | None:
    """'admin', 'lead', 'annotator' or None: what this user may do in the project.

    A deactivated membership counts as none; so does every other project for a token that is
    confined to one project.
    """
    scope = token_project(user)
    if (scope is not None and scope != project_id) or user.role == "admin":
        return project_role(user, project_id, None)
    return session.scalar(
        select(Membership.role).where(
            Membership.project_id == project_id,
            Membership.user_id == user.id,
            Membership.is_active.is_(True),
        )
    )


# Built once: constructing statements is a measurable share of a hot request's CPU.
_PROJECT_AND_ROLE = (
    select(Project, Membership.role)
    .outerjoin(
        Membership,
        (Membership.project_id == Project.id)
        & (Membership.user_id == bindparam("user_id"))
        & Membership.is_active.is_(True),
    )
    .where(Project.id == bindparam("project_id"))
)


def get_project_for(session: Session, user: User, project_id: int, *, lead: bool) -> Project:
    """The project, if the user may see it: 404 if it does not exist, 403 if not allowed."""
    # The project and the membership in one statement (every project route runs this).
    row = session.execute(
        _PROJECT_AND_ROLE, {"project_id": project_id, "user_id": user.id}
    ).one_or_none()
    if row is None:
        raise HTTPException(404, f"project {project_id} not found")
    project, member_role = row
    role = project_role(user, project_id, member_role)
    if role is None:
        raise HTTPException(403, "not a member of this project")
    if lead and (role not in ("admin", "lead") or user.role not in ("admin", "lead")):
        raise HTTPException(403, "this action needs the lead role in this project")
    return project


class _InProject(Protocol):
    project_id: Any


Row = TypeVar("Row", bound=_InProject)


def led_row(session: Session, user: User, kind: type[Row], row_id: int, noun: str) -> Row:
    """A project's row (a prompt, a model version...), if the user leads its project: 404 for
    an unknown id, then as get_project_for."""
    row = session.get(kind, row_id)
    if row is None:
        raise HTTPException(404, f"{noun} {row_id} not found")
    get_project_for(session, user, row.project_id, lead=True)
    return row
