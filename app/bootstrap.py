"""First start of an installation: the schema, then the first admin (`prefloop bootstrap`).

Idempotent, so a compose `prestart` service can run it on every `docker compose up`: it migrates
and creates an admin only while the installation has none. The admin comes from
PREFLOOP_ADMIN_EMAIL + PREFLOOP_ADMIN_PASSWORD when both are set; otherwise it is
admin@prefloop.local with a random password that is shown once.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from app.core.config import Settings, get_settings
from app.core.db import session_scope

DEFAULT_ADMIN_EMAIL = "admin@prefloop.local"


class BootstrapError(RuntimeError):
    """The admin settings cannot be used; the message names the variable."""


@dataclass(frozen=True)
class CreatedAdmin:
    email: str
    # Set only when generated here: the one time it can be shown.
    generated_password: str | None

    def announcement(self) -> str:
        if self.generated_password is None:
            return f"first run: admin login {self.email} (password from PREFLOOP_ADMIN_PASSWORD)"
        return (
            f"first run: admin login {self.email} / password {self.generated_password} "
            "(shown only once)"
        )


def _admin_from_settings(settings: Settings) -> tuple[str, str | None]:
    email, password = settings.admin_email, settings.admin_password
    if (email is None) != (password is None):
        missing = "PREFLOOP_ADMIN_PASSWORD" if password is None else "PREFLOOP_ADMIN_EMAIL"
        raise BootstrapError(
            f"{missing}: set PREFLOOP_ADMIN_EMAIL and PREFLOOP_ADMIN_PASSWORD together "
            "(or neither, for a generated password)"
        )
    if email is None or password is None:
        return DEFAULT_ADMIN_EMAIL, None
    return email, password.get_secret_value()


def ensure_admin(settings: Settings | None = None) -> CreatedAdmin | None:
    """Create the first admin if the installation has no admin; None when one exists."""
    from app.core.security import new_password
    from app.users import service
    from app.users.models import User

    email, password = _admin_from_settings(settings or get_settings())
    with session_scope() as session:
        if session.scalar(select(func.count()).select_from(User).where(User.role == "admin")):
            return None
        secret = password if password is not None else new_password()
        try:
            user = service.create_user(session, email=email, role="admin")
        except service.UserError as exc:
            raise BootstrapError(
                f"PREFLOOP_ADMIN_EMAIL: {exc}; no admin exists yet, so pick an unused email"
            ) from None
        try:
            # set_password holds the password rules.
            service.set_password(session, user, secret)
        except service.UserError as exc:
            raise BootstrapError(f"PREFLOOP_ADMIN_PASSWORD: {exc}") from None
        return CreatedAdmin(user.email, None if password is not None else secret)
