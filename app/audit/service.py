"""Recording and reading the audit log of lead and admin actions."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.users.models import User

# Never stored in an audit entry, whatever a caller passes.
_SECRET_KEYS = {"password", "token", "secret", "password_hash", "csrf_token"}


# The client address of the request being served, set by the app's middleware; the command
# line records "cli".
CLIENT_ADDRESS: ContextVar[str] = ContextVar("prefloop_client_address", default="")


def record(
    session: Session,
    *,
    actor: User | None,
    action: str,
    target: str = "",
    project_id: int | None = None,
    details: dict[str, Any] | None = None,
    address: str | None = None,
) -> AuditEvent:
    """Add an audit entry in the caller's transaction (so it exists iff the action happened)."""
    clean = {k: v for k, v in (details or {}).items() if k.lower() not in _SECRET_KEYS}
    if project_id is None and isinstance(clean.get("project_id"), int):
        project_id = clean["project_id"]
    event = AuditEvent(
        actor_id=actor.id if actor else None,
        action=action,
        target=target[:200],
        project_id=project_id,
        address=(address if address is not None else CLIENT_ADDRESS.get())[:64],
        details=clean,
    )
    session.add(event)
    session.flush()
    return event


def recent(
    session: Session,
    *,
    limit: int = 200,
    offset: int = 0,
    action: str | None = None,
    project_id: int | None = None,
    actor: str | None = None,
) -> list[dict[str, Any]]:
    """Newest first, filtered by action, project and actor (email, or "system")."""
    stmt = (
        select(AuditEvent, User.email)
        .outerjoin(User, User.id == AuditEvent.actor_id)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    if project_id is not None:
        stmt = stmt.where(AuditEvent.project_id == project_id)
    if actor == "system":
        stmt = stmt.where(AuditEvent.actor_id.is_(None))
    elif actor:
        stmt = stmt.where(User.email == actor.strip().lower())
    return [
        {
            "id": event.id,
            "at": event.created_at.isoformat(),
            "actor": email,
            "action": event.action,
            "target": event.target,
            "project_id": event.project_id,
            "address": event.address,
            "details": event.details,
        }
        for event, email in session.execute(stmt)
    ]


def actions(session: Session) -> list[str]:
    return list(session.scalars(select(AuditEvent.action).distinct().order_by(AuditEvent.action)))


def record_cli(
    action: str,
    *,
    target: str = "",
    project_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """An audit row for an operator's command-line action, in its own transaction."""
    from app.core.db import session_scope

    with session_scope() as session:
        record(
            session,
            actor=None,
            action=action,
            target=target,
            project_id=project_id,
            details=details,
            address="cli",
        )
