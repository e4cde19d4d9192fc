"""The annotator hot path, measured from the client: next pair + vote + the pair's 2 image GETs.

For each project size in `--pairs` (a fresh Postgres database each), it:
1. counts the SQL statements of one vote cycle in-process (a `before_cursor_execute` hook on
   the engine, the same app code; 20 cycles, the median reported) for the chosen flow;
2. starts uvicorn (`--workers`) and runs simulated annotators, one keep-alive connection each
   (as browsers have), in one of two modes: `--saturate` (closed loop, no think time: capacity)
   or `--think S` (a pause uniform over [0.5, 1.5] x S between cycles: what a person sees);
3. times every request from the moment the client issues it (connection wait and server
   queueing included) and the whole cycle (next → vote → both images answered);
4. reads CPU time from /proc for the uvicorn processes and the database's backends before and
   after the measured window: CPU per acknowledged vote cycle;
5. drives the cycle's SQL ceiling in the same run: the minimal statements of a cycle (one
   reserve-and-fetch CTE, one vote-and-release CTE, the same k / SKIP LOCKED / idempotency
   rules; images need none with signed URLs) through psycopg's async connections, over as many
   connections as the web processes held, no HTTP.
Checked: zero errors, acknowledged votes == stored rows, no pair over k.

Flows: `api` (GET /pairs/next, POST /pairs/{id}/votes, 2 x GET image; Bearer token) or `page`
(the htmx vote page: POST /projects/{id}/vote answering the next pair's partial, then its 2
images; session cookie + CSRF header).

Run: .venv/bin/python benchmarks/vote_path.py --saturate --annotators 32 --seconds 15
     .venv/bin/python benchmarks/vote_path.py --think 1 --annotators 200 --seconds 30
     .venv/bin/python benchmarks/vote_path.py --saturate --pairs 1000,100000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

# The code under test: this checkout, or `--repo PATH` (a baseline export, for before/after).
REPO = Path(__file__).resolve().parents[1]
if "--repo" in sys.argv:
    REPO = Path(sys.argv[sys.argv.index("--repo") + 1]).resolve()
sys.path.insert(0, str(REPO))

ADMIN_URL = os.environ.get("PREFLOOP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TICKS = os.sysconf("SC_CLK_TCK")


def db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def admin(sql: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_png(shade: int) -> bytes:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (64, 64), (shade, 128, 255 - shade)).save(buf, format="PNG")
    return buf.getvalue()


# --- the project -------------------------------------------------------------------------------


def populate(
    url: str, media: Path, *, annotators: int, pairs: int, k: int, tag: str = ""
) -> dict[str, Any]:
    """A project with `pairs` open pairs and `annotators` members, each with an API token and a
    browser session; bulk SQL so that 100 k pairs load in seconds. `tag` tells apart several
    projects of one database (their images, users and names)."""
    from app.core.security import hash_token, new_session_token, new_token
    from app.core.storage import MediaStore
    from app.projects.schemas import ProjectSettings
    from app.projects.settings import dump_settings

    store = MediaStore(media)
    files = [store.put(tiny_png(shade)) for shade in (40, 200)]
    settings = dump_settings(ProjectSettings(votes_per_pair=k, votes_per_second=100))
    tokens = [new_token() for _ in range(annotators)]
    cookies = [new_session_token() for _ in range(annotators)]
    csrfs = [new_session_token() for _ in range(annotators)]
    with psycopg.connect(url) as conn:
        project_id = conn.execute(
            "INSERT INTO projects (name, description, settings, created_at)"
            " VALUES (%s, '', %s, now()) RETURNING id",
            (f"bench{tag}", json.dumps(settings)),
        ).fetchone()[0]
        prompt_id = conn.execute(
            "INSERT INTO prompts (project_id, text, split, tags, created_at)"
            " VALUES (%s, 'a bench prompt', 'train', '[]', now()) RETURNING id",
            (project_id,),
        ).fetchone()[0]
        models = [
            conn.execute(
                "INSERT INTO model_versions (project_id, name, base, params, status, evaluation,"
                " created_at) VALUES (%s, %s, 'toy', '{}', 'arena', '{}', now()) RETURNING id",
                (project_id, f"m{i}"),
            ).fetchone()[0]
            for i in range(2)
        ]
        # Image i of pair n: id md5(tag || 'img' || n || '-' || i); model i, seed n; the bytes
        # of file i.
        for i in range(2):
            conn.execute(
                "INSERT INTO images (id, project_id, prompt_id, model_version_id, seed, sha256,"
                " storage_key, width, height, provenance, created_at)"
                " SELECT md5(%s || 'img' || n || '-' || %s), %s, %s, %s, n, %s, %s, 64, 64, '{}',"
                " now() FROM generate_series(1, %s) AS n",
                (tag, i, project_id, prompt_id, models[i], files[i][0], files[i][1], pairs),
            )
        # The open-pair counter's row trigger (migration 0006) would update one row once per
        # pair in a single transaction, slower with every row; it is set once here instead
        # (every pair is open: not gold, not hidden, no votes yet).
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "INSERT INTO pairs (project_id, prompt_id, image_a_id, image_b_id, purpose, is_gold,"
            " votes_wanted, vote_count, created_at)"
            " SELECT %s, %s, least(a, b), greatest(a, b), 'eval', false, %s, 0, now()"
            " FROM (SELECT md5(%s || 'img' || n || '-0') AS a, md5(%s || 'img' || n || '-1') AS b"
            "       FROM generate_series(1, %s) AS n) AS s",
            (project_id, prompt_id, k, tag, tag, pairs),
        )
        conn.execute(
            "INSERT INTO pair_counts (project_id, open_pairs) VALUES (%s, %s)",
            (project_id, pairs),
        )
        conn.execute("SET LOCAL session_replication_role = origin")
        users = []
        for n in range(annotators):
            uid = conn.execute(
                "INSERT INTO users (email, role, is_active, groups, created_at)"
                " VALUES (%s, 'annotator', true, '[]', now()) RETURNING id",
                (f"{tag}a{n}@bench.test",),
            ).fetchone()[0]
            users.append(uid)
            conn.execute(
                "INSERT INTO memberships (project_id, user_id, role, is_active, created_at)"
                " VALUES (%s, %s, 'annotator', true, now())",
                (project_id, uid),
            )
            conn.execute(
                "INSERT INTO api_tokens (user_id, token_hash, prefix, name, created_at)"
                " VALUES (%s, %s, %s, 'bench', now())",
                (uid, hash_token(tokens[n]), tokens[n][:10]),
            )
            conn.execute(
                "INSERT INTO user_sessions (token_hash, user_id, csrf_token, created_at,"
                " expires_at, user_agent) VALUES (%s, %s, %s, now(), now() + interval '1 day',"
                " 'bench')",
                (hash_token(cookies[n]), uid, csrfs[n]),
            )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        # A live database has planner statistics, and hint bits set on rows read before (the
        # first reads after a bulk load would set them, on the clock of the measured window).
        conn.execute("VACUUM (ANALYZE)")
    return {
        "project_id": project_id,
        "users": users,
        "tokens": tokens,
        "cookies": cookies,
        "csrfs": csrfs,
    }


# --- the client ---------------------------------------------------------------------------------


class Http:
    """Minimal HTTP/1.1 keep-alive client (one connection): the load generator shares the
    machine's cores with the server, so it must cost as little as possible."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        ctype: str = "application/json",
        extra: str = "",
    ) -> tuple[int, bytes, float]:
        """(status, body, ms from issuing the request to the last byte of the answer)."""
        start = time.perf_counter()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n{self.headers}{extra}"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length) if length else b""
        return status, data, (time.perf_counter() - start) * 1000

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class Tally:
    request_ms: dict[str, list[float]] = field(
        default_factory=lambda: {"next": [], "vote": [], "image": []}
    )
    cycle_ms: list[float] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    empty: int = 0
    busy: int = 0
    all_acked: int = 0  # warm-up included: compared with the rows the load added
    measuring: bool = False

    def ms(self, kind: str, value: float) -> None:
        if self.measuring:
            self.request_ms[kind].append(value)


