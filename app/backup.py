"""Backup and restore of an installation: the database, the media files and a manifest.

A backup is a folder:
  database.dump   Postgres: `pg_dump -Fc` of the configured database
  prefloop.db     SQLite: a consistent copy made with SQLite's online backup API
  media/          the media store, file by file
  secret_key      embedded mode only, when the key was generated into the data dir
  manifest.json   counts, alembic revision, time and database kind

Safe while the platform runs. The database is dumped first, then the media copied: media files
are content-addressed, written before the row naming them commits and never rewritten, so every
image row in the dump finds its file in the copy. On Postgres the manifest's counts are read in
the very snapshot that pg_dump exports, so they describe the dump exactly.

Restore goes into an empty database and an empty media dir and refuses anything else unless
forced; afterwards it checks the restored counts against the manifest and that every image row
has its file. `prefloop migrate` (or `serve`) then brings an older backup up to the code's schema.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import click

from app import __version__
from app.core.config import Settings, get_settings

MANIFEST = "manifest.json"
PG_DUMP = "database.dump"
SQLITE_COPY = "prefloop.db"
MEDIA = "media"
SECRET_KEY = "secret_key"
# Tables counted into the manifest and checked after a restore.
COUNTED = ("users", "projects", "prompts", "images", "pairs", "votes", "jobs")


class BackupError(RuntimeError):
    """A backup or restore that cannot go ahead; the message says why."""


def _libpq_url(settings: Settings) -> str:
    """The database URL as pg_dump and psycopg take it (no SQLAlchemy driver suffix)."""
    url = settings.sqlalchemy_url
    return "postgresql://" + url.split("://", 1)[1]


def client_major(program: str) -> int:
    """The major version of a PostgreSQL client tool on PATH (`pg_dump`, `pg_restore`)."""
    try:
        result = subprocess.run(
            [program, "--version"], capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        raise BackupError(
            f"{program} is not installed (not on PATH); install the PostgreSQL client tools of "
            "the server's major version (Debian: postgresql-client-<major>)"
        ) from None
    # "pg_dump (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+1)"
    match = re.search(r"\)\s*(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BackupError(f"cannot tell the version of {program}: {result.stdout.strip()!r}")
    return int(match.group(1))


def check_client_version(program: str, server_major: int) -> None:
    """pg_dump and pg_restore refuse servers newer than themselves: say so before starting."""
    major = client_major(program)
    if major < server_major:
        raise BackupError(
            f"{program} {major} cannot work with this PostgreSQL {server_major} server; install "
            f"the client tools of version {server_major} or newer (Debian: "
            f"postgresql-client-{server_major}; the prefloop image ships the version that "
            "docker-compose.yml runs)"
        )


def _sqlite_path(settings: Settings) -> Path:
    return Path(settings.sqlalchemy_url.removeprefix("sqlite:///"))


def _counts(execute: Any) -> dict[str, int]:
    return {t: int(execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in COUNTED}


def _revision(execute: Any) -> str | None:
    row = execute("SELECT version_num FROM alembic_version").fetchone()
    return str(row[0]) if row else None


def _media_files(root: Path) -> Iterator[Path]:
    """Every stored file under the media root; half-written temporaries are left out."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(".tmp-"):
            yield path


def _copy_media(source: Path, target: Path) -> tuple[int, int]:
    """Copy the media store file by file; returns (files, bytes)."""
    files = size = 0
    for path in _media_files(source):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        files += 1
        size += path.stat().st_size
    return files, size


