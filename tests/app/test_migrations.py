"""One linear migration history: it builds exactly the models' schema and tears down cleanly."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

import app.models  # noqa: F401
from app.core.db import Base, make_engine
from app.core.migrate import alembic_config, downgrade_base, upgrade_head
from tests.conftest import create_database, drop_database


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    return diff


@pytest.fixture()
def empty_pg() -> str:  # type: ignore[misc]
    name = f"prefloop_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(name).replace("postgresql://", "postgresql+psycopg://")
    yield url
    drop_database(name)


def test_history_is_linear() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1


def test_postgres_upgrade_matches_models_and_downgrades(empty_pg: str) -> None:
    upgrade_head(empty_pg)
    assert _diff(empty_pg) == []
    downgrade_base(empty_pg)
    engine = create_engine(empty_pg)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade_head(empty_pg)  # and back up again from base
    assert _diff(empty_pg) == []


def test_sqlite_upgrade_matches_models_and_downgrades(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade_head(url)
    assert _diff(url) == []
    downgrade_base(url)
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_models_from_before_checks_are_ready_after_the_upgrade(empty_pg: str) -> None:
    from alembic import command
    from sqlalchemy import text

    command.upgrade(alembic_config(empty_pg), "0002")
    engine = create_engine(empty_pg)
    with engine.begin() as conn:
        project = conn.execute(
            text("INSERT INTO projects (name, description, settings, created_at) "
                 "VALUES ('old', '', '{}', now()) RETURNING id")
        ).scalar_one()  # fmt: skip
        conn.execute(
            text("INSERT INTO model_versions (project_id, name, base, params, status, evaluation, "
                 "created_at) VALUES (:p, 'm', 'toy', '{}', 'arena', '{}', now())"),
            {"p": project},
        )  # fmt: skip
    upgrade_head(empty_pg)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT check_status, check_error, archived_at FROM model_versions")
        ).one()
        archived = conn.execute(text("SELECT archived_at FROM projects")).scalar_one()
    engine.dispose()
    assert tuple(row) == ("ready", None, None) and archived is None
