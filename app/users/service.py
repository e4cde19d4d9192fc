"""Users, logins, sessions and API tokens (no HTTP here)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.orm import Session, contains_eager

from app.core import security
from app.core.db import advisory_lock, utcnow
from app.users.models import ROLES, ApiToken, LoginAttempt, User, UserSession


class UserError(ValueError):
    """Invalid user input (unknown role, duplicate email...)."""


def normalise_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320 or email.startswith("@") or email.endswith("@"):
        raise UserError(f"not an email address: {email!r}")
    return email


def get_by_email(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == email.strip().lower()))


def create_user(session: Session, *, email: str, role: str, password: str | None = None) -> User:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    email = normalise_email(email)
    if get_by_email(session, email) is not None:
        raise UserError(f"a user with email {email} already exists")
    user = User(
        email=email,
        role=role,
        password_hash=security.hash_password(password) if password else None,
        groups=[],
    )
    session.add(user)
    session.flush()
    return user


PASSWORD_MIN = 8


def set_password(
    session: Session, user: User, password: str, *, keep: UserSession | None = None
) -> None:
    """Change a password; every browser session of the user ends but `keep` (the one that
    changed it). Outstanding set-password links die with the old hash."""
    if len(password) < PASSWORD_MIN:
        raise UserError(f"password must be at least {PASSWORD_MIN} characters")
    user.password_hash = security.hash_password(password)
    user.password_changed_at = utcnow()
    ending = delete(UserSession).where(UserSession.user_id == user.id)
    if keep is not None:
        ending = ending.where(UserSession.id != keep.id)
    session.execute(ending)
    session.flush()


def change_own_password(
    session: Session, user: User, current: str, new: str, *, keep: UserSession | None = None
) -> None:
    """The owner changes their password, proving they know the current one."""
    if not security.verify_password(current, user.password_hash):
        raise UserError("the current password is wrong")
    set_password(session, user, new, keep=keep)


def set_account_active(session: Session, user: User, active: bool) -> None:
    """(De)activate an account everywhere: no login, no token, no session (admins only)."""
    user.is_active = active
    if not active:
        session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    session.flush()


def set_account_role(session: Session, user: User, role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    user.role = role
    session.flush()


def authenticate(session: Session, email: str, password: str) -> User | None:
    user = get_by_email(session, email)
    ok = security.verify_password(password, user.password_hash if user else None)
    if user is None or not ok or not user.is_active:
        return None
    return user


# last_used_at is written at most this often per token, so busy scripts do not turn every
# request into a write.
LAST_USED_RESOLUTION = dt.timedelta(seconds=60)
TOKEN_NAME_MAX = 100
# Live tokens per account: enough for every script, few enough to review on one page.
MAX_ACTIVE_TOKENS = 50


def create_token(
    session: Session,
    user: User,
    name: str | None = None,
    *,
    project_id: int | None = None,
    created_by: User | None = None,
) -> tuple[ApiToken, str]:
    """A new API token for `user`; the secret is returned here only, never stored.

    Callers decide who may receive it: the owner, an admin, or the lead who created the
    account in this very call (then `project_id` confines the token to that project).
    """
    if name is not None:
        name = name.strip()[:TOKEN_NAME_MAX] or None
    live = session.scalar(
        select(func.count())
        .select_from(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    )
    if (live or 0) >= MAX_ACTIVE_TOKENS:
        raise UserError(f"at most {MAX_ACTIVE_TOKENS} live tokens per account; revoke some first")
    token = security.new_token()
    row = ApiToken(
        user_id=user.id,
        token_hash=security.hash_token(token),
        prefix=token[:10],
        name=name,
        project_id=project_id,
        created_by_id=(created_by or user).id,
    )
    session.add(row)
    session.flush()
    return row, token


def issue_token(
    session: Session,
    user: User,
    name: str | None = None,
    *,
    project_id: int | None = None,
    created_by: User | None = None,
) -> str:
    return create_token(session, user, name, project_id=project_id, created_by=created_by)[1]


def tokens_of(session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(
            select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc())
        )
    )


def revoke_token(session: Session, user: User, token_id: int) -> ApiToken | None:
    """Revoke one of `user`'s tokens; None if there is no such token of theirs."""
    row = session.get(ApiToken, token_id)
    if row is None or row.user_id != user.id:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


# Built once, the user in the same statement: every authenticated request runs one of these.
_TOKEN_WITH_USER = (
    select(ApiToken)
    .options(contains_eager(ApiToken.user))
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("token_hash"), ApiToken.revoked_at.is_(None))
)
_SESSION_WITH_USER = (
    select(UserSession)
    .options(contains_eager(UserSession.user))
    .join(User, User.id == UserSession.user_id)
    .where(UserSession.token_hash == bindparam("token_hash"))
)


def user_for_token(session: Session, token: str) -> User | None:
    # The user comes in the same statement (the hot path counts round trips).
    row = session.scalar(_TOKEN_WITH_USER, {"token_hash": security.hash_token(token)})
    if row is None or not row.user.is_active:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    user = row.user
    # Read by app.core.deps.membership_role: a project-confined token sees that project only.
    # A per-request mark on the loaded user, not a column: the model does not declare it.
    user.token_project_id = row.project_id  # type: ignore[attr-defined]
    return user


def start_session(
    session: Session, user: User, *, days: int, user_agent: str | None = None
) -> tuple[str, UserSession]:
    token = security.new_session_token()
    row = UserSession(
        token_hash=security.hash_token(token),
        user_id=user.id,
        csrf_token=security.new_session_token(),
        expires_at=utcnow() + dt.timedelta(days=days),
        user_agent=(user_agent or "")[:255],
    )
    session.add(row)
    session.flush()
    return token, row


def session_for_token(session: Session, token: str) -> UserSession | None:
    row = session.scalar(_SESSION_WITH_USER, {"token_hash": security.hash_token(token)})
    if row is None or row.expires_at < utcnow() or not row.user.is_active:
        return None
    return row


def end_session(session: Session, token: str) -> None:
    session.execute(delete(UserSession).where(UserSession.token_hash == security.hash_token(token)))


def claim_login_attempt(session: Session, keys: list[str], *, limit: int) -> list[LoginAttempt]:
    """Count this attempt against every key first, then check the limit: atomically, so that
    parallel guesses cannot all pass the check before any of them is counted.

    On Postgres a transaction-scoped advisory lock per key serialises the claims; on SQLite
    the insert takes the database's write lock until commit. Returns the rows to forget
    (forget_login_attempt) if the login succeeds; raises TooManyAttempts past the limit.
    """
    keys = sorted({key[:400] for key in keys})
    for key in keys:
        advisory_lock(session, "login:" + key)
    rows = [LoginAttempt(key=key) for key in keys]
    session.add_all(rows)
    session.flush()
    if any(recent_failed_logins(session, key) > limit for key in keys):
        raise TooManyAttempts("too many failed attempts; wait a minute")
    return rows


def forget_login_attempt(session: Session, rows: list[LoginAttempt]) -> None:
    """A successful login does not count as a failed one."""
    for row in rows:
        session.delete(row)
    session.flush()


class TooManyAttempts(UserError):
    """The login throttle refused the attempt."""


def recent_failed_logins(session: Session, key: str, *, seconds: int = 60) -> int:
    since = utcnow() - dt.timedelta(seconds=seconds)
    return (
        session.scalar(
            select(func.count())
            .select_from(LoginAttempt)
            .where(LoginAttempt.key == key[:400], LoginAttempt.at >= since)
        )
        or 0
    )