def _dump_postgres(settings: Settings, out: Path) -> tuple[dict[str, int], str | None]:
    import psycopg

    url = _libpq_url(settings)
    with psycopg.connect(url) as conn:
        check_client_version("pg_dump", conn.info.server_version // 10000)
        # One snapshot for the counts and the dump: the manifest describes the dump exactly.
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        # fetchone() is typed optional; this SELECT always returns its one row.
        snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
        counts = _counts(conn.execute)
        revision = _revision(conn.execute)
        result = subprocess.run(
            [
                "pg_dump",
                "--format=custom",
                "--no-owner",
                "--no-privileges",
                f"--snapshot={snapshot}",
                f"--file={out / PG_DUMP}",
                f"--dbname={url}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        conn.rollback()
    if result.returncode != 0:
        raise BackupError(f"pg_dump failed: {result.stderr.strip()}")
    return counts, revision


def _dump_sqlite(settings: Settings, out: Path) -> tuple[dict[str, int], str | None]:
    source = _sqlite_path(settings)
    if not source.exists():
        raise BackupError(f"no database at {source}")
    with (
        closing(sqlite3.connect(source)) as src,
        closing(sqlite3.connect(out / SQLITE_COPY)) as dst,
    ):
        src.backup(dst)
        counts = _counts(dst.execute)
        revision = _revision(dst.execute)
    return counts, revision


def backup(out: Path, settings: Settings | None = None) -> dict[str, Any]:
    """Write a backup of the configured installation into `out` (new or empty); the manifest."""
    settings = settings or get_settings()
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty; back up into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    if settings.is_sqlite:
        counts, revision = _dump_sqlite(settings, out)
    else:
        counts, revision = _dump_postgres(settings, out)
    files, size = _copy_media(settings.resolved_media_dir, out / MEDIA)
    key_file = settings.resolved_data_dir / SECRET_KEY
    secret_copied = settings.secret_key is None and key_file.is_file()
    if secret_copied:
        shutil.copy2(key_file, out / SECRET_KEY)
        (out / SECRET_KEY).chmod(0o600)
    manifest = {
        "format": 1,
        "prefloop_version": __version__,
        "created_at": started.isoformat(),
        "database": "sqlite" if settings.is_sqlite else "postgresql",
        "alembic_revision": revision,
        "counts": counts,
        "media": {"files": files, "bytes": size},
        "secret_key": secret_copied,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(source: Path) -> dict[str, Any]:
    path = source / MANIFEST
    if not path.is_file():
        raise BackupError(f"{source} is not a prefloop backup (no {MANIFEST})")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def _check_revision(revision: str | None) -> None:
    from alembic.script import ScriptDirectory

    from app.core.migrate import alembic_config

    if revision is None:
        return
    try:
        ScriptDirectory.from_config(alembic_config()).get_revision(revision)
    except Exception as exc:  # noqa: BLE001 - alembic raises several kinds for an unknown id
        raise BackupError(
            f"the backup's schema revision {revision} is unknown to this prefloop "
            f"({__version__}); restore it with the version that made it"
        ) from exc


def _tables_in_target(settings: Settings) -> int:
    """How many tables the target database already has (0: empty, or no file yet)."""
    if settings.is_sqlite:
        target = _sqlite_path(settings)
        if not target.exists():
            return 0
        with closing(sqlite3.connect(target)) as conn:
            row = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'")
            return int(row.fetchone()[0])
    import psycopg

    with psycopg.connect(_libpq_url(settings)) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        (count,) = tables.fetchone() or (0,)
        return int(count)


def _restore_postgres(settings: Settings, source: Path, replace: bool) -> dict[str, int]:
    import psycopg

    url = _libpq_url(settings)
    with psycopg.connect(url) as conn:
        check_client_version("pg_restore", conn.info.server_version // 10000)
    command = ["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error"]
    command += ["--single-transaction", f"--dbname={url}"]
    if replace:
        command += ["--clean", "--if-exists"]
    result = subprocess.run(
        [*command, str(source / PG_DUMP)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {result.stderr.strip()}")
    with psycopg.connect(url) as conn:
        return _counts(conn.execute)


def _restore_sqlite(settings: Settings, source: Path) -> dict[str, int]:
    target = _sqlite_path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The backup API replaces the whole target database, pages and schema.
    with (
        closing(sqlite3.connect(source / SQLITE_COPY)) as src,
        closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
        return _counts(dst.execute)


def _missing_media(settings: Settings, media: Path) -> list[str]:
    """Storage keys of image rows whose file is not in the restored media dir."""
    from sqlalchemy import select

    from app.core.db import make_engine
    from app.images.models import Image

    engine = make_engine(settings.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            keys = conn.scalars(select(Image.storage_key).distinct()).all()
    finally:
        engine.dispose()
    return [key for key in keys if not (media / key).is_file()]


def _corrupt_media(media: Path) -> list[str]:
    """Content-addressed files whose bytes no longer hash to their name."""
    bad = []
    for path in _media_files(media):
        stem = path.name.split(".", 1)[0]
        if len(stem) == 64 and hashlib.sha256(path.read_bytes()).hexdigest() != stem:
            bad.append(str(path.relative_to(media)))
    return bad


def restore(
    source: Path, *, force: bool = False, settings: Settings | None = None
) -> dict[str, Any]:
    """Restore a backup into the configured (empty) database and media dir; a summary."""
    settings = settings or get_settings()
    manifest = read_manifest(source)
    kind = "sqlite" if settings.is_sqlite else "postgresql"
    if manifest["database"] != kind:
        raise BackupError(
            f"the backup holds a {manifest['database']} database but this installation uses "
            f"{kind}; export and import the project data instead"
        )
    _check_revision(manifest.get("alembic_revision"))
    tables = _tables_in_target(settings)
    if tables and not force:
        raise BackupError(
            f"the target database has {tables} tables; restore into an empty database "
            "(or pass --force to replace what the backup holds)"
        )
    media = settings.resolved_media_dir
    if media.exists() and any(media.iterdir()) and not force:
        raise BackupError(
            f"the media dir {media} is not empty; restore into an empty one (or pass --force)"
        )
    corrupt = _corrupt_media(source / MEDIA)
    if corrupt:
        raise BackupError(f"{len(corrupt)} media files in the backup are damaged: {corrupt[:5]}")
    if settings.is_sqlite:
        counts = _restore_sqlite(settings, source)
    else:
        counts = _restore_postgres(settings, source, replace=tables > 0)
    files, _ = _copy_media(source / MEDIA, media)
    key_file = settings.resolved_data_dir / SECRET_KEY
    if manifest.get("secret_key") and (force or not key_file.exists()):
        key_file.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / SECRET_KEY, key_file)
        key_file.chmod(0o600)
    if counts != manifest["counts"]:
        raise BackupError(f"restored counts {counts} differ from the manifest {manifest['counts']}")
    missing = _missing_media(settings, media)
    if missing:
        raise BackupError(f"{len(missing)} images have no file after the restore: {missing[:5]}")
    return {
        "counts": counts,
        "media_files": files,
        "alembic_revision": manifest["alembic_revision"],
    }


@click.command("backup")
@click.option("--out", type=click.Path(path_type=Path), help="New or empty backup folder.")
@click.option(
    "--under",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write into a new folder named after the current UTC time under this one.",
)
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
def backup_command(out: Path | None, under: Path | None, data_dir: Path | None) -> None:
    """Back up the database, the media files and a manifest into a folder (safe while running)."""
    from app.cli import _use_data_dir

    if (out is None) == (under is None):
        raise click.UsageError("give exactly one of --out DIR and --under DIR")
    if under is not None:
        out = under / dt.datetime.now(dt.UTC).strftime("prefloop-%Y%m%dT%H%M%SZ")
    assert out is not None
    _use_data_dir(data_dir)
    try:
        manifest = backup(out.expanduser().resolve())
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    from app.audit.service import record_cli

    record_cli("backup.create", target=str(out), details={"counts": manifest["counts"]})
    counts = manifest["counts"]
    click.echo(
        f"backed up {counts['votes']} votes, {counts['images']} images and "
        f"{manifest['media']['files']} media files (schema {manifest['alembic_revision']}) "
        f"to {out}"
    )


@click.command("restore")
@click.argument("source", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--force", is_flag=True, help="Restore over a database or media dir in use.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Embedded data directory.")
def restore_command(source: Path, force: bool, data_dir: Path | None) -> None:
    """Restore a backup into an empty database and media dir, then check what was restored."""
    from app.cli import _use_data_dir

    _use_data_dir(data_dir)
    try:
        summary = restore(source.expanduser().resolve(), force=force)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    counts = summary["counts"]
    try:
        from app.audit.service import record_cli

        record_cli("backup.restore", target=str(source), details={"counts": counts})
    except Exception as exc:  # noqa: BLE001 - a backup older than this schema has no such row yet
        click.echo(f"(not audited: {type(exc).__name__}; run `prefloop migrate`)", err=True)
    click.echo(
        f"restored {counts['votes']} votes, {counts['images']} images and "
        f"{summary['media_files']} media files (schema {summary['alembic_revision']}); "
        "run `prefloop migrate` if this prefloop is newer than the backup"
    )
