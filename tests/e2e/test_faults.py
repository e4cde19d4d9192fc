"""Real faults against the distributed stack: Redis restarted, Postgres unreachable, the web
process killed between a vote's commit and its response. (A GPU worker killed mid-job is covered
by tests/e2e/test_dpo_job.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from app.votes.routes import FAULT_EXIT_PREFIX
from benchmarks.vote_path import populate
from tests.support import Proc, Stack, bearer, free_port, login, wait_for, wait_job

HTML = {"Accept": "text/html"}

# --- helpers ---------------------------------------------------------------------------------


class RedisServer:
    """A private redis-server on a free port (never the machine's shared one), killable."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, interval=0.05, what="redis-server to answer")

    def _answers(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


class PgProxy:
    """A TCP proxy to Postgres that can be cut. Cutting closes every open connection; then new
    ones are hung up on ("refuse": a database restarting) or accepted and never answered
    ("stall": a server that stopped responding)."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.mode = "open"
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url_for(self, db_url: str) -> str:
        return db_url.replace("127.0.0.1:5432", f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "refuse":
                client.close()
                continue
            if self.mode == "stall":
                with self.lock:
                    self.open.add(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        with self.lock:
            for sock in socks:
                self.open.discard(sock)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _close_all(self) -> None:
        with self.lock:
            socks = list(self.open)
        self._close(*socks)

    def cut_off(self, mode: str = "refuse") -> None:
        self.mode = mode
        self._close_all()

    def restore(self) -> None:
        self.mode = "open"
        self._close_all()  # connections held silent while stalled

    def close(self) -> None:
        self.closed = True
        self.cut_off()
        self.listener.close()


class Voters:
    """Annotators voting in background threads (next pair, then a vote with a fresh key)."""

    def __init__(self, base: str, tokens: list[str], project_id: int) -> None:
        self.acked: list[int] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(base, token, project_id), daemon=True)
            for token in tokens
        ]

    def _loop(self, base: str, token: str, project_id: int) -> None:
        with httpx.Client(base_url=base, headers=bearer(token), timeout=10) as client:
            while not self.stop.is_set():
                try:
                    pair = client.get(f"/api/v1/projects/{project_id}/pairs/next")
                    if pair.status_code in (204, 503):
                        time.sleep(0.1)
                        continue
                    if pair.status_code != 200:
                        self.errors.append(f"next {pair.status_code} {pair.text}")
                        continue
                    body = pair.json()
                    vote = client.post(
                        f"/api/v1/pairs/{body['pair_id']}/votes",
                        json={
                            "choice": "left",
                            "left_image_id": body["left"]["image_id"],
                            "idempotency_key": uuid.uuid4().hex,
                        },
                    )
                    if vote.status_code == 201:
                        self.acked.append(vote.json()["vote_id"])
                    else:
                        self.errors.append(f"vote {vote.status_code} {vote.text}")
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)

    def __enter__(self) -> Voters:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def vote_ids(db_url: str) -> set[int]:
    with psycopg.connect(db_url) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM votes")}


def selftest_job(stack: Stack) -> int:
    response = stack.post("/api/v1/jobs", {"kind": "selftest", "params": {"steps": 1}})
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _populate(stack: Stack, **sizes: int) -> tuple[int, list[str]]:
    """A project with open pairs, its images in the stack's media folder, and API tokens."""
    world = populate(stack.db_url, stack.tmp / "media", **sizes)
    return world["project_id"], world["tokens"]


@pytest.mark.slow
@pytest.mark.long(100)
def test_redis_restart_loses_no_vote_and_no_job(tmp_path: Path, redis_server: RedisServer) -> None:
    with Stack(tmp_path, PREFLOOP_BROKER_URL=redis_server.url) as stack:
        project_id, tokens = _populate(stack, annotators=3, pairs=300, k=3)
        with Voters(stack.base, tokens, project_id) as voters:
            wait_for(lambda: len(voters.acked) >= 5, 30, what="votes before the fault")
            redis_server.kill()
            during = len(voters.acked)
            # Queued while the broker is down: the row commits, the message cannot be sent.
            job_id = selftest_job(stack)
            assert stack.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued"
            wait_for(lambda: len(voters.acked) >= during + 5, 30, what="votes while Redis is down")
            redis_server.start()
            wait_for(lambda: len(voters.acked) >= during + 10, 30, what="votes after Redis")
        assert stack.client is not None
        job = wait_job(stack.client, job_id, {}, 60)
        assert job["status"] == "succeeded", job
        # Its first message was lost with the broker; the reaper's re-send ran it.
        assert stack.serve is not None
        assert f"jobs.enqueue_failed job_id={job_id} " in stack.serve.output()
        assert voters.errors == []
        assert set(voters.acked) == vote_ids(stack.db_url)
        assert len(set(voters.acked)) == len(voters.acked)


# --- Postgres --------------------------------------------------------------------------------


@pytest.mark.slow
def test_database_outage_answers_503_and_recovers_without_restart(tmp_path: Path) -> None:
    proxy = PgProxy()
    stack = Stack(tmp_path)
    stack.env["PREFLOOP_DATABASE_URL"] = proxy.url_for(stack.db_url)
    try:
        with stack:
            assert stack.serve is not None
            web = stack.serve.children()
            project_id, tokens = _populate(stack, annotators=1, pairs=20, k=3)
            annotator = httpx.Client(base_url=stack.base, headers=bearer(tokens[0]), timeout=20)
            next_pair = f"/api/v1/projects/{project_id}/pairs/next"
            dashboard = f"/projects/{project_id}"
            assert stack.client is not None
            assert stack.client.get(dashboard, headers=HTML).status_code == 200
            served = annotator.get(next_pair)
            assert served.status_code == 200, served.text
            vote = {"choice": "left", "left_image_id": served.json()["left"]["image_id"]}

            proxy.cut_off()
            deadline = time.monotonic() + 3
            answers = []
            while time.monotonic() < deadline:
                for method, path, kwargs in (
                    ("GET", next_pair, {}),
                    ("POST", f"/api/v1/pairs/{served.json()['pair_id']}/votes", {"json": vote}),
                    ("GET", "/healthz", {}),
                ):
                    start = time.monotonic()
                    answer = annotator.request(method, path, **kwargs)
                    answers.append((path, answer, time.monotonic() - start))
                # A browser asking for an HTML page gets the same answer.
                start = time.monotonic()
                page = stack.client.get(dashboard, headers=HTML)
                answers.append(("page", page, time.monotonic() - start))
            for path, answer, seconds in answers:
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                assert answer.headers.get("Retry-After"), (path, answer.headers)
                assert "Traceback" not in answer.text
                # Bounded by connect_timeout (5 s), never a hang.
                assert seconds < 6, (path, seconds)

            proxy.restore()

            def vote_accepted() -> httpx.Response | None:
                answer = annotator.post(
                    f"/api/v1/pairs/{served.json()['pair_id']}/votes", json=vote
                )
                return answer if answer.status_code == 201 else None

            recovered = wait_for(vote_accepted, 20, what="a vote once the database is back")
            assert stack.get("/healthz").status_code == 200
            assert stack.client.get(dashboard, headers=HTML).status_code == 200
            # Recovered by itself: the same web process, not a restarted one.
            assert stack.serve.children() == web and stack.serve.proc.poll() is None
            assert vote_ids(stack.db_url) == {recovered.json()["vote_id"]}

            # A server that stops answering: connecting gives up after connect_timeout (5 s), so
            # the answer is still a 503, not a request hanging on the database.
            proxy.cut_off("stall")
            start = time.monotonic()
            stalled = annotator.get(next_pair)
            stalled_seconds = time.monotonic() - start
            assert stalled.status_code == 503 and stalled.headers.get("Retry-After")
            assert stalled_seconds < 12, stalled_seconds
            proxy.restore()
            wait_for(lambda: annotator.get(next_pair).status_code == 200, 20, what="recovery")
            assert stack.serve.children() == web
            annotator.close()
    finally:
        proxy.close()


# --- the web process dies between commit and response ----------------------------------------


@pytest.mark.slow
def test_web_killed_after_commit_retry_gets_the_original_vote(tmp_path: Path) -> None:
    with Stack(tmp_path, PREFLOOP_FAULT_INJECTION="1") as stack:
        assert stack.serve is not None
        project_id, tokens = _populate(stack, annotators=1, pairs=20, k=3)
        annotator = httpx.Client(base_url=stack.base, headers=bearer(tokens[0]), timeout=20)
        served = annotator.get(f"/api/v1/projects/{project_id}/pairs/next").json()
        path = f"/api/v1/pairs/{served['pair_id']}/votes"
        body = {
            "choice": "right",
            "left_image_id": served["left"]["image_id"],
            "idempotency_key": FAULT_EXIT_PREFIX + uuid.uuid4().hex,
        }
        with pytest.raises(httpx.TransportError):
            annotator.post(path, json=body)
        # The web process is gone; `serve` stays up and starts it again (same database).
        wait_for(
            lambda: "serve: web exited with code 70" in stack.serve.output(), 30, what="web exit"
        )
        wait_for(lambda: "serve: web restarted" in stack.serve.output(), 30, what="web restart")
        assert stack.serve.proc.poll() is None
        stored = vote_ids(stack.db_url)
        assert len(stored) == 1, "the vote was committed before the crash"
        # The retry goes to a web with the switch off (with it on, the replay's commit would
        # end the process again).
        stack.serve.stop()
        stack.env["PREFLOOP_FAULT_INJECTION"] = "0"
        stack.serve = Proc(
            ["serve", "--no-worker", "--port", str(stack.port)], stack.env, tmp_path / "serve2.log"
        )
        wait_for(lambda: httpx.get(f"{stack.base}/healthz", timeout=5).status_code == 200, 60)

        retry = annotator.post(path, json=body)
        assert retry.status_code == 200, retry.text  # a replay, not a new vote
        assert {retry.json()["vote_id"]} == stored == vote_ids(stack.db_url)
        with psycopg.connect(stack.db_url) as conn:
            vote_count = conn.execute(
                "SELECT vote_count FROM pairs WHERE id = %s", (served["pair_id"],)
            ).fetchone()
        assert vote_count == (1,)
        # With the switch off the special prefix is an ordinary key.
        other = annotator.get(f"/api/v1/projects/{project_id}/pairs/next").json()
        again = annotator.post(
            f"/api/v1/pairs/{other['pair_id']}/votes",
            json={
                "choice": "left",
                "left_image_id": other["left"]["image_id"],
                "idempotency_key": FAULT_EXIT_PREFIX + uuid.uuid4().hex,
            },
        )
        assert again.status_code == 201 and stack.serve.proc.poll() is None
        annotator.close()


# --- overload: the pool has no free connection -------------------------------------------------


def test_auth_lookups_run_off_the_event_loop(client, make_user, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A lookup blocking the event loop while the pool is exhausted stalls every request of the
    web process (found by the load test: 200 annotators hung a worker for minutes)."""
    from app.users import service as users

    on_loop: list[str] = []

    def spying(real):  # type: ignore[no-untyped-def]
        def lookup(session, token):  # type: ignore[no-untyped-def]
            try:
                asyncio.get_running_loop()
                on_loop.append(real.__name__)
            except RuntimeError:
                pass
            return real(session, token)

        return lookup

    for name in ("user_for_token", "session_for_token"):
        monkeypatch.setattr(users, name, spying(getattr(users, name)))
    user, token = make_user("lead", password="a long enough password")
    assert client.get("/api/v1/projects", headers=bearer(token)).status_code == 200
    login(client, user.email, "a long enough password")
    assert client.get("/api/v1/projects").status_code == 200
    assert on_loop == []


def test_no_free_pooled_connection_answers_503(client, make_user, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from app.users import service as users

    def exhausted(session, token):  # type: ignore[no-untyped-def]
        raise PoolTimeoutError("QueuePool limit of size 10 overflow 20 reached")

    _, token = make_user("annotator")
    monkeypatch.setattr(users, "user_for_token", exhausted)
    answer = client.get("/api/v1/projects", headers=bearer(token))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "retry" in answer.json()["detail"]


def test_requests_using_the_database_at_once_are_bounded_by_slots(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Past the pool's capacity requests wait for a slot on the event loop instead of holding
    threads that wait for connections (the load test's throughput collapse)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from app.core.db import get_engine, pool_capacity
    from app.main import create_app
    from app.users import service as users

    lock = threading.Lock()
    active = [0, 0]  # now, peak

    def slow_lookup(session, token):  # type: ignore[no-untyped-def]
        with lock:
            active[0] += 1
            active[1] = max(active)
        time.sleep(0.2)
        with lock:
            active[0] -= 1

    monkeypatch.setattr(users, "user_for_token", slow_lookup)
    app = create_app()
    assert app.state.db_slots._value == pool_capacity(get_engine()) == 30
    app.state.db_slots = asyncio.Semaphore(2)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        codes = list(
            pool.map(
                lambda _: client.get("/api/v1/projects", headers=bearer("pfl_nope")).status_code,
                range(6),
            )
        )
    assert codes == [401] * 6
    assert active[1] == 2
