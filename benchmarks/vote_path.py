"""The annotator hot path under load: N simulated annotators over HTTP against uvicorn + Postgres.

Each annotator loops GET /api/v1/projects/{id}/pairs/next then POST /api/v1/pairs/{id}/votes.
Printed: votes/s, p50/p99 latency of each call, and — measured in the same run on the same
fresh database — the ceiling: single-row INSERT + COMMIT per second through one plain psycopg
connection, with the ratio. Checked: zero errors and acknowledged votes == stored rows.
Goal at 200 annotators: ≥ 50 % of the ceiling and p99 < 50 ms.

The client is a minimal asyncio HTTP/1.1 keep-alive client, so that the load generator takes as
little of the shared CPU as possible. The annotators share `--connections` keep-alive
connections, as they would behind a reverse proxy; latencies are timed from the moment a
connection is free (the server's answer time). With one connection per annotator
(`--connections 0`) more than ~30 requests can be in flight in one uvicorn worker; the
authentication dependency (`app/core/deps.py::optional_auth`, an `async def`) then blocks the
event loop waiting for a pool connection (pool 10 + 20) and the worker stalls for the pool
timeout (10 s) — a foundation issue this benchmark exposes.

Run: .venv/bin/python benchmarks/vote_path.py [--annotators 200] [--seconds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import insert, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import app.models  # noqa: E402, F401
from app.core.db import make_engine  # noqa: E402
from app.core.migrate import upgrade_head  # noqa: E402
from app.core.security import hash_token, new_token  # noqa: E402
from app.generators.models import ModelVersion  # noqa: E402
from app.images.models import Image  # noqa: E402
from app.pairs.models import Pair  # noqa: E402
from app.projects.models import Membership, Project, Prompt  # noqa: E402
from app.projects.schemas import ProjectSettings  # noqa: E402
from app.users.models import ApiToken, User  # noqa: E402
from app.votes.models import Vote  # noqa: E402

ADMIN_URL = os.environ.get("PREFLOOP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def admin(sql: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def populate(url: str, *, annotators: int, pairs: int, k: int) -> tuple[int, list[str]]:
    """A project with `pairs` open pairs and `annotators` members with tokens (bulk inserts)."""
    engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    settings = ProjectSettings(votes_per_pair=k, votes_per_second=100).model_dump()
    with engine.begin() as conn:
        project_id = conn.execute(
            insert(Project)
            .values(name="bench", description="", settings=settings)
            .returning(Project.id)
        ).scalar_one()
        prompt_id = conn.execute(
            insert(Prompt)
            .values(project_id=project_id, text="a bench prompt", split="train", tags=[])
            .returning(Prompt.id)
        ).scalar_one()
        model_ids = [
            conn.execute(
                insert(ModelVersion)
                .values(
                    project_id=project_id,
                    name=f"m{i}",
                    base="toy",
                    params={},
                    status="arena",
                    evaluation={},
                )
                .returning(ModelVersion.id)
            ).scalar_one()
            for i in range(2)
        ]
        images = [
            {
                "id": secrets.token_hex(16),
                "project_id": project_id,
                "prompt_id": prompt_id,
                "model_version_id": model_ids[i % 2],
                "seed": i // 2,
                "sha256": "0" * 64,
                "storage_key": "00/00/" + "0" * 64 + ".png",
                "width": 64,
                "height": 64,
                "provenance": {},
            }
            for i in range(2 * pairs)
        ]
        conn.execute(insert(Image), images)
        conn.execute(
            insert(Pair),
            [
                {
                    "project_id": project_id,
                    "prompt_id": prompt_id,
                    "image_a_id": min(images[2 * i]["id"], images[2 * i + 1]["id"]),
                    "image_b_id": max(images[2 * i]["id"], images[2 * i + 1]["id"]),
                    "purpose": "eval",
                    "is_gold": False,
                    "votes_wanted": k,
                    "vote_count": 0,
                }
                for i in range(pairs)
            ],
        )
        user_ids = (
            conn.execute(
                insert(User).returning(User.id),
                [
                    {"email": f"a{i}@bench.test", "role": "annotator", "is_active": True}
                    for i in range(annotators)
                ],
            )
            .scalars()
            .all()
        )
        conn.execute(
            insert(Membership),
            [{"project_id": project_id, "user_id": uid, "role": "annotator"} for uid in user_ids],
        )
        tokens = [new_token() for _ in user_ids]
        conn.execute(
            insert(ApiToken),
            [
                {"user_id": uid, "token_hash": hash_token(tok), "prefix": tok[:10], "name": "bench"}
                for uid, tok in zip(user_ids, tokens, strict=True)
            ],
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # A live database has planner statistics (autovacuum analyzes after bulk loads).
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return project_id, tokens


def insert_ceiling(url: str, seconds: float) -> float:
    """Single-row INSERT + COMMIT per second through one plain psycopg connection."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TABLE bench_ceiling (id serial PRIMARY KEY, annotator_id int, choice text,"
            " created_at timestamptz DEFAULT now())"
        )
        conn.commit()
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            conn.execute(
                "INSERT INTO bench_ceiling (annotator_id, choice) VALUES (%s, %s)", (n, "left")
            )
            conn.commit()
            n += 1
        rate = n / (time.perf_counter() - start)
        conn.execute("DROP TABLE bench_ceiling")
        conn.commit()
    return rate


