"""Load test of the distributed stack: simulated annotators against `prefloop serve --no-worker
--web-workers N` on Postgres and Redis.

Each annotator loops GET /api/v1/projects/{id}/pairs/next then POST /api/v1/pairs/{id}/votes with
a fresh idempotency key, over its own keep-alive connection (a minimal asyncio client, so that
the load generator takes little of the CPUs it shares with the server). Checked
after the run, from the database: zero errors, acknowledged votes == stored rows, no (pair,
annotator) twice, no pair over its k. Printed: a table of p50/p99 per endpoint and votes/s.
A 503 with Retry-After (next-pair: "every open pair is being handed out right now"; any call:
the database is overloaded or unavailable) is an answer of the API, not an error: next-pair is
asked again, a vote is sent again with the same idempotency key; both are counted.

Run: .venv/bin/python benchmarks/load.py [--annotators 200] [--seconds 60] [--web-workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.vote_path import free_port, pct, populate  # noqa: E402

PG_ADMIN_URL = os.environ.get("PREFLOOP_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("PREFLOOP_BENCH_REDIS", "redis://127.0.0.1:6379/0")
CHOICES = ("left", "right", "tie", "both_bad")
MAX_VOTE_RETRIES = 5


class Connection:
    """One annotator's HTTP/1.1 keep-alive connection, one request at a time."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any, float]:
        """(status, JSON body, Retry-After seconds or 0)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode() if body is not None else b""
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        status = int((await self.reader.readline()).split()[1])
        length, retry_after = 0, 0.0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "retry-after":
                retry_after = float(value)
        data = await self.reader.readexactly(length) if length else b""
        return status, json.loads(data) if data else None, retry_after

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Tally:
    next_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    empty: int = 0
    busy: int = 0
    # Votes resent after a 503 with the same idempotency key.
    vote_retries: int = 0


async def annotator(
    port: int, token: str, project_id: int, deadline: float, tally: Tally, seed: int, think: float
) -> None:
    """Next pair, vote, (think), until the deadline; every answer is tallied."""
    rng = random.Random(seed)
    conn = Connection(port, token)
    try:
        await asyncio.sleep(rng.uniform(0, think or 0.2))  # annotators do not start in lockstep
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, pair, _ = await conn.request("GET", f"/api/v1/projects/{project_id}/pairs/next")
            t1 = time.perf_counter()
            tally.next_ms.append((t1 - t0) * 1000)
            if status in (204, 503):  # nothing left / every open pair being handed out
                tally.empty += status == 204
                tally.busy += status == 503
                await asyncio.sleep(0.1)
                continue
            if status != 200:
                tally.errors.append(f"next {status} {pair}")
                continue
            body = {
                "choice": rng.choice(CHOICES),
                "left_image_id": pair["left"]["image_id"],
                # Above the default minimum viewing time (500 ms), as a person votes.
                "latency_ms": rng.randrange(600, 4000),
                "idempotency_key": uuid.uuid4().hex,
            }
            path = f"/api/v1/pairs/{pair['pair_id']}/votes"
            status, ack, retry_after = await conn.request("POST", path, body)
            tally.vote_ms.append((time.perf_counter() - t1) * 1000)
            # A 503 (overloaded or unavailable database) says come back: the same request with
            # the same idempotency key, so that a vote stored after all is not cast twice.
            for _ in range(MAX_VOTE_RETRIES):
                if status != 503:
                    break
                tally.vote_retries += 1
                await asyncio.sleep(min(retry_after, 2.0) * rng.uniform(0.5, 1.0))
                t2 = time.perf_counter()
                status, ack, retry_after = await conn.request("POST", path, body)
                tally.vote_ms.append((time.perf_counter() - t2) * 1000)
            if status in (200, 201):
                tally.acked.append(ack["vote_id"])
            else:
                tally.errors.append(f"vote {status} {ack}")
            if think:
                await asyncio.sleep(think * rng.uniform(0.5, 1.5))
    except Exception as exc:  # noqa: BLE001 - a dropped connection is an error to report
        tally.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


async def load(
    port: int, tokens: list[str], project_id: int, seconds: float, think: float
) -> tuple[Tally, float]:
    tally = Tally()
    start = time.perf_counter()
    await asyncio.gather(
        *(
            annotator(port, token, project_id, start + seconds, tally, seed, think)
            for seed, token in enumerate(tokens)
        )
    )
    return tally, time.perf_counter() - start


@dataclass
class LoadReport:
    annotators: int
    web_workers: int
    seconds: float
    tally: Tally
    rows: int
    rows_match: bool
    duplicates: int
    over_k: int

    @property
    def votes_per_second(self) -> float:
        return len(self.tally.acked) / self.seconds

    @property
    def ok(self) -> bool:
        return (
            not self.tally.errors
            and self.rows_match
            and len(set(self.tally.acked)) == len(self.tally.acked)
            and self.duplicates == 0
            and self.over_k == 0
        )

    def table(self) -> str:
        t = self.tally
        lines = [
            f"annotators={self.annotators} web_workers={self.web_workers} "
            f"seconds={self.seconds:.1f} cpus={os.cpu_count()}",
            f"{'endpoint':<32}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
        ]
        for name, values in (
            ("GET /projects/{id}/pairs/next", t.next_ms),
            ("POST /pairs/{id}/votes", t.vote_ms),
        ):
            top = max(values) if values else float("nan")
            lines.append(
                f"{name:<32}{len(values):>9}{pct(values, 50):>9.1f}{pct(values, 99):>9.1f}"
                f"{top:>9.1f}"
            )
        lines += [
            f"votes: {len(t.acked)} acknowledged, {self.votes_per_second:.1f} votes/s; "
            f"next-pair answers: {t.empty} empty (204), {t.busy} busy (503); "
            f"vote retries after 503: {t.vote_retries}",
            f"errors: {len(t.errors)}  acknowledged == rows: {self.rows_match} ({self.rows} rows)"
            f"  duplicate (pair, annotator): {self.duplicates}  pairs over k: {self.over_k}",
            *(f"  {line}" for line in t.errors[:5]),
        ]
        return "\n".join(lines)


def _admin(admin_url: str, sql: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql)


def _vote_ids(url: str) -> set[int]:
    with psycopg.connect(url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM votes")}


def _integrity(url: str) -> tuple[int, int]:
    """(pairs voted twice by one annotator, pairs holding more votes than they want)."""
    with psycopg.connect(url) as conn:
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT pair_id, annotator_id FROM votes"
            " GROUP BY pair_id, annotator_id HAVING count(*) > 1) d"
        ).fetchone()[0]  # type: ignore[index]
        over_k = conn.execute(
            "SELECT count(*) FROM pairs p WHERE p.vote_count > p.votes_wanted OR p.votes_wanted <"
            " (SELECT count(*) FROM votes v WHERE v.pair_id = p.id AND v.choice <> 'skip')"
        ).fetchone()[0]  # type: ignore[index]
    return int(duplicates), int(over_k)


def _wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefloop serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("prefloop serve did not become healthy")


def run_load(
    *,
    annotators: int,
    seconds: float,
    web_workers: int = 2,
    pairs: int | None = None,
    k: int = 3,
    think_s: float = 0.0,
    warmup_s: float = 2.0,
    pg_admin_url: str = PG_ADMIN_URL,
    broker_url: str = BROKER_URL,
    log_path: Path | None = None,
) -> LoadReport:
    """Run the load against a fresh database and a fresh `serve --no-worker`; the report."""
    from app.core.migrate import upgrade_head

    name = f"prefloop_load_{uuid.uuid4().hex[:8]}"
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    tmp = Path(tempfile.mkdtemp(prefix="prefloop-load-"))
    log = open(log_path or tmp / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    server: subprocess.Popen[bytes] | None = None
    try:
        upgrade_head(url.replace("postgresql://", "postgresql+psycopg://"))
        # Enough pairs that nobody runs dry: a closed loop votes a few hundred times a second.
        wanted = pairs or max(2000, int(annotators * (seconds + warmup_s) * 2 / k))
        world = populate(url, tmp / "media", annotators=annotators, pairs=wanted, k=k)
        project_id, tokens = world["project_id"], world["tokens"]
        port = free_port()
        env = {k_: v for k_, v in os.environ.items() if not k_.startswith("PREFLOOP_")}
        env.update(
            PREFLOOP_DATABASE_URL=url,
            PREFLOOP_BROKER_URL=broker_url,
            PREFLOOP_BROKER_KEY_PREFIX=f"prefloop-load-{uuid.uuid4().hex[:8]}:",
            PREFLOOP_SECRET_KEY="load-" + uuid.uuid4().hex,
            PREFLOOP_DATA_DIR=str(tmp / "data"),
            PREFLOOP_MEDIA_DIR=str(tmp / "media"),
            PREFLOOP_LOG_LEVEL="WARNING",
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(port)]
            + ["--web-workers", str(web_workers)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_healthy(f"http://127.0.0.1:{port}", server, 90)
        if warmup_s > 0:  # imports, pools and plans warm in every web worker
            asyncio.run(load(port, tokens[: min(20, len(tokens))], project_id, warmup_s, 0.0))
        before = _vote_ids(url)
        tally, elapsed = asyncio.run(load(port, tokens, project_id, seconds, think_s))
        rows = _vote_ids(url) - before
        duplicates, over_k = _integrity(url)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return LoadReport(
        annotators=annotators,
        web_workers=web_workers,
        seconds=elapsed,
        tally=tally,
        rows=len(rows),
        rows_match=set(tally.acked) == rows,
        duplicates=duplicates,
        over_k=over_k,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--web-workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--pairs", type=int, default=None, help="default: enough for the run")
    parser.add_argument("--k", type=int, default=3, help="votes wanted per pair")
    parser.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="mean pause of an annotator between a vote and the next pair (0: closed loop)",
    )
    args = parser.parse_args()
    report = run_load(
        annotators=args.annotators,
        seconds=args.seconds,
        web_workers=args.web_workers,
        pairs=args.pairs,
        k=args.k,
        think_s=args.think_ms / 1000,
    )
    print(report.table())
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
