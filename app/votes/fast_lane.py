"""The annotator's hot requests on Postgres, answered without FastAPI's routing or the ORM.

`GET /api/v1/projects/{id}/pairs/next` and `POST /api/v1/pairs/{id}/votes` (Bearer token), or
the vote page's htmx `POST /projects/{id}/vote` (browser login), with the pair's two signed image
GETs, are every request of an annotator's vote cycle. Through the full stack each costs
milliseconds of Python (routing, dependency injection, a threadpool hop, an ORM unit of work)
around statements Postgres answers in a fraction of that. The fast lane is a pure ASGI
middleware that serves them on asyncpg (statements prepared once per connection):

- next: who is asking (token or login → user, the user row locked, as the scheduler does), the
  project, the membership and the live reservation in one statement; then the open candidate
  with the fewest votes + live reservations, locked SKIP LOCKED, and the scheduler's own
  reserve-if-open statement.
- vote: who is asking, the pair (locked), the project's settings, the membership and the
  annotator's standing in one statement; then the vote service's vote-and-release statement.
- the page's vote: the two above in one transaction (after the login's CSRF and origin checks),
  the page's counters and the preload peek, rendered by the page's own context builders.

It serves the plain cases only and hands every other request to the full application,
unchanged: cookies on the API, projects with active sampling or revealed gold scores, replays,
every refusal (bad credentials, not a member, conflicts, rate limit...), nothing left to serve,
every candidate locked, any database error before the commit. The rules it applies are the
services' own (`app.votes.service.refusal` and `checked_input`, `app.core.deps.project_role`,
`app.pairs.ordering.spread_sql`, the scheduler's and the page's statements), so a request gets
the same answer either way; tests/app/test_fast_lane_parity.py drives one session of each kind
through both and compares.

Off on SQLite, with `PREFLOOP_FAST_LANE=0`, and where a test overrides the request session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import get_settings
from app.core.db import LOCK_TIMEOUT_MS, UNAVAILABLE_DETAIL, UNAVAILABLE_RETRY_AFTER, get_session
from app.core.deps import CSRF_HEADER, SESSION_COOKIE, project_role, same_origin
from app.core.health import FAST_LANE, VOTES
from app.core.security import hash_token, tokens_equal
from app.images.signing import served_image_url
from app.pairs.ordering import spread_sql
from app.pairs.routes import to_public
from app.pairs.scheduler import _RESERVE_IF_OPEN, CANDIDATE_WINDOW, ServedPair, held_pair
from app.projects.schemas import ProjectSettings
from app.projects.settings import load_settings
from app.users.service import LAST_USED_RESOLUTION
from app.votes.routes import fault_exit_wanted
from app.votes.schemas import VoteCreate
from app.votes.service import _VOTE_AND_RELEASE, Standing, checked_input, rate_window, refusal
from app.votes.vocabulary import Choice

log = logging.getLogger("prefloop.fast_lane")
T = TypeVar("T")

# Nine digits: an id that fits Postgres' integer; longer ones go the long way (422 there).
_NEXT = re.compile(r"/api/v1/projects/([0-9]{1,9})/pairs/next")
_VOTE = re.compile(r"/api/v1/pairs/([0-9]{1,9})/votes")
_PAGE_VOTE = re.compile(r"/projects/([0-9]{1,9})/vote")
NEXT_ROUTE = "/api/v1/projects/{project_id}/pairs/next"
PAGE_VOTE_ROUTE = "/projects/{project_id}/vote"
VOTE_ROUTE = "/api/v1/pairs/{pair_id}/votes"
# A vote's body is a few hundred bytes; anything larger is not a plain vote.
MAX_BODY = 4096
# Connections per web process: what its requests can use at once. Waiting longer than the
# timeout for one answers 503, as an exhausted pool does on the long way.
POOL_SIZE = 10
ACQUIRE_TIMEOUT_S = 10.0
# Candidates tried per tier when the locked one turned out full meanwhile.
MAX_TRIES = 8


def numbered(sql: str) -> str:
    """A statement written with `:name` parameters (SQLAlchemy `text`) in asyncpg's `$n` style;
    names in order of first use, so the service's statement is written once."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return re.sub(r"(?<![:\w]):([a-z_]+)", number, sql)