PAGE_PAIR = re.compile(rb'name="pair_id" value="(\d+)"')
PAGE_LEFT = re.compile(rb'name="left_image_id" value="([0-9a-f]+)"')
PAGE_IMG = re.compile(rb'<img src="([^"]+)"')


async def fetch_images(http: Http, urls: list[str], tally: Tally) -> bool:
    for url in urls:
        status, data, ms = await http.request("GET", url.replace("&amp;", "&"))
        tally.ms("image", ms)
        if status != 200 or not data.startswith(b"\x89PNG"):
            tally.errors.append(f"image {status} {url}")
            return False
    return True


async def api_cycle(http: Http, project_id: int, rng: random.Random, tally: Tally) -> str:
    t0 = time.perf_counter()
    status, data, ms = await http.request("GET", f"/api/v1/projects/{project_id}/pairs/next")
    tally.ms("next", ms)
    if status == 204:
        tally.empty += 1
        return "empty"
    if status == 503:  # every open pair locked at that instant: the API says ask again
        tally.busy += 1
        return "busy"
    if status != 200:
        tally.errors.append(f"next {status} {data[:200]!r}")
        return "error"
    pair = json.loads(data)
    if not await fetch_images(http, [pair["left"]["url"], pair["right"]["url"]], tally):
        return "error"
    body = {
        "choice": rng.choice(("left", "right", "tie", "both_bad")),
        "left_image_id": pair["left"]["image_id"],
        "latency_ms": rng.randrange(600, 4000),
        "idempotency_key": uuid.uuid4().hex,
    }
    status, data, ms = await http.request(
        "POST", f"/api/v1/pairs/{pair['pair_id']}/votes", json.dumps(body).encode()
    )
    tally.ms("vote", ms)
    if status not in (200, 201):
        tally.errors.append(f"vote {status} {data[:200]!r}")
        return "error"
    tally.all_acked += 1
    if tally.measuring:
        tally.acked.append(json.loads(data)["vote_id"])
        tally.cycle_ms.append((time.perf_counter() - t0) * 1000)
    return "ok"


