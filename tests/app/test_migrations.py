"""One linear migration history: it builds exactly the models' schema and tears down cleanly."""

from __future__ import annotations

import uuid
from typing import Any

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


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_pairs_of_archived_prompts_and_models_are_hidden_by_the_upgrade(
    database: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    from alembic import command
    from sqlalchemy import text

    postgres = database == "postgres"
    url = request.getfixturevalue("empty_pg") if postgres else f"sqlite:///{tmp_path / 'h.db'}"
    command.upgrade(alembic_config(url), "0005")
    engine = create_engine(url)
    now = "CURRENT_TIMESTAMP"
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO projects (id, name, description, settings, created_at) "
                          f"VALUES (1, 'old', '', '{{}}', {now})"))  # fmt: skip
        for prompt_id, archived in ((1, "NULL"), (2, now)):
            conn.execute(text(f"INSERT INTO prompts (id, project_id, text, split, tags, "
                              f"created_at, archived_at) VALUES ({prompt_id}, 1, 'p', 'train', "
                              f"'[]', {now}, {archived})"))  # fmt: skip
        for model_id, archived in ((1, "NULL"), (2, now)):
            conn.execute(text(f"INSERT INTO model_versions (id, project_id, name, base, params, "
                              f"status, evaluation, created_at, archived_at) VALUES ({model_id}, "
                              f"1, 'm{model_id}', 'toy', '{{}}', 'arena', '{{}}', {now}, "
                              f"{archived})"))  # fmt: skip
        # (image, prompt, model): image 3 is of the archived model, 4 and 5 of the archived prompt.
        for image, prompt_id, model_id in ((1, 1, 1), (2, 1, 1), (3, 1, 2), (4, 2, 1), (5, 2, 1)):
            conn.execute(text(f"INSERT INTO images (id, project_id, prompt_id, model_version_id, "
                              f"sha256, storage_key, width, height, provenance, created_at) "
                              f"VALUES ('i{image}', 1, {prompt_id}, {model_id}, 's', 'k', 1, 1, "
                              f"'{{}}', {now})"))  # fmt: skip
        for pair_id, prompt_id, a, b in ((1, 1, 1, 2), (2, 1, 1, 3), (3, 2, 4, 5)):
            conn.execute(text(f"INSERT INTO pairs (id, project_id, prompt_id, image_a_id, "
                              f"image_b_id, purpose, is_gold, votes_wanted, vote_count, "
                              f"created_at) VALUES ({pair_id}, 1, {prompt_id}, 'i{a}', 'i{b}', "
                              f"'eval', false, 3, 0, {now})"))  # fmt: skip

    def counted_open(expected: int) -> None:
        if postgres:  # SQLite keeps no counter
            with engine.connect() as conn:
                assert conn.execute(text("SELECT open_pairs FROM pair_counts")).scalar() == expected

    counted_open(3)
    upgrade_head(url)
    with engine.connect() as conn:
        hidden = dict(conn.execute(text("SELECT id, hidden FROM pairs ORDER BY id")).all())
    assert hidden == {1: False, 2: True, 3: True}
    counted_open(1)
    command.downgrade(alembic_config(url), "0005")
    assert "hidden" not in {c["name"] for c in inspect(engine).get_columns("pairs")}
    counted_open(3)
    engine.dispose()
