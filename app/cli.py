"""The `prefloop` command line: serve, migrate, worker, users, and the data tools."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from app import __version__
from app.core.config import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.users.models import User


def _settings_or_exit() -> None:
    try:
        get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _use_data_dir(data_dir: Path | None) -> None:
    """`--data-dir D` is the same as setting PREFLOOP_DATA_DIR (children inherit it)."""
    if data_dir is not None:
        os.environ["PREFLOOP_DATA_DIR"] = str(data_dir.expanduser().resolve())
        get_settings.cache_clear()
    _settings_or_exit()


class LazyGroup(click.Group):
    """A group whose heavier commands (numpy, torch) are imported only when invoked."""

    lazy: dict[str, str] = {
        "rate": "worker.rate:rate_command",
        "toy": "worker.toy.cli:toy_group",
        "export": "app.exports.cli:export_command",
        "import": "app.exports.cli:import_command",
        "backup": "app.backup:backup_command",
        "restore": "app.backup:restore_command",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefloop")
def main() -> None:
    """prefloop: collect human preferences on generated images and align diffusion models."""


@main.command()
def version() -> None:
    """Print the prefloop, torch and diffusers versions."""
    import importlib.metadata as md

    click.echo(f"prefloop {__version__}")
    for dist in ("torch", "diffusers", "transformers", "celery", "fastapi"):
        try:
            click.echo(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            click.echo(f"{dist} (not installed)")


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
def migrate(data_dir: Path | None) -> None:
    """Bring the database schema up to date (safe to run repeatedly)."""
    _use_data_dir(data_dir)
    _upgrade()


def _upgrade() -> Settings:
    from app.core.migrate import upgrade_head

    settings = get_settings()
    if settings.is_sqlite:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head()
    click.echo("database is up to date")
    return settings


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
def bootstrap(data_dir: Path | None) -> None:
    """Migrate, then create the first admin if there is none (safe to run on every start).

    The admin is PREFLOOP_ADMIN_EMAIL with PREFLOOP_ADMIN_PASSWORD when both are set; otherwise
    admin@prefloop.local with a random password printed here, once.
    """
    _use_data_dir(data_dir)
    from app.bootstrap import BootstrapError, ensure_admin

    settings = _upgrade()
    try:
        admin = ensure_admin(settings)
    except BootstrapError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(admin.announcement() if admin else "an admin exists; no account created")


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--web-workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="uvicorn worker processes (distributed mode).",
)
@click.option("--no-worker", is_flag=True, help="Start the web server only.")
@click.option("--demo", is_flag=True, help="Create a demo project with the toy models.")
def serve(
    data_dir: Path | None, host: str, port: int, web_workers: int, no_worker: bool, demo: bool
) -> None:
    """Start the whole platform: migrate, then the web server and a worker as child processes.

    With no settings this is the embedded mode (SQLite, filesystem broker, media folder under
    the data dir). With PREFLOOP_DATABASE_URL and PREFLOOP_BROKER_URL it runs against Postgres
    and Redis.
    """
    _use_data_dir(data_dir)
    from app.serve import Supervisor

    code = Supervisor(
        host=host, port=port, web_workers=web_workers, start_worker=not no_worker, demo=demo
    ).run()
    sys.exit(code)


@main.command()
@click.option(
    "--queues",
    default="gpu,cpu",
    show_default=True,
    help="Comma-separated queues to consume (gpu, cpu).",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
@click.option("--loglevel", default=None, help="Log level (default: PREFLOOP_LOG_LEVEL).")
@click.option("--events", is_flag=True, help="Send task events (what Flower shows).")
@click.option("--quiet", is_flag=True, help="No start-up banner.")
def worker(
    queues: str, data_dir: Path | None, loglevel: str | None, events: bool, quiet: bool
) -> None:
    """Run a Celery worker: one job at a time in this process (start more for more)."""
    _use_data_dir(data_dir)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in ("gpu", "cpu")]
    if not names or unknown:
        raise click.BadParameter(f"unknown queue(s) {unknown or names}; use gpu and/or cpu")
    from app.core.broker import celery_app

    settings = get_settings()
    _limit_torch_threads(settings.torch_threads)
    celery_app.worker_main(
        [
            *(["--quiet"] if quiet else []),
            "worker",
            "--queues",
            ",".join(names),
            "--pool",
            "solo",
            "--loglevel",
            loglevel or settings.log_level,
            "--hostname",
            f"prefloop-{'-'.join(names)}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            *(["--task-events"] if events else []),
        ]
    )


def _limit_torch_threads(threads: int | None) -> None:
    """Set torch's CPU threads before any job runs (see PREFLOOP_TORCH_THREADS)."""
    import torch

    count = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(count)
    # Inter-op threads can only be set once, before any parallel work.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(count)