class PageState:
    def __init__(self) -> None:
        self.html: bytes | None = None


async def page_cycle(
    http: Http, project_id: int, rng: random.Random, tally: Tally, state: PageState, csrf: str
) -> str:
    """One vote on the htmx page: the POST answers with the next pair, whose images follow."""
    t0 = time.perf_counter()
    if state.html is None:
        status, data, ms = await http.request(
            "GET", f"/projects/{project_id}/vote", extra="HX-Request: true\r\n"
        )
        tally.ms("next", ms)
        if status != 200:
            tally.errors.append(f"page {status}")
            return "error"
        state.html = data
    html = state.html
    pair, left = PAGE_PAIR.search(html), PAGE_LEFT.search(html)
    if pair is None or left is None:
        state.html = None
        tally.empty += 1
        return "empty"
    form = (
        f"pair_id={pair.group(1).decode()}&left_image_id={left.group(1).decode()}"
        f"&choice={rng.choice(('left', 'right', 'tie', 'both_bad'))}"
        f"&latency_ms={rng.randrange(600, 4000)}&idempotency_key={uuid.uuid4().hex}"
    )
    status, data, ms = await http.request(
        "POST",
        f"/projects/{project_id}/vote",
        form.encode(),
        ctype="application/x-www-form-urlencoded",
        extra=f"HX-Request: true\r\nX-CSRF-Token: {csrf}\r\nOrigin: http://127.0.0.1:{http.port}\r\n",
    )
    tally.ms("vote", ms)
    if status != 200 or b"Saved:" not in data:
        tally.errors.append(f"vote {status} {data[:300]!r}")
        state.html = None
        return "error"
    state.html = data
    tally.all_acked += 1
    urls = [m.decode() for m in PAGE_IMG.findall(data)]
    if urls and not await fetch_images(http, urls[:2], tally):
        return "error"
    if tally.measuring:
        tally.acked.append(1)
        tally.cycle_ms.append((time.perf_counter() - t0) * 1000)
    return "ok"


