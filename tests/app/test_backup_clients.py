"""The PostgreSQL client tools' version check in front of pg_dump/pg_restore."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from app.backup import BackupError, backup, client_major
from app.cli import main


def _fake_tool(bin_dir: Path, name: str, version_line: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)


def _server_major(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return conn.info.server_version // 10000


def test_client_major_reads_the_debian_version_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tool(tmp_path / "bin", "pg_dump", "pg_dump (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+1)")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert client_major("pg_dump") == 16


def test_an_older_pg_dump_is_refused_by_name(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _server_major(pg_url)
    _fake_tool(tmp_path / "bin", "pg_dump", f"pg_dump (PostgreSQL) {server - 1}.9")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BackupError) as caught:
        backup(tmp_path / "out")
    message = str(caught.value)
    assert f"pg_dump {server - 1} cannot work with this PostgreSQL {server} server" in message
    assert f"postgresql-client-{server}" in message
    assert not (tmp_path / "out" / "database.dump").exists()


def test_a_missing_pg_dump_is_named(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(main, ["backup", "--under", str(tmp_path / "backups")])
    assert result.exit_code == 1
    assert "pg_dump is not installed (not on PATH)" in result.output


def test_backup_needs_exactly_one_destination(tmp_path: Path) -> None:
    neither = CliRunner().invoke(main, ["backup"])
    both = CliRunner().invoke(main, ["backup", "--out", str(tmp_path), "--under", str(tmp_path)])
    for result in (neither, both):
        assert result.exit_code == 2 and "exactly one of --out DIR and --under DIR" in result.output