def parameter_names(sql: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"(?<![:\w]):([a-z_]+)", sql)))


def _who(*, via: str, now: str, resolution: str, lock: str = "") -> str:
    """The CTEs naming who asks, by API token or browser login ($1: its hash), with the login's
    CSRF token (`csrf`). A token must be unrevoked, and its last use is noted at most once per
    `LAST_USED_RESOLUTION`, as `users.service.user_for_token` does; a login must not have
    expired (`session_for_token`). `now` and `resolution` name the other parameters."""
    if via == "session":
        return f"""
  tok AS (
    SELECT s.id, s.user_id, NULL::integer AS scope, u.role, u.is_active, s.csrf_token AS csrf
    FROM user_sessions s JOIN users u ON u.id = s.user_id
    WHERE s.token_hash = $1 AND s.expires_at >= {now}::timestamptz {lock}
  ), touched AS (
    -- A login notes no last use; this keeps the parameters those of the token statement.
    SELECT {now}::timestamptz, {resolution}::float8
  )
"""
    return f"""
  tok AS (
    SELECT t.id, t.user_id, t.project_id AS scope, u.role, u.is_active, NULL::text AS csrf
    FROM api_tokens t JOIN users u ON u.id = t.user_id
    WHERE t.token_hash = $1 AND t.revoked_at IS NULL {lock}
  ), touched AS (
    UPDATE api_tokens SET last_used_at = {now}::timestamptz
    WHERE id = (SELECT id FROM tok)
      AND (last_used_at IS NULL
           OR last_used_at <= {now}::timestamptz - make_interval(secs => {resolution}))
  )
"""


VIAS = ("token", "session")

# $1 token hash, $2 project, $3 now, $4 last-used resolution (s). The user row is locked, which
# serialises one annotator's own concurrent requests, as the scheduler's `_held` does.
NEXT_WHO = {
    via: "WITH"
    + _who(via=via, now="$3", resolution="$4", lock="FOR NO KEY UPDATE OF u")
    + """
SELECT tok.user_id, tok.role, tok.is_active, tok.scope,
       pj.id, pj.archived_at IS NOT NULL, pj.settings::text, m.role,
       h.pair_id, h.left_image_id, h.expires_at, h.image_a_id, h.image_b_id, h.is_gold,
       h.text, h.sha_a, h.sha_b,
       EXISTS (SELECT 1 FROM reservations x
               WHERE x.annotator_id = tok.user_id AND x.expires_at <= $3),
       tok.csrf
FROM tok
LEFT JOIN projects pj ON pj.id = $2
LEFT JOIN memberships m ON m.project_id = pj.id AND m.user_id = tok.user_id AND m.is_active
LEFT JOIN LATERAL (
  SELECT r.pair_id, r.left_image_id, r.expires_at, p.image_a_id, p.image_b_id, p.is_gold,
         pr.text, ia.sha256 AS sha_a, ib.sha256 AS sha_b
  FROM reservations r
  JOIN pairs p ON p.id = r.pair_id AND p.project_id = $2
  JOIN prompts pr ON pr.id = p.prompt_id
  JOIN images ia ON ia.id = p.image_a_id
  JOIN images ib ON ib.id = p.image_b_id
  WHERE r.annotator_id = tok.user_id AND r.expires_at > $3
  ORDER BY r.created_at DESC LIMIT 1
) h ON true
"""
    for via in VIAS
}