async def annotator(
    n: int,
    args: argparse.Namespace,
    world: dict[str, Any],
    port: int,
    stop: asyncio.Event,
    tally: Tally,
) -> None:
    rng = random.Random(n)
    if args.flow == "api":
        http = Http(port, {"Authorization": f"Bearer {world['tokens'][n]}"})
    else:
        http = Http(port, {"Cookie": f"prefloop_session={world['cookies'][n]}"})
    state = PageState()
    try:
        await asyncio.sleep(rng.uniform(0, args.think or 0.05))  # not in lockstep
        while not stop.is_set():
            if args.flow == "api":
                outcome = await api_cycle(http, world["project_id"], rng, tally)
            else:
                outcome = await page_cycle(
                    http, world["project_id"], rng, tally, state, world["csrfs"][n]
                )
            if outcome in ("empty", "busy"):
                await asyncio.sleep(0.1)
            elif args.think:
                await asyncio.sleep(args.think * rng.uniform(0.5, 1.5))
    except Exception as exc:  # noqa: BLE001 - a dropped connection is an error to report
        tally.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        http.close()


# --- CPU from /proc -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def process_tree(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for kid in kids:
            out += process_tree(int(kid))
    return out


def backends(url: str, dbname: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return [r[0] for r in rows]


def snapshot(server_pid: int, url: str, dbname: str) -> dict[str, dict[int, float]]:
    return {
        "web": {p: cpu_seconds(p) for p in process_tree(server_pid)},
        "db": {p: cpu_seconds(p) for p in backends(url, dbname)},
    }


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    # A backend that started during the window counts whole (it did that work in the window).
    return sum(after[p] - before.get(p, 0.0) for p in after)


# --- statements per cycle (in-process, same app code) -------------------------------------------


def watch_fast_lane(app: Any, seen: list[str]) -> None:
    """Count the statements of the fast lane (app.votes.fast_lane) too, where the code under
    test has one: it runs on asyncpg, out of the engine's sight. BEGIN and COMMIT are left out,
    as they are for the engine."""
    try:
        from app.votes.fast_lane import FastLane
    except ImportError:  # a baseline from before the fast lane
        return
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, FastLane):
        layer = getattr(layer, "app", None)

    def note(sql: str) -> None:
        if sql not in ("BEGIN", "COMMIT"):
            seen.append(sql)

    if layer is not None:
        layer.on_statement = note