@main.group()
def user() -> None:
    """Manage user accounts and API tokens."""


@user.command("add")
@click.argument("email")
@click.option("--role", type=click.Choice(["admin", "lead", "annotator"]), required=True)
@click.option("--password", default=None, help="Set a password (otherwise token-only or none).")
@click.option("--token", "with_token", is_flag=True, help="Also create an API token (shown once).")
def user_add(email: str, role: str, password: str | None, with_token: bool) -> None:
    """Create a user."""
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.users import service

    try:
        with session_scope() as session:
            created = service.create_user(session, email=email, role=role, password=password)
            token = service.issue_token(session, created, name="cli") if with_token else None
            record(session, actor=None, action="user.create", target=f"user:{created.id}",
                   details={"role": role, "token": bool(token)}, address="cli")  # fmt: skip
            click.echo(f"created {role} {created.email} (id {created.id})")
    except service.UserError as exc:
        raise click.ClickException(str(exc)) from None
    if token:
        click.echo(f"token: {token}")


@user.command("list")
def user_list() -> None:
    """List users."""
    _settings_or_exit()
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.users.models import User

    with session_scope() as session:
        for row in session.scalars(select(User).order_by(User.id)):
            state = "active" if row.is_active else "inactive"
            click.echo(f"{row.id}\t{row.email}\t{row.role}\t{state}")


def _named_user(session: Session, email: str) -> User:
    from app.users import service

    found = service.get_by_email(session, email)
    if found is None:
        raise click.ClickException(f"no user with email {email}")
    return found


@user.command("token")
@click.argument("email")
@click.option("--name", default="cli", show_default=True, help="Name shown in the token list.")
def user_token(email: str, name: str) -> None:
    """Issue a new API token for a user (shown once)."""
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.users import service

    with session_scope() as session:
        found = _named_user(session, email)
        row, token = service.create_token(session, found, name)
        record(session, actor=None, action="token.create", target=f"user:{row.user_id}",
               details={"credential_id": row.id, "name": row.name}, address="cli")  # fmt: skip
    click.echo(token)


@user.command("password")
@click.argument("email")
@click.option(
    "--set", "set_now", is_flag=True, help="Type the new password here instead of a link."
)
def user_password(email: str, set_now: bool) -> None:
    """Reset a user's password: print a one-time link (valid a day) that sets it."""
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.users import service
    from app.users.invites import RESET_DAYS, reset_path

    password = (
        click.prompt("New password", hide_input=True, confirmation_prompt=True)
        if set_now
        else None
    )
    try:
        with session_scope() as session:
            found = _named_user(session, email)
            if password is not None:
                service.set_password(session, found, password)
                action, link = "user.password_set", None
            else:
                action, link = "user.password_reset", reset_path(found)
            record(session, actor=None, action=action, target=f"user:{found.id}",
                   address="cli")  # fmt: skip
    except service.UserError as exc:
        raise click.ClickException(str(exc)) from None
    if link is None:
        click.echo(f"password of {email} changed; their browser sessions ended")
    else:
        base = get_settings().public_base_url.rstrip("/")
        click.echo(f"one-time link for {email} (valid {RESET_DAYS:g} day): {base}{link}")


@user.command("deactivate")
@click.argument("email")
@click.option("--reactivate", is_flag=True, help="Turn the account back on.")
def user_deactivate(email: str, reactivate: bool) -> None:
    """Deactivate an account everywhere (no login, no token works), or reactivate it."""
    _settings_or_exit()
    from app.audit.service import record
    from app.core.db import session_scope
    from app.users import service

    with session_scope() as session:
        found = _named_user(session, email)
        service.set_account_active(session, found, reactivate)
        action = "user.activate" if reactivate else "user.deactivate"
        record(session, actor=None, action=action, target=f"user:{found.id}",
               address="cli")  # fmt: skip
    click.echo(f"{email} is {'active' if reactivate else 'deactivated'}")


if __name__ == "__main__":
    main()