# The scheduler's candidates (`_candidates_stmt`: fewest votes first, a window of them) in its
# order (`fewest_votes_first`: votes + live reservations of others, ties spread per annotator),
# the first one no one else holds locked. $1 project, $2 annotator, $3 now, $4 gold
# tier, $5 pairs already tried; the window is a constant, so one generic plan serves every call.
ORDERED = f"""
WITH ordered AS MATERIALIZED (
  SELECT ARRAY(
    SELECT w.id FROM (
      SELECT c.id, c.vote_count + res.n AS load
      FROM pairs c CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM reservations r
        WHERE r.pair_id = c.id AND r.expires_at > $3 AND r.annotator_id <> $2
      ) res
      WHERE c.project_id = $1 AND c.is_gold = $4 AND NOT c.hidden
        AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = c.id AND v.annotator_id = $2)
        AND NOT (c.id = ANY($5::int[]))
        AND ($4 OR (c.vote_count < c.votes_wanted AND c.vote_count + res.n < c.votes_wanted))
      ORDER BY c.vote_count LIMIT {CANDIDATE_WINDOW}
    ) w
    ORDER BY w.load, {spread_sql("w.id", "$2")}
  ) AS ids
)
"""
CANDIDATE = (
    ORDERED
    + """
SELECT p.id, p.image_a_id, p.image_b_id
FROM pairs p
WHERE p.id = ANY((SELECT ids FROM ordered)::int[])
ORDER BY array_position((SELECT ids FROM ordered)::int[], p.id)
LIMIT 1
FOR NO KEY UPDATE OF p SKIP LOCKED
"""
)
# The vote page's preload: the pair likely to come next (`scheduler.peek_candidate`), nothing
# locked or reserved; same parameters, $5 the pair just served.
PEEK = (
    ORDERED
    + """
SELECT p.image_a_id, p.image_b_id, ia.sha256, ib.sha256
FROM pairs p
JOIN images ia ON ia.id = p.image_a_id
JOIN images ib ON ib.id = p.image_b_id
WHERE p.id = ((SELECT ids FROM ordered)::int[])[1]
"""
)


def _compiled(stmt: Any) -> tuple[str, Callable[[dict[str, Any]], list[Any]]]:
    """A SQLAlchemy statement as asyncpg SQL, and the positional values for given parameters
    (the statement's own constants included): services' statements are written once."""
    from sqlalchemy.dialects.postgresql.asyncpg import dialect

    compiled = stmt.compile(dialect=dialect())
    order = list(compiled.positiontup or [])

    def values(given: dict[str, Any]) -> list[Any]:
        bound = compiled.construct_params(given)
        return [bound[name] for name in order]

    return compiled.string, values


@lru_cache(maxsize=1)
def _drop_expired() -> tuple[str, Callable[[dict[str, Any]], list[Any]]]:
    """The scheduler's removal of an annotator's lapsed reservations, compiled once."""
    from sqlalchemy import DateTime, Integer, bindparam

    from app.pairs.scheduler import expired_reservations

    return _compiled(
        expired_reservations(
            bindparam("annotator_id", type_=Integer),
            bindparam("before", type_=DateTime(timezone=True)),
        )
    )


@lru_cache(maxsize=1)
def _page_counters() -> tuple[str, Callable[[dict[str, Any]], list[Any]]]:
    """The vote page's counters (`pages.counters`), compiled once."""
    from sqlalchemy import DateTime, Integer, bindparam

    from app.pairs.scheduler import counted_pairs_left
    from app.votes.pages import counters

    project_id = bindparam("project_id", type_=Integer)
    annotator_id = bindparam("annotator_id", type_=Integer)
    now = bindparam("now", type_=DateTime(timezone=True))
    left = counted_pairs_left(project_id, annotator_id)
    return _compiled(counters(project_id, annotator_id, now, left))


RESERVE_NAMES = parameter_names(_RESERVE_IF_OPEN.text)
RESERVE = numbered(_RESERVE_IF_OPEN.text)

# $1 token hash, $2 pair, $3 idempotency key, $4 now, $5 the default votes per second, $6
# last-used resolution (s). The rate window is read from the stored settings here and checked
# against the validated settings in Python (a mismatch goes the long way).
VOTE_WHO = {
    via: "WITH"
    + _who(via=via, now="$4", resolution="$6")
    + """
SELECT tok.user_id, tok.role, tok.is_active, tok.scope,
       p.project_id, p.image_a_id, p.image_b_id, p.is_gold, p.vote_count, p.votes_wanted,
       pj.settings::text, m.role, w.seconds,
       EXISTS (SELECT 1 FROM votes v WHERE v.annotator_id = tok.user_id
               AND (v.pair_id = p.id OR v.idempotency_key = $3)),
       rate.recent, rate.oldest, r.expires_at, r.pair_id IS NOT NULL,
       (SELECT count(*) FROM reservations o
        WHERE o.pair_id = p.id AND o.expires_at > $4 AND o.annotator_id <> tok.user_id),
       tok.csrf
FROM tok
JOIN pairs p ON p.id = $2
JOIN projects pj ON pj.id = p.project_id
CROSS JOIN LATERAL (
  SELECT greatest(1.0, 1.0 / coalesce((pj.settings->>'votes_per_second')::float8, $5))::float8
         AS seconds
) w
CROSS JOIN LATERAL (
  SELECT count(*) AS recent, min(v.created_at) AS oldest FROM votes v
  WHERE v.project_id = p.project_id AND v.annotator_id = tok.user_id
    AND v.created_at > $4::timestamptz - make_interval(secs => w.seconds)
) rate
LEFT JOIN memberships m
  ON m.project_id = p.project_id AND m.user_id = tok.user_id AND m.is_active
LEFT JOIN reservations r ON r.pair_id = p.id AND r.annotator_id = tok.user_id
FOR NO KEY UPDATE OF p
"""
    for via in VIAS
}