def count_statements(url: str, media: Path, world: dict[str, Any], flow: str) -> dict[str, float]:
    os.environ.update(
        PREFLOOP_DATABASE_URL=url,
        PREFLOOP_MEDIA_DIR=str(media),
        PREFLOOP_DATA_DIR=str(media.parent),
        PREFLOOP_SECRET_KEY=os.environ.get("PREFLOOP_SECRET_KEY", "bench-" + uuid.uuid4().hex),
        PREFLOOP_LOG_LEVEL="WARNING",
    )
    from sqlalchemy import event
    from starlette.testclient import TestClient

    from app.core import config, db
    from app.main import create_app

    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    engine = db.get_engine()
    seen: list[str] = []

    def hook(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", hook)
    # The last annotator: the load runs use the others' first pairs as well, no matter.
    n = len(world["tokens"]) - 1
    pid = world["project_id"]
    per: dict[str, list[int]] = {"next": [], "vote": [], "image": [], "cycle": []}
    app = create_app()
    with TestClient(app, base_url="http://127.0.0.1") as client:
        client.get("/healthz")  # builds the middleware stack
        watch_fast_lane(app, seen)
        rng = random.Random(0)
        html = b""
        if flow == "page":
            client.cookies.set("prefloop_session", world["cookies"][n])
            html = client.get(f"/projects/{pid}/vote", headers={"HX-Request": "true"}).content
        for _ in range(21):
            counts = {}
            if flow == "api":
                hdr = {"Authorization": f"Bearer {world['tokens'][n]}"}
                seen.clear()
                pair = client.get(f"/api/v1/projects/{pid}/pairs/next", headers=hdr).json()
                counts["next"] = len(seen)
                urls = [pair["left"]["url"], pair["right"]["url"]]
                left = pair["left"]["image_id"]
                seen.clear()
                for url in urls:
                    assert client.get(url, headers=hdr).status_code == 200
                counts["image"] = len(seen)
                seen.clear()
                r = client.post(
                    f"/api/v1/pairs/{pair['pair_id']}/votes",
                    json={"choice": "left", "left_image_id": left, "latency_ms": 900},
                    headers=hdr,
                )
                assert r.status_code == 201, r.text
                counts["vote"] = len(seen)
            else:
                m_pair, m_left = PAGE_PAIR.search(html), PAGE_LEFT.search(html)
                assert m_pair and m_left, html[:500]
                seen.clear()
                r = client.post(
                    f"/projects/{pid}/vote",
                    data={
                        "pair_id": m_pair.group(1).decode(),
                        "left_image_id": m_left.group(1).decode(),
                        "choice": rng.choice(("left", "right")),
                        "latency_ms": "900",
                        "idempotency_key": uuid.uuid4().hex,
                    },
                    headers={"HX-Request": "true", "X-CSRF-Token": world["csrfs"][n]},
                )
                assert r.status_code == 200, r.text[:500]
                counts["vote"] = len(seen)
                counts["next"] = 0  # the vote's answer carries the next pair
                html = r.content
                seen.clear()
                for url in PAGE_IMG.findall(html)[:2]:
                    assert client.get(url.decode().replace("&amp;", "&")).status_code == 200
                counts["image"] = len(seen)
            counts["cycle"] = counts["next"] + counts["vote"] + counts["image"]
            for key, value in counts.items():
                per[key].append(value)
    event.remove(engine, "before_cursor_execute", hook)
    engine.dispose()
    return {key: statistics.median(values[1:]) for key, values in per.items()}


# --- the SQL ceiling ----------------------------------------------------------------------------

# The least SQL a cycle needs under the same rules: reserve-and-fetch in one statement (the
# annotator's live reservation if any, else the open pair with the fewest votes + live
# reservations that the annotator has not voted on, locked SKIP LOCKED, reserved), and
# vote-and-release in one (idempotent insert, the pair's count, the reservation removed).
RESERVE = """
WITH cand AS (
  SELECT p.id, p.image_a_id, p.image_b_id FROM pairs p
  WHERE p.project_id = %(project)s AND NOT p.is_gold AND p.vote_count < p.votes_wanted
    AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = p.id AND v.annotator_id = %(user)s)
    AND p.vote_count + (SELECT count(*) FROM reservations r WHERE r.pair_id = p.id
                        AND r.expires_at > now()) < p.votes_wanted
  ORDER BY p.vote_count LIMIT 1 FOR NO KEY UPDATE OF p SKIP LOCKED
), ins AS (
  INSERT INTO reservations (pair_id, annotator_id, left_image_id, created_at, expires_at)
  SELECT id, %(user)s, image_a_id, now(), now() + interval '10 minutes' FROM cand
  ON CONFLICT DO NOTHING RETURNING pair_id
)
SELECT c.id, c.image_a_id, c.image_b_id, pr.text FROM cand c
JOIN pairs p ON p.id = c.id JOIN prompts pr ON pr.id = p.prompt_id
"""
VOTE = """
WITH v AS (
  INSERT INTO votes (pair_id, project_id, annotator_id, left_image_id, choice, latency_ms,
                     idempotency_key, created_at)
  VALUES (%(pair)s, %(project)s, %(user)s, %(left)s, 'left', 900, %(key)s, now())
  ON CONFLICT DO NOTHING RETURNING id
), up AS (
  UPDATE pairs SET vote_count = vote_count + 1 WHERE id = %(pair)s AND EXISTS (SELECT 1 FROM v)
), rel AS (
  DELETE FROM reservations WHERE pair_id = %(pair)s AND annotator_id = %(user)s
)
SELECT id FROM v
"""


async def ceiling(
    url: str, world: dict[str, Any], conns: int, annotators: int, seconds: float
) -> float:
    pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await psycopg.AsyncConnection.connect(url, autocommit=True))
    done = 0
    stop = time.perf_counter() + seconds

    async def one(user: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            conn = await pool.get()
            try:
                row = await (
                    await conn.execute(RESERVE, {"project": world["project_id"], "user": user})
                ).fetchone()
            finally:
                pool.put_nowait(conn)
            if row is None:
                await asyncio.sleep(0.01)
                continue
            conn = await pool.get()
            try:
                params = {
                    "pair": row[0],
                    "project": world["project_id"],
                    "user": user,
                    "left": row[1],
                    "key": uuid.uuid4().hex,
                }
                if await (await conn.execute(VOTE, params)).fetchone():
                    done += 1
            finally:
                pool.put_nowait(conn)

    start = time.perf_counter()
    await asyncio.gather(*(one(u) for u in world["users"][:annotators]))
    rate = done / (time.perf_counter() - start)
    while not pool.empty():
        await pool.get_nowait().close()
    return rate


async def own_ceiling(
    url: str,
    world: dict[str, Any],
    conns: int,
    annotators: int,
    seconds: float,
    on_window: Callable[[str], None],
    flow: str = "api",
) -> dict[str, float] | None:
    """The cycle's own SQL ceiling: the statements the platform sends for a cycle of `flow`
    (the fast lane's transactions, its rules included: for the page, vote + next pair +
    counters + peek in one transaction), driven over `conns` asyncpg connections with no HTTP.
    None for code without a fast lane (a baseline), or without the page's transaction."""
    try:
        from app.votes.fast_lane import FastLane, LongWay
        from app.votes.schemas import VoteCreate
        from app.votes.service import checked_input
    except ImportError:
        return None
    if flow == "page" and not hasattr(FastLane, "turn_page"):
        return None

    async def no_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the ceiling sends no HTTP")

    lane = FastLane(no_app, dsn=url, pool_size=conns)
    pool = await lane.pool()
    # Every connection open before the window, so the database's CPU is read on all of them.
    held = [await pool.acquire() for _ in range(conns)]
    for conn in held:
        await pool.release(conn)
    done = 0
    on_window("start")
    stop = time.perf_counter() + seconds

    def plain_vote(left_image_id: int) -> VoteCreate:
        return VoteCreate.model_validate(
            {
                "choice": "left",
                "left_image_id": left_image_id,
                "latency_ms": 900,
                "idempotency_key": uuid.uuid4().hex,
            }
        )

    async def one(token: str) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            async with pool.acquire() as conn:
                try:
                    pair = (await lane.serve(conn, token, world["project_id"])).pair
                except LongWay:
                    await asyncio.sleep(0.01)
                    continue
            async with pool.acquire() as conn:
                await lane.store(conn, token, pair.pair_id, plain_vote(pair.left_image_id), True)
            done += 1

    async def turns(cookie: str, csrf: str) -> None:
        """The page's cycle: each vote's transaction also serves the next pair."""
        nonlocal done
        pair = None
        while time.perf_counter() < stop:
            async with pool.acquire() as conn:
                try:
                    if pair is None:
                        served = await lane.serve(conn, cookie, world["project_id"], via="session")
                        pair = served.pair
                        continue
                    vote = plain_vote(pair.left_image_id)
                    picked = checked_input(vote.choice, vote.latency_ms, vote.idempotency_key)
                    turn = await lane.turn_page(
                        conn, cookie, world["project_id"], pair.pair_id, vote, picked, csrf
                    )
                except LongWay:
                    pair = None
                    await asyncio.sleep(0.01)
                    continue
            pair = turn.served.pair
            done += 1

    cpu = time.process_time()
    start = time.perf_counter()
    if flow == "page":
        pages = zip(world["cookies"][:annotators], world["csrfs"][:annotators], strict=True)
        await asyncio.gather(*(turns(c, x) for c, x in pages))
    else:
        await asyncio.gather(*(one(t) for t in world["tokens"][:annotators]))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    on_window("stop")
    await lane.close()
    return {"per_s": done / elapsed, "client_cpu_ms_per_cycle": 1000 * cpu / max(done, 1)}


# --- one run ------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return float("nan")
    return round(statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1], 1)


