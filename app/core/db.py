"""Engine, session factory and the request-scoped session dependency.

The transaction boundary lives here: a request's session commits when the endpoint returns and
rolls back when it raises, so services only flush.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from sqlalchemy import DateTime, Float, MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

from app.core.config import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Archivable(Protocol):
    archived_at: Any


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def advisory_lock(session: Session, key: str) -> None:
    """Take a lock named `key` until the transaction ends, on Postgres (SQLite serialises
    writers anyway): for writes that must take turns but share no row to lock."""
    if is_postgres(session):
        from sqlalchemy import func, select

        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))


def set_archived(row: Archivable, archived: bool | None, changes: dict[str, Any]) -> None:
    """(Un)archive `row` as an edit asks (None: leave it), noting a real change in `changes`."""
    if archived is not None and archived != (row.archived_at is not None):
        row.archived_at = utcnow() if archived else None
        changes["archived"] = archived


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both Postgres and SQLite (which stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class epoch_seconds(FunctionElement[float]):  # noqa: N801 (an SQL function)
    """Seconds since 1970 of a `UTCDateTime` value in SQL, on Postgres and SQLite alike, for
    time differences inside a statement."""

    type = Float()
    inherit_cache = True


@compiles(epoch_seconds)
def _epoch_seconds(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    return f"EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)})"


@compiles(epoch_seconds, "sqlite")
def _epoch_seconds_sqlite(element: epoch_seconds, compiler: Any, **kw: Any) -> str:
    # SQLite stores the naive UTC text; julianday reads it (2440587.5 is 1970-01-01).
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets the worker write while the web reads; foreign keys are off by default.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_timeout", 10)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


# Longest wait for a row lock of the platform's own database sessions (Postgres): a stalled
# transaction can never wedge the others; the waiter fails (503 with Retry-After on the web).
LOCK_TIMEOUT_MS = 3000

# The answer when the database is down or every pooled connection stays busy: temporary, so
# clients are told when to come back rather than shown a 500.
UNAVAILABLE_DETAIL = "database temporarily unavailable; retry shortly"
UNAVAILABLE_RETRY_AFTER = "5"


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    url = get_settings().sqlalchemy_url
    if url.startswith("sqlite"):
        return make_engine(url)
    # Set once per connection, instead of a SET LOCAL round trip in every hot transaction;
    # `lock_timeout_ms` tells `bound_lock_waits` that it is in force.
    engine = make_engine(
        url, connect_args={"connect_timeout": 5, "options": f"-c lock_timeout={LOCK_TIMEOUT_MS}"}
    )
    return engine.execution_options(lock_timeout_ms=LOCK_TIMEOUT_MS)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(factory: Callable[[], Session] | None = None) -> Iterator[Session]:
    """A unit of work outside a request (CLI, workers): commit on success, roll back on error."""
    session = (factory or get_sessionmaker())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def pool_capacity(engine: Engine) -> int:
    """Connections the engine's pool can hand out at once (pool size plus overflow)."""
    pool = engine.pool
    # Pool declares no size(); every pool class an engine here gets (QueuePool, SQLite's
    # SingletonThreadPool) has one.
    size: int = pool.size()  # type: ignore[attr-defined]
    return max(1, size + max(0, getattr(pool, "_max_overflow", 0)))


async def request_slot(request: Request) -> AsyncIterator[None]:
    """Wait on the event loop for one of the process's database slots (`app.state.db_slots`).

    No more requests use the database at once than the pool has connections. With more, a
    request holding a connection waits for a threadpool thread while threads wait for a
    connection, until the pool timeout fails them: 200 annotators fell to a tenth of the
    throughput, p50 10 s. Taken after the body is read, so slow uploads hold no slot.
    """
    slots: asyncio.Semaphore | None = getattr(request.app.state, "db_slots", None)
    if slots is None:
        yield
        return
    async with slots:
        yield


def get_session(
    _slot: Annotated[None, Depends(request_slot, scope="function")],
) -> Iterator[Session]:
    with session_scope() as session:
        yield session


# scope="function": commit before the response is sent, so whatever a client was told is saved
# really is in the database (and its next request sees it).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@contextmanager
def request_session(request: Request) -> Iterator[Session]:
    """The request's unit of work for a route that needs the database on some paths only (so
    it does not take `SessionDep`); it honours an override of `get_session` as injection does.
    Blocking: use it from a worker thread."""
    override = request.app.dependency_overrides.get(get_session)
    if override is None:
        with session_scope() as session:
            yield session
    else:
        with contextmanager(override)() as session:
            yield session