VOTE_NAMES = parameter_names(_VOTE_AND_RELEASE.text)
DEFAULT_VOTES_PER_SECOND = float(ProjectSettings.model_fields["votes_per_second"].default)
VOTE = numbered(_VOTE_AND_RELEASE.text)


@lru_cache(maxsize=256)
def _settings(raw: str | None) -> ProjectSettings:
    return load_settings(json.loads(raw) if raw else None)


async def _no_session_state(conn: Any) -> None:
    """The pool's reset on release. The lane leaves no session state behind (no SET, LISTEN,
    cursor or advisory lock; an open transaction is still rolled back by the pool), so the
    default reset query would be one more round trip per request for nothing."""


@dataclass(frozen=True)
class Served:
    pair: ServedPair
    annotator_id: int
    settings: ProjectSettings


@dataclass(frozen=True)
class Stored:
    vote_id: int
    annotator_id: int
    created_at: dt.datetime
    settings: ProjectSettings


@dataclass(frozen=True)
class PageTurn:
    """What the vote page's one transaction read: the stored vote, the next pair, the page's
    counters and the preload peek (image ids and hashes, or None)."""

    stored: Stored
    served: Served
    given: int
    left: int
    sitting: int
    peek: Any
    now: dt.datetime


# The vote form's fields (app.votes.pages.cast_vote); any other field goes the long way.
_PAGE_FIELDS = frozenset(
    {"pair_id", "left_image_id", "choice", "latency_ms", "idempotency_key", "csrf_token"}
)


def _page_vote_fields(fields: dict[str, str]) -> VoteCreate:
    """The vote page's form as the API's vote body; raises LongWay or ValidationError where the
    page's own reading (`app.votes.pages.cast_vote`) could differ."""
    from app.votes.pages import _latency

    pair_id, latency = fields.get("pair_id", ""), fields.get("latency_ms", "")
    if not (pair_id.isascii() and pair_id.isdigit() and len(pair_id) <= 9) or len(latency) > 12:
        raise LongWay
    key = fields.get("idempotency_key", "")
    return VoteCreate.model_validate(
        {
            "choice": fields.get("choice", ""),
            "left_image_id": fields.get("left_image_id", ""),
            "latency_ms": _latency(latency),
            "idempotency_key": key or None,
        }
    )


class LongWay(Exception):
    """Not a plain case: the full application answers this request."""


@dataclass
class _Route:
    # What the metrics middleware reads from scope["route"].
    path: str