async def drive(
    args: argparse.Namespace,
    world: dict[str, Any],
    port: int,
    seconds: float,
    tally: Tally,
    on_start: Any = None,
    on_stop: Any = None,
) -> float:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(annotator(n, args, world, port, stop, tally))
        for n in range(args.annotators)
    ]
    await asyncio.sleep(args.warmup)
    if on_start:
        on_start()
    tally.measuring = True
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    tally.measuring = False
    elapsed = time.perf_counter() - start
    if on_stop:
        on_stop()
    stop.set()
    await asyncio.gather(*tasks)
    return elapsed


def run_size(args: argparse.Namespace, pairs: int) -> dict[str, Any]:
    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = db_url(name)
    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
    media = tmp / "media"
    server = None
    result: dict[str, Any] = {"pairs": pairs}
    try:
        from app.core.migrate import upgrade_head

        upgrade_head(sa_url)
        # One spare annotator for the statement count.
        world = populate(url, media, annotators=args.annotators + 1, pairs=pairs, k=args.k)
        # The ceiling's own project of the same size: the HTTP run may use up the first.
        bare = populate(url, media, annotators=args.annotators, pairs=pairs, k=args.k, tag="c")
        result["statements"] = count_statements(sa_url, media, world, args.flow)

        port = free_port()
        log_path = tmp / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
        env.update(
            PREFLOOP_DATABASE_URL=url,
            PREFLOOP_DATA_DIR=str(tmp),
            PREFLOOP_MEDIA_DIR=str(media),
            PREFLOOP_SECRET_KEY=os.environ["PREFLOOP_SECRET_KEY"],
            PREFLOOP_LOG_LEVEL="WARNING",
        )
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app.main:create_app",
                    "--factory",
                    "--port",
                    str(port),
                    "--workers",
                    str(args.workers),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                cwd=REPO,
                env={**env, "PYTHONPATH": str(REPO)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("uvicorn did not start") from None
                time.sleep(0.2)
        time.sleep(1.0)

        with psycopg.connect(url) as conn:
            rows_before = conn.execute("SELECT count(*) FROM votes").fetchone()[0]
        tally = Tally()
        snaps: dict[str, Any] = {}
        world_run = dict(world)
        elapsed = asyncio.run(
            drive(
                args,
                world_run,
                port,
                args.seconds,
                tally,
                on_start=lambda: snaps.__setitem__("a", snapshot(server.pid, url, name)),
                on_stop=lambda: snaps.__setitem__("b", snapshot(server.pid, url, name)),
            )
        )
        web_cpu = cpu_used(snaps["a"]["web"], snaps["b"]["web"])
        db_cpu = cpu_used(snaps["a"]["db"], snaps["b"]["db"])
        web_conns = len(snaps["b"]["db"])
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT count(*) FROM votes").fetchone()[0]
            over_k = conn.execute(
                "SELECT count(*) FROM pairs WHERE vote_count > votes_wanted"
            ).fetchone()[0]
            dups = conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM votes GROUP BY pair_id, annotator_id"
                " HAVING count(*) > 1) d"
            ).fetchone()[0]
        server.terminate()
        server.wait(timeout=30)
        server = None
        api_acked = len(tally.acked)
        # acknowledged == rows over the whole run: every vote answered 2xx is a row, and back.
        result.update(
            seconds=round(elapsed, 1),
            votes=api_acked,
            votes_per_s=round(api_acked / elapsed, 1),
            empty=tally.empty,
            busy=tally.busy,
            errors=len(tally.errors),
            error_samples=tally.errors[:5],
            cpu_ms_per_cycle={
                "web": round(web_cpu * 1000 / max(api_acked, 1), 2),
                "postgres": round(db_cpu * 1000 / max(api_acked, 1), 2),
                "total": round((web_cpu + db_cpu) * 1000 / max(api_acked, 1), 2),
            },
            p50_ms={k: pct(v, 50) for k, v in tally.request_ms.items()},
            p99_ms={k: pct(v, 99) for k, v in tally.request_ms.items()},
            cycle_p50_ms=pct(tally.cycle_ms, 50),
            cycle_p99_ms=pct(tally.cycle_ms, 99),
            db_connections=web_conns,
            acknowledged_equals_rows=tally.all_acked == rows - rows_before,
            over_k=over_k,
            duplicates=dups,
        )
        result["server_tracebacks"] = log_path.read_text(errors="replace").count("Traceback")
        if args.ceiling:
            conns = max(1, web_conns)
            db_cpu_at: dict[str, dict[int, float]] = {}

            def on_window(when: str) -> None:
                db_cpu_at[when] = {p: cpu_seconds(p) for p in backends(url, name)}

            own = asyncio.run(
                own_ceiling(url, bare, conns, args.annotators, args.ceiling, on_window, args.flow)
            )
            if own is not None:
                before, after = db_cpu_at["start"], db_cpu_at["stop"]
                rate = own["per_s"]
                cycles = max(1.0, rate * args.ceiling)
                result["sql_ceiling_per_s"] = round(rate, 1)
                result["sql_ceiling_connections"] = conns
                result["sql_ceiling_cpu_ms_per_cycle"] = {
                    "client": round(own["client_cpu_ms_per_cycle"], 2),
                    "postgres": round(cpu_used(before, after) * 1000 / cycles, 2),
                }
                result["share_of_ceiling"] = round(result["votes_per_s"] / rate, 3)
            # The least SQL a cycle could need (two statements, no auth): for reference.
            bare = populate(url, media, annotators=args.annotators, pairs=pairs, k=args.k, tag="m")
            rate = asyncio.run(ceiling(url, bare, conns, args.annotators, args.ceiling))
            result["minimal_sql_per_s"] = round(rate, 1)
            result["share_of_minimal"] = round(result["votes_per_s"] / rate, 3) if rate else None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return result


