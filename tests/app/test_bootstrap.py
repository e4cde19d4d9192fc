"""`prefloop bootstrap` (the compose `prestart` command) on a fresh Postgres database."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import create_database, drop_database
from tests.support import REPO, base_env


@pytest.fixture()
def fresh_db() -> Iterator[str]:
    name = f"prefloop_boot_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def _bootstrap(db_url: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = base_env(
        PREFLOOP_DATABASE_URL=db_url,
        PREFLOOP_SECRET_KEY="bootstrap-secret-" + uuid.uuid4().hex,
        PREFLOOP_DATA_DIR=str(tmp / "data"),
        PREFLOOP_ENVIRONMENT="production",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "bootstrap"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _admins(db_url: str) -> list[tuple[str, str | None]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT email, password_hash FROM users WHERE role = 'admin'")
        return [(r[0], r[1]) for r in rows.fetchall()]


@pytest.mark.slow
def test_bootstrap_creates_the_admin_from_the_environment_once(
    fresh_db: str, tmp_path: Path
) -> None:
    short = _bootstrap(
        fresh_db, tmp_path, PREFLOOP_ADMIN_EMAIL="ops@example.com", PREFLOOP_ADMIN_PASSWORD="short"
    )
    assert short.returncode == 1, short.stdout + short.stderr
    assert "PREFLOOP_ADMIN_PASSWORD: password must be at least 8 characters" in short.stderr
    assert _admins(fresh_db) == []  # migrated, but no half-made admin

    half = _bootstrap(fresh_db, tmp_path, PREFLOOP_ADMIN_EMAIL="ops@example.com")
    assert half.returncode == 1 and "PREFLOOP_ADMIN_PASSWORD: set" in half.stderr, half.stderr

    env = {"PREFLOOP_ADMIN_EMAIL": "Ops@Example.com", "PREFLOOP_ADMIN_PASSWORD": "s3cret-admin-pw"}
    first = _bootstrap(fresh_db, tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert "database is up to date" in first.stdout
    assert "admin login ops@example.com (password from PREFLOOP_ADMIN_PASSWORD)" in first.stdout
    assert "s3cret-admin-pw" not in first.stdout + first.stderr
    [(email, password_hash)] = _admins(fresh_db)
    from app.core.security import verify_password

    assert email == "ops@example.com" and verify_password("s3cret-admin-pw", password_hash)

    # Every later start (a changed password in .env included) leaves the admin alone.
    again = _bootstrap(fresh_db, tmp_path, **{**env, "PREFLOOP_ADMIN_PASSWORD": "other-password"})
    assert again.returncode == 0 and "an admin exists; no account created" in again.stdout
    assert _admins(fresh_db) == [(email, password_hash)]


@pytest.mark.slow
def test_bootstrap_without_settings_prints_a_one_time_password(
    fresh_db: str, tmp_path: Path
) -> None:
    first = _bootstrap(fresh_db, tmp_path)
    assert first.returncode == 0, first.stderr
    line = next(x for x in first.stdout.splitlines() if "admin login" in x)
    password = line.split(" / password ")[1].split()[0]
    [(email, password_hash)] = _admins(fresh_db)
    from app.core.security import verify_password

    assert email == "admin@prefloop.local" and verify_password(password, password_hash)
    again = _bootstrap(fresh_db, tmp_path)
    assert password not in again.stdout and "an admin exists" in again.stdout