def _bearer(scope: Scope) -> str | None:
    """The Bearer token, read as `app.core.deps.lookup_auth` reads it."""
    header = (_header(scope, b"authorization") or b"").decode("latin-1")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """(the whole body, or None when it is larger than MAX_BODY or cut short; a `receive` that
    gives the full application the same messages again)."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if len(body) > MAX_BODY or not message.get("more_body", False):
            break
    last = messages[-1]
    whole = len(body) <= MAX_BODY and last["type"] == "http.request" and not last.get("more_body")
    return (body if whole else None), _replaying(messages, receive)


def _form(body: bytes) -> dict[str, str] | None:
    """A urlencoded form with each field once, or None."""
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return None
    fields = dict(pairs)
    return fields if len(fields) == len(pairs) else None


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """`receive` for the full application after the fast lane has read the body."""
    pending = list(messages)

    async def again() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return again


class FastLane:
    """ASGI middleware: the plain annotator requests on asyncpg, the rest to `app`."""

    def __init__(self, app: ASGIApp, dsn: str | None = None, pool_size: int = POOL_SIZE) -> None:
        self.app = app
        # None: the settings' database, when it is Postgres and the lane is on.
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        # Tests count round trips through this: called with each statement sent.
        self.on_statement: Callable[[str], None] | None = None

    def _active(self, scope: Scope) -> bool:
        if self.dsn is None:
            settings = get_settings()
            if settings.is_sqlite or not settings.fast_lane:
                return False
        app = scope.get("app")
        # A test's request session (a rolled-back transaction) is invisible to other connections.
        return app is None or get_session not in getattr(app, "dependency_overrides", {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path.endswith("/pairs/next"):
                match = _NEXT.fullmatch(path)
                if match and self._active(scope):
                    await self._next(scope, receive, send, int(match.group(1)))
                    return
            elif method == "POST" and path.endswith("/votes"):
                match = _VOTE.fullmatch(path)
                if match and self._active(scope):
                    await self._vote(scope, receive, send, int(match.group(1)))
                    return
            elif method == "POST" and path.endswith("/vote"):
                match = _PAGE_VOTE.fullmatch(path)
                if match and _header(scope, b"hx-request") == b"true" and self._active(scope):
                    await self._page_vote(scope, receive, send, int(match.group(1)))
                    return
        await self.app(scope, receive, send)

    # --- plumbing ---------------------------------------------------------------------------

    async def pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    import asyncpg

                    url = self.dsn or get_settings().sqlalchemy_url
                    dsn = re.sub(r"^postgresql\+\w+://", "postgresql://", url)
                    self._pool = await asyncpg.create_pool(
                        dsn,
                        min_size=0,
                        max_size=self.pool_size,
                        reset=_no_session_state,
                        # A database that does not answer fails the lane fast: the request
                        # then goes the long way, which says 503.
                        timeout=5,
                        # Postgres' own choice between custom and generic plans: forcing
                        # generic plans cost 15-20 % more database CPU per cycle, forcing
                        # custom ones 30 % (benchmarks/vote_path.py's ceiling, same run).
                        server_settings={"lock_timeout": str(LOCK_TIMEOUT_MS)},
                    )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _fetchrow(self, conn: Any, sql: str, *args: Any) -> Any:
        if self.on_statement is not None:
            self.on_statement(sql)
        return await conn.fetchrow(sql, *args)

    async def _execute(self, conn: Any, sql: str, *args: Any) -> None:
        if self.on_statement is not None:
            self.on_statement(sql)
        await conn.execute(sql, *args)

    async def _through(
        self,
        request: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        work: Callable[[Any], Awaitable[T]],
    ) -> T | None:
        """Run `work` on a pooled connection and return its result, or None when the request
        has been answered otherwise: by the full application when it is not a plain one
        (`LongWay`) or the database failed before answering (a commit that failed to answer may
        have landed: the long way then finds the vote and answers it as a replay), or with 503
        when no connection came free in time."""
        try:
            pool = await self.pool()
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                result: T | None = await work(conn)
        except TimeoutError:
            await self._unavailable(send)
            return None
        except LongWay:
            result = None
        except Exception:  # noqa: BLE001 - any database trouble: the long way decides
            log.warning("fast_lane.failed %s %s", request, scope["path"], exc_info=True)
            result = None
        if result is None:
            await self._long_way(request, scope, receive, send)
            return None
        FAST_LANE.labels(request, "lane").inc()
        return result

    async def _long_way(self, request: str, scope: Scope, receive: Receive, send: Send) -> None:
        FAST_LANE.labels(request, "long").inc()
        await self.app(scope, receive, send)

    async def _unavailable(self, send: Send) -> None:
        body = json.dumps({"detail": UNAVAILABLE_DETAIL}).encode()
        await _answer(send, 503, body, [(b"retry-after", UNAVAILABLE_RETRY_AFTER.encode())])

    # --- GET /api/v1/projects/{project_id}/pairs/next ---------------------------------------

    async def _next(self, scope: Scope, receive: Receive, send: Send, project_id: int) -> None:
        token = _bearer(scope)
        if not token:
            await self.app(scope, receive, send)
            return
        scope["route"] = _Route(NEXT_ROUTE)
        served = await self._through(
            "next", scope, receive, send, lambda conn: self.serve(conn, token, project_id)
        )
        if served is None:
            return
        body = to_public(served.pair, served.annotator_id).model_dump_json().encode()
        await _answer(send, 200, body, [])

    async def serve(
        self, conn: Any, credential: str, project_id: int, *, via: str = "token"
    ) -> Served:
        """Reserve the annotator's next pair in a transaction of its own. Raises `LongWay` when
        the request is not a plain one (nothing is written then). `credential`: the API token or
        login cookie (`via`)."""
        self._mark("BEGIN")
        async with conn.transaction():
            served = await self._serve_in(conn, credential, project_id, via=via)
        self._mark("COMMIT")
        return served

    async def _serve_in(self, conn: Any, credential: str, project_id: int, *, via: str) -> Served:
        now = dt.datetime.now(dt.UTC)
        row = await self._fetchrow(
            conn,
            NEXT_WHO[via],
            hash_token(credential),
            project_id,
            now,
            LAST_USED_RESOLUTION.total_seconds(),
        )
        if row is None or not row[2] or row[4] is None or row[5]:
            raise LongWay  # unknown token, inactive user, unknown or archived project
        user_id = row[0]
        user = SimpleNamespace(role=row[1], token_project_id=row[3])
        if project_role(user, project_id, row[7]) is None:  # type: ignore[arg-type]
            raise LongWay
        settings = _settings(row[6])
        if settings.active_sampling:
            raise LongWay
        if row[8] is not None:  # the annotator's live reservation: the same pair again
            return Served(held_pair(*row[8:17]), user_id, settings)
        if row[17]:
            # Lapsed ones would collide with a new reservation of the same pair.
            sql, values = _drop_expired()
            await self._execute(conn, sql, *values({"annotator_id": user_id, "before": now}))
        gold_first = settings.gold_rate > 0 and random.random() < settings.gold_rate
        for gold in (True, False) if gold_first else (False,):
            served = await self._reserve(conn, project_id, user_id, gold, settings, now)
            if served is not None:
                return Served(served, user_id, settings)
        # Nothing plain to serve (none left, or all locked this instant): the scheduler's
        # looks, 204 and 503 are the long way's.
        raise LongWay

    def _mark(self, command: str) -> None:
        if self.on_statement is not None:
            self.on_statement(command)

    async def _reserve(
        self,
        conn: Any,
        project_id: int,
        user_id: int,
        gold: bool,
        settings: ProjectSettings,
        now: dt.datetime,
    ) -> ServedPair | None:
        tried: list[int] = []
        for _ in range(MAX_TRIES):
            cand = await self._fetchrow(
                conn, CANDIDATE, project_id, user_id, now, gold, tried
            )
            if cand is None:
                return None
            pair_id, a, b = cand
            on_a = random.random() < 0.5
            left, right = (a, b) if on_a else (b, a)
            expires_at = now + dt.timedelta(minutes=settings.reservation_minutes)
            values = {
                "pair_id": pair_id,
                "annotator_id": user_id,
                "left_image_id": left,
                "now": now,
                "expires_at": expires_at,
            }
            found = await self._fetchrow(conn, RESERVE, *(values[n] for n in RESERVE_NAMES))
            if found is not None:
                prompt, sha_a, sha_b = found
                return ServedPair(
                    pair_id,
                    prompt,
                    left,
                    right,
                    expires_at,
                    gold,
                    sha_a if on_a else sha_b,
                    sha_b if on_a else sha_a,
                )
            tried.append(pair_id)
        return None

    # --- POST /api/v1/pairs/{pair_id}/votes -------------------------------------------------

    async def _vote(self, scope: Scope, receive: Receive, send: Send, pair_id: int) -> None:
        token = _bearer(scope)
        content_type = _header(scope, b"content-type") or b""
        if not token or not content_type.startswith(b"application/json"):
            await self.app(scope, receive, send)
            return
        body, again = await _read_body(receive)
        try:
            if body is None:
                raise LongWay
            data = VoteCreate.model_validate_json(body)
            picked = checked_input(data.choice, data.latency_ms, data.idempotency_key)
        except (LongWay, ValidationError, ValueError):
            await self._long_way("vote", scope, again, send)
            return
        scope["route"] = _Route(VOTE_ROUTE)
        stored = await self._through(
            "vote",
            scope,
            again,
            send,
            lambda conn: self.store(conn, token, pair_id, data, picked.is_preference),
        )
        if stored is None:
            return
        VOTES.labels(data.choice.value).inc()
        if fault_exit_wanted(data.idempotency_key):
            os._exit(70)
        await _answer(send, 201, json.dumps({"vote_id": stored.vote_id}).encode(), [])

    async def store(
        self,
        conn: Any,
        credential: str,
        pair_id: int,
        data: VoteCreate,
        counts: bool,
        *,
        via: str = "token",
        csrf: str | None = None,
        project_id: int | None = None,
    ) -> Stored:
        """Store a plain new vote. Raises `LongWay` otherwise (nothing written then).

        A browser login (`via` "session") must send its CSRF token (`csrf`); `project_id`, when
        given, is the project the pair must belong to (the vote page's)."""
        self._mark("BEGIN")
        async with conn.transaction():
            stored = await self._store_in(
                conn, credential, pair_id, data, counts, via=via, csrf=csrf, project_id=project_id
            )
        self._mark("COMMIT")
        return stored

    async def _store_in(
        self,
        conn: Any,
        credential: str,
        pair_id: int,
        data: VoteCreate,
        counts: bool,
        *,
        via: str,
        csrf: str | None,
        project_id: int | None,
    ) -> Stored:
        now = dt.datetime.now(dt.UTC)
        row = await self._fetchrow(
            conn,
            VOTE_WHO[via],
            hash_token(credential),
            pair_id,
            data.idempotency_key,
            now,
            DEFAULT_VOTES_PER_SECOND,
            LAST_USED_RESOLUTION.total_seconds(),
        )
        if row is None or not row[2]:
            raise LongWay  # unknown token, inactive user, unknown pair
        (user_id, role, _, scope_id, in_project, a, b, is_gold, vote_count, wanted) = row[:10]
        settings_raw, member_role, window, seen, recent, oldest = row[10:16]
        expires, has_reservation, others, expected_csrf = row[16:20]
        if via == "session" and not (csrf and tokens_equal(csrf, expected_csrf)):
            raise LongWay  # the long way refuses it (403)
        if project_id is not None and in_project != project_id:
            raise LongWay
        user = SimpleNamespace(role=role, token_project_id=scope_id)
        if project_role(user, in_project, member_role) is None:  # type: ignore[arg-type]
            raise LongWay
        if data.left_image_id not in (a, b) or seen:
            raise LongWay  # 422, or a replay / second vote: answered the long way
        settings = _settings(settings_raw)
        if window != rate_window(settings):
            raise LongWay  # stored settings the statement read otherwise than Python
        standing = Standing(False, recent, oldest, expires, has_reservation)
        refused = refusal(
            pair_id=pair_id,
            is_gold=is_gold,
            votes_wanted=wanted,
            settings=settings,
            standing=standing,
            latency_ms=data.latency_ms,
            counts=counts,
            has_room=lambda: is_gold or vote_count + others < wanted,
            now=now,
        )
        if refused is not None:
            raise LongWay
        values = {
            "pair_id": pair_id,
            "project_id": in_project,
            "annotator_id": user_id,
            "left_image_id": data.left_image_id,
            "choice": data.choice.value,
            "latency_ms": data.latency_ms,
            "idempotency_key": data.idempotency_key,
            "created_at": now,
            "counts": int(counts),
        }
        stored = await self._fetchrow(conn, VOTE, *(values[n] for n in VOTE_NAMES))
        if stored is None:
            raise LongWay  # a concurrent identical request won: a replay
        return Stored(int(stored[0]), user_id, now, settings)

    # --- POST /projects/{project_id}/vote (the vote page, htmx) ------------------------------

    async def _page_vote(self, scope: Scope, receive: Receive, send: Send, project_id: int) -> None:
        request = Request(scope)
        cookie = request.cookies.get(SESSION_COOKIE)
        form = request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        )
        if not cookie or not form or not same_origin(request):
            await self.app(scope, receive, send)
            return
        body, again = await _read_body(receive)
        fields = _form(body) if body is not None else None
        try:
            if fields is None or not _PAGE_FIELDS.issuperset(fields):
                raise LongWay
            vote = _page_vote_fields(fields)
            picked = checked_input(vote.choice, vote.latency_ms, vote.idempotency_key)
        except (LongWay, ValidationError, ValueError):
            await self._long_way("page", scope, again, send)
            return
        csrf = request.headers.get(CSRF_HEADER) or fields.get("csrf_token")
        scope["route"] = _Route(PAGE_VOTE_ROUTE)
        pair_id = int(fields["pair_id"])
        # Where the vote was stored and no plain next pair follows, the long way finds the vote
        # and answers it as a replay.
        html = await self._through(
            "page",
            scope,
            again,
            send,
            lambda conn: self._page_answer(conn, cookie, project_id, pair_id, vote, picked, csrf),
        )
        if html is None:
            return
        body_out = html.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"content-length", str(len(body_out)).encode()),
                    # Same URL serves a full page or an htmx partial (app.core.web.render).
                    (b"vary", b"HX-Request"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body_out})

    async def turn_page(
        self,
        conn: Any,
        cookie: str,
        project_id: int,
        pair_id: int,
        vote: VoteCreate,
        choice: Choice,
        csrf: str | None,
    ) -> PageTurn:
        """The vote page's transaction, as `app.votes.pages.cast_vote` runs it: store the vote,
        serve the next pair, read the counters and the preload peek. Raises `LongWay` where that
        is not plain; where the vote was stored but no plain next pair follows, the vote is
        committed first (the long way then answers the request as the replay it is)."""
        self._mark("BEGIN")
        async with conn.transaction():
            stored = await self._store_in(
                conn,
                cookie,
                pair_id,
                vote,
                choice.is_preference,
                via="session",
                csrf=csrf,
                project_id=project_id,
            )
            turn: PageTurn | None = None
            try:
                if stored.settings.reveal_gold:
                    raise LongWay  # the gold record is the long way's
                served = await self._serve_in(conn, cookie, project_id, via="session")
            except LongWay:
                pass  # the vote stands (committed below)
            else:
                now = dt.datetime.now(dt.UTC)
                annotator_id = served.annotator_id
                sql, values = _page_counters()
                given, left, sitting = await self._fetchrow(
                    conn,
                    sql,
                    *values({"project_id": project_id, "annotator_id": annotator_id, "now": now}),
                )
                peek = await self._fetchrow(
                    conn, PEEK, project_id, annotator_id, now, False, [served.pair.pair_id]
                )
                turn = PageTurn(stored, served, given, left, sitting, peek, now)
        self._mark("COMMIT")
        VOTES.labels(choice.value).inc()
        if turn is None:
            raise LongWay
        return turn

    async def _page_answer(
        self,
        conn: Any,
        cookie: str,
        project_id: int,
        pair_id: int,
        vote: VoteCreate,
        choice: Choice,
        csrf: str | None,
    ) -> str:
        """The vote area after `turn_page`, rendered from the page's own context builder."""
        from app.core.web import templates
        from app.votes import pages

        turn = await self.turn_page(conn, cookie, project_id, pair_id, vote, choice, csrf)
        settings, annotator_id, peek = turn.stored.settings, turn.served.annotator_id, turn.peek
        preload = (
            [
                served_image_url(peek[0], peek[2] or "", annotator_id),
                served_image_url(peek[1], peek[3] or "", annotator_id),
            ]
            if peek is not None
            else []
        )
        ctx = pages.vote_context(
            project=SimpleNamespace(id=project_id),
            settings=settings,
            pair=pages.served_pair(turn.served.pair, annotator_id),
            preload=preload,
            undo=pages.undo_offer(
                settings, turn.stored.vote_id, choice.value, turn.stored.created_at, turn.now
            ),
            notice=pages.saved_notice(choice.value),
            error=None,
            busy=False,
            generating=None,
            figures=pages.figures_given(
                settings, given=turn.given, left=turn.left, sitting=turn.sitting
            ),
        )
        ctx["csrf_token"] = csrf
        return str(templates.get_template("partials/vote_area.html").render(ctx))