def compare(args: argparse.Namespace) -> None:
    """Before and after in one run: the baseline's code, then this checkout's, per size."""
    argv = sys.argv[1:]
    i = argv.index("--baseline")
    del argv[i : i + 2]
    if "--json" in argv:
        j = argv.index("--json")
        del argv[j : j + 2]
    report: dict[str, Any] = {"load_avg_before": round(os.getloadavg()[0], 2), "sizes": []}
    for size in args.pairs.split(","):
        entry: dict[str, Any] = {"pairs": int(size)}
        for label, repo in (("before", args.baseline), ("after", Path(__file__).parents[1])):
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            cmd = [sys.executable, __file__, *argv, "--pairs", size, "--repo", str(repo)]
            subprocess.run([*cmd, "--json", str(out)], check=False, stdout=subprocess.DEVNULL)
            entry[label] = json.loads(out.read_text() or "{}")
        report["sizes"].append(entry)
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--saturate", action="store_true", help="closed loop, no think time")
    mode.add_argument("--think", type=float, default=1.0, help="mean think time in seconds")
    parser.add_argument("--flow", choices=("api", "page"), default="api")
    parser.add_argument("--annotators", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--pairs", default="6000", help="comma-separated project sizes")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument(
        "--ceiling", type=float, default=10.0, help="seconds of the SQL ceiling run (0: skip)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--repo", type=Path, help="run this checkout's code (default: this one)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of the code before: each size runs it first, then this one",
    )
    args = parser.parse_args()
    if args.baseline:
        compare(args)
        return
    if args.saturate:
        args.think = 0.0
    os.environ.setdefault("PREFLOOP_SECRET_KEY", "bench-" + uuid.uuid4().hex)
    load_before = os.getloadavg()
    results = [run_size(args, int(p)) for p in args.pairs.split(",")]
    report: dict[str, Any] = {
        "flow": args.flow,
        "mode": "saturate" if args.saturate else f"think {args.think:g} s",
        "annotators": args.annotators,
        "uvicorn_workers": args.workers,
        "cpus": os.cpu_count(),
        "load_avg_before": round(load_before[0], 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "runs": results,
    }
    if len(results) > 1:
        small, large = results[0], results[-1]
        report["postgres_cpu_growth"] = round(
            large["cpu_ms_per_cycle"]["postgres"]
            / max(small["cpu_ms_per_cycle"]["postgres"], 1e-9),
            2,
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = all(
        not r["errors"]
        and r["acknowledged_equals_rows"]
        and r["over_k"] == 0
        and r["duplicates"] == 0
        and r["server_tracebacks"] == 0
        for r in results
    )
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
