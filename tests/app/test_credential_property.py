"""Credentials only to their owner, as a property of the whole application.

Every route (read from the app, so a new one is walked without anyone remembering to) is called
by the lead of one project aiming at another account: the admin, another project's lead, and
another project's annotators (with and without a password). Whatever the route answers, the
other account gains no token, no password, no session, and nothing in the answer is a token or
a set-password link of theirs. The same on Postgres and on SQLite. The command-line tools that
print credentials are walked too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import make_engine
from app.core.security import hash_token
from app.projects.service import add_member
from app.users import service as users
from app.users.models import ApiToken, User, UserSession
from tests.factories import Backend, user_factory
from tests.route_matrix import ROUTES, World, build_world, is_api, request_kwargs
from tests.support import REPO, base_env, bearer

TOKEN_RE = re.compile(r"pfl_[A-Za-z0-9_-]{20,}")
# Signed set-password links: /invite/<user id>.<expiry>.<hmac> and /reset/... alike.
LINK_RE = re.compile(r"/(?:invite|reset|password-reset)/(\d+)\.\d+\.[0-9a-f]+")

# Bodies naming the victim for the routes that act on another account.
VICTIM_BODIES: dict[tuple[str, str], dict[str, Any]] = {}


@dataclass
class Credentials:
    password_hash: str | None
    tokens: set[tuple[int, Any]]
    sessions: int


def _credentials(db: Session, user_id: int) -> Credentials:
    db.expire_all()
    user = db.get(User, user_id)
    assert user is not None
    tokens = {
        (row.id, row.revoked_at)
        for row in db.scalars(select(ApiToken).where(ApiToken.user_id == user_id))
    }
    sessions = db.scalar(
        select(func.count()).select_from(UserSession).where(UserSession.user_id == user_id)
    )
    return Credentials(user.password_hash, tokens, int(sessions or 0))


@dataclass(frozen=True)
class Victim:
    id: int
    email: str


def _victims(db: Session, world: World, make: Any) -> dict[str, Victim]:
    elsewhere = world.ids["elsewhere"]
    from app.projects.models import Project

    project = db.get(Project, elsewhere)
    annotator, _ = make("annotator", password="their own password")
    pending = users.create_user(db, email=f"pending-{uuid.uuid4().hex[:6]}@example.com",
                                role="annotator")  # fmt: skip
    for member in (annotator, pending):
        add_member(db, project=project, user=member, role="annotator")
    def holder(role: str) -> int | None:
        secret = hash_token(world.tokens[role] or "")
        return db.scalar(select(ApiToken.user_id).where(ApiToken.token_hash == secret))

    other_lead_id, admin_id = holder("other_lead"), holder("admin")
    db.commit()
    found = {
        "admin": db.get(User, admin_id),
        "other_lead": db.get(User, other_lead_id),
        "other_annotator": annotator,
        "other_pending_annotator": pending,
    }
    return {k: Victim(u.id, u.email) for k, u in found.items() if u is not None}


def _aim_at(kwargs: dict[str, Any], victim: Victim) -> dict[str, Any]:
    """The route's usual body, with any email in it replaced by the victim's."""
    aimed = dict(kwargs)
    for key in ("json", "data"):
        body = aimed.get(key)
        if isinstance(body, dict) and "email" in body:
            aimed[key] = {**body, "email": victim.email}
    return aimed


def _leaks(db: Session, text: str, victim: Victim) -> list[str]:
    found = []
    for secret in set(TOKEN_RE.findall(text)):
        owner = db.scalar(select(ApiToken.user_id).where(ApiToken.token_hash == hash_token(secret)))
        if owner == victim.id:
            found.append(f"a token of theirs: {secret[:10]}…")
    for user_id in set(LINK_RE.findall(text)):
        if int(user_id) == victim.id:
            found.append("a set-password link for their account")
    return found


@pytest.mark.slow
@pytest.mark.long(55)
def test_no_route_gives_a_lead_anothers_credentials(backend: Backend) -> None:
    db, client = backend.db, backend.client
    make = user_factory(db)
    world = build_world(db, make, name=f"property-{backend.name}")
    victims = _victims(db, world, make)
    attacker = bearer(world.tokens["lead"] or "")
    connection = db.get_bind()
    failures: list[str] = []
    for method, path in ROUTES:
        for label, victim in victims.items():
            db.commit()
            victim_token = db.scalar(
                select(ApiToken.id).where(ApiToken.user_id == victim.id).limit(1)
            )
            before = _credentials(db, victim.id)
            db.commit()
            savepoint = connection.begin_nested()  # type: ignore[union-attr]
            try:
                params = {**world.params, "user_id": victim.id, "token_id": victim_token or 0}
                headers = dict(attacker)
                if not is_api(path):
                    headers["Accept"] = "text/html"
                kwargs = VICTIM_BODIES.get((method, path)) or _aim_at(
                    request_kwargs(method, path, world), victim
                )
                response = client.request(
                    method, path.format(**params), headers=headers, follow_redirects=False,
                    **kwargs,
                )  # fmt: skip
                text = response.text + " " + " ".join(response.headers.values())
                problems = _leaks(db, text, victim)
                after = _credentials(db, victim.id)
                if after.password_hash != before.password_hash:
                    problems.append("their password changed")
                if after.tokens != before.tokens:
                    problems.append("their tokens changed")
                if after.sessions > before.sessions:
                    problems.append("a session was started for them")
                if response.status_code >= 500:
                    problems.append(f"answered {response.status_code}")
                failures += [f"{method} {path} → {label}: {p}" for p in problems]
            finally:
                db.rollback()
                if savepoint.is_active:
                    savepoint.rollback()
                db.expunge_all()
    assert not failures, "\n".join(failures)


# -- the command line ------------------------------------------------------------------------

# Commands that print a credential, and whose: the operator runs them on the server, so they
# may print one, but only for the account they name.
CLI_CREDENTIALS = {
    "user add": "a token (--token) or nothing, for the account it creates only",
    "user token": "a token for the named account",
    "user password": "a one-time set-password link for the named account",
}
# `bootstrap` prints a password only for the first admin it creates itself, while no admin exists
# (the operator's own first login): never a credential of an existing account.
CLI_NO_CREDENTIALS = {
    "backup", "bootstrap", "export", "import", "migrate", "rate", "restore", "serve", "toy", "user",
    "user deactivate", "user list", "version", "worker",
}  # fmt: skip


def _commands(group: click.Group, prefix: str = "") -> Iterator[str]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        if prefix == "" and name in getattr(group, "lazy", {}):
            yield name  # heavy groups are imported lazily and print no credentials
            continue
        command = group.get_command(ctx, name)
        full = f"{prefix}{name}"
        yield full
        if isinstance(command, click.Group):
            yield from _commands(command, full + " ")


def test_every_cli_command_is_classified() -> None:
    from app.cli import main

    found = set(_commands(main))
    known = set(CLI_CREDENTIALS) | CLI_NO_CREDENTIALS
    assert found == known, (sorted(found - known), sorted(known - found))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_cli_credentials_go_to_the_named_account_only(database: str, tmp_path: Path) -> None:
    from tests.conftest import create_database, drop_database

    name = f"prefloop_cli_{uuid.uuid4().hex[:8]}"
    sqlite_url = f"sqlite:///{tmp_path / 'cli.db'}"
    url = create_database(name) if database == "postgres" else sqlite_url
    env = base_env(
        PREFLOOP_DATABASE_URL=url,
        PREFLOOP_DATA_DIR=str(tmp_path / "data"),
        PREFLOOP_SECRET_KEY="cli-secret-" + uuid.uuid4().hex,
    )
    try:
        assert _cli(env, "migrate").returncode == 0
        made = _cli(env, "user", "add", "owner@example.com", "--role", "lead", "--token")
        assert made.returncode == 0, made.stderr
        other = _cli(env, "user", "add", "other@example.com", "--role", "admin", "--password",
                     "the admin's password")  # fmt: skip
        assert other.returncode == 0, other.stderr
        # Adding an existing account again prints no credential for it.
        again = _cli(env, "user", "add", "other@example.com", "--role", "lead", "--token")
        assert again.returncode != 0 and "pfl_" not in again.stdout + again.stderr
        issued = _cli(env, "user", "token", "owner@example.com")
        reset = _cli(env, "user", "password", "owner@example.com")
        assert issued.returncode == 0 and reset.returncode == 0, (issued.stderr, reset.stderr)
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with Session(engine) as session:
            owner = users.get_by_email(session, "owner@example.com")
            assert owner is not None
            for out in (made.stdout, issued.stdout, reset.stdout):
                for secret in TOKEN_RE.findall(out):
                    holder = session.scalar(
                        select(ApiToken.user_id).where(ApiToken.token_hash == hash_token(secret))
                    )
                    assert holder == owner.id
                for user_id in LINK_RE.findall(out):
                    assert int(user_id) == owner.id
            assert LINK_RE.search(reset.stdout), reset.stdout
        engine.dispose()
    finally:
        if database == "postgres":
            drop_database(name)