class Http:
    """Minimal HTTP/1.1 keep-alive client: one connection, one request at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, token: str, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return status, json.loads(data) if data else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Upstream:
    """HTTP connections shared by the annotators, as a reverse proxy's upstream pool would be."""

    def __init__(self, port: int, size: int) -> None:
        self.idle: asyncio.Queue[Http] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(Http("127.0.0.1", port))

    async def request(self, token: str, method: str, path: str, body: Any = None) -> Any:
        http = await self.idle.get()
        try:
            # Timed from the moment a connection is free: the server's answer time, not the
            # wait for one of the shared connections.
            start = time.perf_counter()
            status, data = await http.request(token, method, path, body)
            return status, data, (time.perf_counter() - start) * 1000
        except BaseException:
            http.close()
            http = Http(http.host, http.port)
            raise
        finally:
            self.idle.put_nowait(http)

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()


@dataclass
class Tally:
    next_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    empty: int = 0
    busy: int = 0


async def annotator(
    up: Upstream,
    token: str,
    project_id: int,
    deadline: float,
    tally: Tally,
    seed: int,
    think: float,
) -> None:
    rng = random.Random(seed)
    try:
        # Annotators do not start in lockstep.
        await asyncio.sleep(rng.uniform(0, think))
        while time.perf_counter() < deadline:
            status, pair, ms = await up.request(
                token, "GET", f"/api/v1/projects/{project_id}/pairs/next"
            )
            tally.next_ms.append(ms)
            if status == 204:
                tally.empty += 1
                await asyncio.sleep(0.05)
                continue
            if status == 503:  # all open pairs locked at that instant; the API says ask again
                tally.busy += 1
                await asyncio.sleep(0.1)
                continue
            if status != 200:
                tally.errors.append(f"next {status} {pair}")
                continue
            body = {
                "choice": rng.choice(("left", "right", "tie", "both_bad")),
                "left_image_id": pair["left"]["image_id"],
                "latency_ms": rng.randrange(600, 4000),
                "idempotency_key": uuid.uuid4().hex,
            }
            status, ack, ms = await up.request(
                token, "POST", f"/api/v1/pairs/{pair['pair_id']}/votes", body
            )
            tally.vote_ms.append(ms)
            if status in (200, 201):
                tally.acked.append(ack["vote_id"])
            else:
                tally.errors.append(f"vote {status} {ack}")
            if think:
                # Looking at the next pair takes a person a while: uniform over [0.5, 1.5] x think.
                await asyncio.sleep(think * rng.uniform(0.5, 1.5))
    except Exception as exc:  # noqa: BLE001 - a dropped connection is an error to report
        tally.errors.append(f"{type(exc).__name__}: {exc}")


