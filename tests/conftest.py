"""Test fixtures: a fresh Postgres database per run, each test in a rolled-back transaction.

Settings are fixed here, before any application module reads them: the real Postgres and Redis
on this machine, with a per-run database and a per-run broker key prefix so that runs can
overlap without seeing each other.
"""

from __future__ import annotations

import getpass
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

if TYPE_CHECKING:
    from tests.factories import Backend

RUN_ID = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
PG_ADMIN_URL = os.environ.get("PREFLOOP_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DB = f"prefloop_test_{RUN_ID}"
PG_URL = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{PG_DB}"
REDIS_URL = os.environ.get("PREFLOOP_TEST_REDIS", "redis://127.0.0.1:6379/0")
TMP_ROOT = Path(tempfile.mkdtemp(prefix=f"prefloop-test-{RUN_ID}-"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

os.environ.update(
    {
        "PREFLOOP_ENVIRONMENT": "local",
        "PREFLOOP_DATABASE_URL": PG_URL,
        "PREFLOOP_BROKER_URL": REDIS_URL,
        "PREFLOOP_BROKER_KEY_PREFIX": f"prefloop-test-{RUN_ID}:",
        "PREFLOOP_SECRET_KEY": "test-secret-key-" + uuid.uuid4().hex,
        "PREFLOOP_DATA_DIR": str(TMP_ROOT / "data"),
        "PREFLOOP_MEDIA_DIR": str(TMP_ROOT / "media"),
        "PREFLOOP_LOG_LEVEL": "INFO",
        # Tests build tiny pipelines in pytest's temporary folders and load them from there.
        "PREFLOOP_MODEL_ROOTS": ",".join(
            [
                str(TMP_ROOT / "data" / "models"),
                str(Path(__file__).resolve().parents[1] / "worker" / "toy" / "weights"),
                str(Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"),
            ]
        ),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)


def _admin_exec(sql: str, url: str = PG_ADMIN_URL) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def create_database(name: str, template: str | None = None) -> str:
    """Create a Postgres database (optionally from a migrated template); returns its URL."""
    suffix = f" TEMPLATE {template}" if template else ""
    _admin_exec(f'CREATE DATABASE "{name}"{suffix}')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(name: str) -> None:
    _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a test marked `long` run first, longest first; the rest in their usual order.

    Parallel runs hand out whole files (tests/run: `--dist loadfile --no-loadscope-reorder`),
    so a file of several minutes started last would run alone at the end while the other
    process idles. `long(seconds)` is the file's rough time on a quiet 2-core machine, only
    used for this order, which is the same in every process.
    """
    weight: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("long")
        if marker is not None:
            seconds = float(marker.args[0]) if marker.args else 60.0
            weight[item.path] = max(weight.get(item.path, 0.0), seconds)
    items.sort(key=lambda item: -weight.get(item.path, 0.0))  # stable: keeps the rest in order


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    from app.core.migrate import upgrade_head

    create_database(PG_DB)
    upgrade_head(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    yield PG_URL
    from app.core.db import get_engine

    get_engine().dispose()
    drop_database(PG_DB)


@pytest.fixture(scope="session")
def engine(pg_url: str):  # type: ignore[no-untyped-def]
    from app.core.db import get_engine

    return get_engine()


@pytest.fixture()
def sent_jobs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Records job messages instead of sending them (no worker sees rolled-back rows)."""
    sent: list[tuple[int, str]] = []
    import app.jobs.service as jobs_service

    monkeypatch.setattr(
        jobs_service, "send_job", lambda job_id, queue, countdown=None: sent.append((job_id, queue))
    )
    return sent


@pytest.fixture()
def db(engine, sent_jobs):  # type: ignore[no-untyped-def]
    """A session inside a transaction that is rolled back after the test."""
    from sqlalchemy.orm import Session

    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture()
def app(db):  # type: ignore[no-untyped-def]
    from app.core.db import get_session
    from app.main import create_app

    application = create_app()

    def override() -> Iterator[object]:
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise

    application.dependency_overrides[get_session] = override
    return application


@pytest.fixture()
def client(app):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    with TestClient(app, base_url="http://testserver") as test_client:
        yield test_client


@pytest.fixture()
def make_user(db):  # type: ignore[no-untyped-def]
    """make_user(role, email=None, password=None) -> (user, token)."""
    from app.users import service

    def factory(role: str, email: str | None = None, password: str | None = None):  # type: ignore[no-untyped-def]
        user = service.create_user(
            db,
            email=email or f"{role}-{uuid.uuid4().hex[:8]}@example.com",
            role=role,
            password=password,
        )
        token = service.issue_token(db, user)
        # Commit releases the test's savepoint, so a later request's rollback keeps the user.
        db.commit()
        return user, token

    return factory


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: the cores are shared with other test processes, and
    more threads only oversubscribe them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the request stack on either database (property tests run on both) ---------------------


def _sqlite_savepoints(engine: Any) -> None:
    from sqlalchemy import event

    # pysqlite's own transaction handling defeats SAVEPOINT; let SQLAlchemy drive it.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A rolled-back session and a test client on Postgres, then on a migrated SQLite file."""
    from fastapi.testclient import TestClient
    from sqlalchemy.orm import Session

    from app.core.db import get_session, make_engine
    from app.core.migrate import upgrade_head
    from app.main import create_app
    from tests.factories import Backend

    if request.param == "postgres":
        yield Backend("postgres", request.getfixturevalue("db"), request.getfixturevalue("client"))
        return
    # Health probes read the configured database (Postgres) whatever the request session is.
    request.getfixturevalue("engine")
    request.getfixturevalue("sent_jobs")
    url = f"sqlite:///{tmp_path / 'property.db'}"
    upgrade_head(url)
    engine = make_engine(url)
    _sqlite_savepoints(engine)
    connection = engine.connect()
    outer = connection.begin()
    session = Session(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    application = create_app()

    def override() -> Iterator[Session]:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise

    application.dependency_overrides[get_session] = override
    try:
        with TestClient(application, base_url="http://testserver") as client:
            yield Backend("sqlite", session, client)
    finally:
        session.close()
        outer.rollback()
        connection.close()
        engine.dispose()
