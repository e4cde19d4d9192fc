"""Helpers shared by tests: auth headers, free ports, and running prefloop as real processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.jobs.models import TERMINAL

REPO = Path(__file__).resolve().parents[1]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}")


class Proc:
    """A prefloop command running as a child process, with its output captured to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(x) for x in out.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def base_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(overrides)
    return env


def login(client: httpx.Client, email: str, password: str) -> str:
    """Log in through the HTML form; returns the CSRF token of the new session."""
    response = client.post(
        "/login", data={"email": email, "password": password, "next": "/"}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    page = client.get("/")
    match = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert match, (page.status_code, page.headers, page.text)
    return match.group(1)


def wait_job(
    client: httpx.Client,
    job_id: int,
    headers: dict[str, str],
    timeout: float,
    statuses: tuple[str, ...] = TERMINAL,
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        return body if body["status"] in statuses else None

    return wait_for(done, timeout, what=f"job {job_id} to reach {statuses}")


# Debian's Chromium, headless, with nothing that phones home (the network is closed here).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


FAST_JOBS = {
    "PREFLOOP_JOB_HEARTBEAT_SECONDS": "0.5",
    "PREFLOOP_JOB_STALE_SECONDS": "3",
    "PREFLOOP_REAPER_INTERVAL_SECONDS": "1",
}


class Stack:
    """The distributed platform on Postgres + Redis: `serve --no-worker` (web and reaper) plus
    separately started workers, on a fresh database. Use as a context manager."""

    def __init__(self, tmp: Path, **env: str) -> None:
        import uuid

        from tests.conftest import REDIS_URL, create_database

        self.tmp = tmp
        self.db_name = f"prefloop_e2e_{uuid.uuid4().hex[:8]}"
        self.db_url = create_database(self.db_name)
        self.env = base_env(
            PREFLOOP_DATABASE_URL=self.db_url,
            PREFLOOP_BROKER_URL=REDIS_URL,
            PREFLOOP_BROKER_KEY_PREFIX=f"prefloop-e2e-{uuid.uuid4().hex[:8]}:",
            PREFLOOP_SECRET_KEY="e2e-secret-" + uuid.uuid4().hex,
            PREFLOOP_DATA_DIR=str(tmp / "data"),
            PREFLOOP_MEDIA_DIR=str(tmp / "media"),
            **FAST_JOBS,
        )
        self.env.update(env)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workers: list[Proc] = []
        self.serve: Proc | None = None
        self.client: httpx.Client | None = None
        self.csrf = ""
        self.admin: tuple[str, str] = ("", "")

    def start_worker(self, queues: str = "gpu,cpu") -> Proc:
        proc = Proc(
            ["worker", "--queues", queues], self.env, self.tmp / f"worker{len(self.workers)}.log"
        )
        self.workers.append(proc)
        return proc

    def __enter__(self) -> Stack:
        self.serve = Proc(
            ["serve", "--no-worker", "--port", str(self.port)], self.env, self.tmp / "serve.log"
        )
        try:
            serve = self.serve
            match = wait_for(
                lambda: re.search(r"admin login (\S+) / password (\S+)", serve.output()),
                60,
                what="the first-run admin login",
            )
            self.admin = (match.group(1), match.group(2))
            self.start_worker()
            wait_for(self.healthy, 90, what="a healthy stack")
            self.client = httpx.Client(base_url=self.base, timeout=15)
            self.csrf = login(self.client, *self.admin)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def healthy(self) -> bool:
        body = httpx.get(f"{self.base}/healthz", timeout=5).json()
        return body["status"] == "ok" and body["worker"]["last_heartbeat"] is not None

    def post(self, path: str, json: Any = None) -> httpx.Response:
        assert self.client is not None
        return self.client.post(path, json=json, headers={"X-CSRF-Token": self.csrf})

    def get(self, path: str) -> httpx.Response:
        assert self.client is not None
        return self.client.get(path)

    def __exit__(self, *exc: object) -> None:
        from tests.conftest import drop_database

        if self.client is not None:
            self.client.close()
        for proc in self.workers:
            proc.stop()
        if self.serve is not None:
            self.serve.stop()
        drop_database(self.db_name)


@contextmanager
def embedded_web(tmp: Path) -> Iterator[tuple[str, Any, Any]]:
    """`prefloop serve --no-worker` on a fresh SQLite data dir, for browser tests.

    Yields (base URL, a session factory on its database, its media store) once the schema
    exists and the web answers.
    """
    from sqlalchemy.orm import sessionmaker

    import app.models  # noqa: F401 - every table, for the flush order
    from app.core.db import make_engine
    from app.core.storage import MediaStore

    data_dir = tmp / "data"
    port = free_port()
    serve = Proc(
        ["serve", "--no-worker", "--data-dir", str(data_dir), "--port", str(port)],
        base_env(PREFLOOP_LOG_LEVEL="WARNING"),
        tmp / "serve.log",
    )
    base = f"http://127.0.0.1:{port}"
    engine = None
    try:
        # The admin line comes after the migrations: the schema is there from then on.
        wait_for(lambda: "admin login" in serve.output(), 90, what="serve to migrate")
        engine = make_engine(f"sqlite:///{data_dir / 'prefloop.db'}")
        factory = sessionmaker(bind=engine, expire_on_commit=False)
        wait_for(lambda: httpx.get(f"{base}/login", timeout=2).status_code == 200, 60, what="web")
        yield base, factory, MediaStore(data_dir / "media")
    finally:
        serve.stop()
        if engine is not None:
            engine.dispose()