async def load(
    port: int,
    tokens: list[str],
    project_id: int,
    seconds: float,
    think: float,
    connections: int,
) -> tuple[Tally, float]:
    tally = Tally()
    up = Upstream(port, connections)
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(
        *(annotator(up, tok, project_id, deadline, tally, i, think) for i, tok in enumerate(tokens))
    )
    up.close()
    return tally, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument(
        "--connections",
        type=int,
        default=24,
        help="HTTP connections the annotators share, as behind a reverse proxy (0: one each)",
    )
    parser.add_argument(
        "--think-ms",
        type=float,
        default=1000.0,
        help="mean pause of an annotator between a vote and the next pair (0: closed loop)",
    )
    args = parser.parse_args()

    conns = args.connections or args.annotators
    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = db_url(name)
    server = None
    try:
        upgrade_head(url.replace("postgresql://", "postgresql+psycopg://"))
        project_id, tokens = populate(url, annotators=args.annotators, pairs=args.pairs, k=args.k)
        ceiling_before = insert_ceiling(url, 3.0)

        port = free_port()
        tmp = Path(tempfile.mkdtemp(prefix="prefloop-bench-"))
        server_log_path = tmp / "server.log"
        server_log = open(server_log_path, "wb")  # noqa: SIM115 - closed after the run
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
        env.update(
            PREFLOOP_DATABASE_URL=url,
            PREFLOOP_DATA_DIR=str(tmp),
            PREFLOOP_SECRET_KEY="bench-" + uuid.uuid4().hex,
            PREFLOOP_LOG_LEVEL="WARNING",
        )
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
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("uvicorn did not start") from None
                time.sleep(0.2)

        if args.warmup > 0:  # imports, pools and plans warm in every worker
            asyncio.run(load(port, tokens[:20], project_id, args.warmup, 0.0, min(20, conns)))
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as conn:
            before = set(conn.scalars(select(Vote.id)))
        think = args.think_ms / 1000
        tally, elapsed = asyncio.run(load(port, tokens, project_id, args.seconds, think, conns))
        with engine.connect() as conn:
            rows = set(conn.scalars(select(Vote.id))) - before
            over_k = conn.scalar(
                select(Pair.id).where(Pair.vote_count > Pair.votes_wanted).limit(1)
            )
        engine.dispose()
        server.terminate()
        server.wait(timeout=30)
        server = None
        # The disk is shared: measure the ceiling again after the load, report the mean.
        ceiling = (ceiling_before + insert_ceiling(url, 3.0)) / 2
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    votes_per_s = len(tally.acked) / elapsed
    server_log.close()
    server_errors = server_log_path.read_text(errors="replace").count("Traceback")
    print(
        f"annotators={args.annotators} connections={conns} think={args.think_ms:.0f}ms "
        f"uvicorn_workers={args.workers} seconds={elapsed:.1f} cpus={os.cpu_count()} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )
    print(
        f"votes: {len(tally.acked)} acknowledged, {votes_per_s:.1f} votes/s "
        f"({len(tally.next_ms) / elapsed:.1f} next/s, {tally.empty} empty answers, "
        f"{tally.busy} busy answers)"
    )
    print(f"GET next  p50 {pct(tally.next_ms, 50):7.1f} ms  p99 {pct(tally.next_ms, 99):7.1f} ms")
    print(f"POST vote p50 {pct(tally.vote_ms, 50):7.1f} ms  p99 {pct(tally.vote_ms, 99):7.1f} ms")
    print(
        f"ceiling: {ceiling:.0f} single-row INSERT+COMMIT/s on one psycopg connection "
        f"(before the load {ceiling_before:.0f}; mean of before and after)"
    )
    print(f"ratio: {votes_per_s / ceiling:.1%} of the ceiling (goal >= 50 %); p99 goal < 50 ms")
    ok = not tally.errors and set(tally.acked) == rows and over_k is None
    print(
        f"errors: {len(tally.errors)}  server tracebacks: {server_errors}  "
        f"acknowledged == rows: {set(tally.acked) == rows} ({len(rows)} rows)  "
        f"pair over k: {over_k is not None}"
    )
    for line in tally.errors[:5]:
        print("  ", line)
    if server_errors:
        print(f"   server log: {server_log_path}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
