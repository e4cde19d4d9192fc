"""`prefloop serve`: one command that runs the platform as a small process tree.

The parent migrates once, creates the first admin, then starts uvicorn and a Celery worker as
children and watches them. It also runs the stale-job reaper on a timer, which in the embedded
mode stands in for Celery beat. SIGINT/SIGTERM stop both children. A child that dies is started
again after a back-off (voting stays up while the worker is down). The URL and the first admin's
login are printed last, once the web answers and the worker has reported in.
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import click
from sqlalchemy import func, select

from app.bootstrap import BootstrapError, ensure_admin
from app.core.config import get_settings
from app.core.db import session_scope, utcnow
from app.core.migrate import upgrade_head

log = logging.getLogger("prefloop.serve")

# Seconds before restarting a child that died, by how many times in a row it died young.
RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
# A child that ran this long before dying counts as healthy: its next restart is immediate-ish.
STABLE_SECONDS = 60.0
# How long start-up waits for the web to answer and the worker to report in before printing.
READY_TIMEOUT = 120.0


def port_problem(host: str, port: int) -> str | None:
    """A human sentence if (host, port) cannot be bound, else None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use; pick another with --port"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


class Supervisor:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        web_workers: int = 1,
        start_worker: bool = True,
        demo: bool = False,
        echo: Callable[[str], None] = click.echo,
    ) -> None:
        self.host = host
        self.port = port
        self.web_workers = web_workers
        self.start_worker = start_worker
        self.demo = demo
        self.echo = echo
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, list[str]] = {}
        self.started_at: dict[str, float] = {}
        self.restart_at: dict[str, float] = {}
        self.crashes: dict[str, int] = {}
        self.stopping = threading.Event()

    def _prepare(self) -> None:
        settings = get_settings()
        if settings.is_sqlite:
            settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
        settings.resolved_media_dir.mkdir(parents=True, exist_ok=True)
        if settings.embedded:
            (settings.broker_dir / "queue").mkdir(parents=True, exist_ok=True)
            settings.effective_secret_key()
        upgrade_head()

    def _commands(self) -> dict[str, list[str]]:
        settings = get_settings()
        web = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            settings.log_level.lower(),
            "--no-access-log",
            # The app reads X-Forwarded-For itself, from PREFLOOP_TRUSTED_PROXIES only.
            "--no-proxy-headers",
        ]
        if self.web_workers > 1:
            web += ["--workers", str(self.web_workers)]
        commands = {"web": web}
        if self.start_worker:
            worker = [sys.executable, "-m", "app.cli", "worker", "--queues", "gpu,cpu", "--quiet"]
            commands["worker"] = worker
        return commands

    def _start(self, name: str) -> None:
        env = {**os.environ, "PREFLOOP_DATA_DIR": str(get_settings().resolved_data_dir)}
        self.children[name] = subprocess.Popen(self.commands[name], env=env)
        self.started_at[name] = time.monotonic()

    def _watch(self) -> None:
        """Restart a child that died, after a back-off that grows while it keeps dying young."""
        now = time.monotonic()
        for name, child in self.children.items():
            due = self.restart_at.get(name)
            if due is not None:
                if now >= due:
                    del self.restart_at[name]
                    self._start(name)
                    self.echo(f"serve: {name} restarted")
                continue
            code = child.poll()
            if code is None:
                continue
            lived = now - self.started_at[name]
            # Deaths in a row, each within STABLE_SECONDS of its start.
            crashes = 1 if lived >= STABLE_SECONDS else self.crashes.get(name, 0) + 1
            self.crashes[name] = crashes
            delay = RESTART_BACKOFF[min(crashes, len(RESTART_BACKOFF)) - 1]
            note = " (voting stays up; jobs wait until it is back)" if name == "worker" else ""
            self.echo(
                f"serve: {name} exited with code {code} after {lived:.0f} s; "
                f"restarting in {delay:g} s{note}"
            )
            self.restart_at[name] = now + delay

    def _web_answers(self) -> bool:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        try:
            urllib.request.urlopen(f"http://{host}:{self.port}/healthz", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # answering, if unhappy: /healthz says why
        except OSError:
            return False
        return True

    def _worker_reported(self, since: dt.datetime) -> bool:
        from app.jobs.models import WorkerHeartbeat

        with session_scope() as session:
            last = session.scalar(select(func.max(WorkerHeartbeat.last_seen_at)))
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=dt.UTC)
        return last is not None and last >= since

    def _wait_until_ready(self) -> None:
        """Until the web answers and the worker (if any) has reported in, or READY_TIMEOUT."""
        since = utcnow() - dt.timedelta(seconds=1)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.stopping.is_set() and time.monotonic() < deadline:
            if self._web_answers() and (not self.start_worker or self._worker_reported(since)):
                return
            self._watch()
            self.stopping.wait(0.5)

    def _reap_loop(self) -> None:
        from app.jobs.periodic import periodic_work

        interval = get_settings().reaper_interval_seconds
        while not self.stopping.wait(interval):
            try:
                periodic_work()
            except Exception as exc:  # noqa: BLE001 - the reaper must outlive database blips
                log.warning("serve.reaper_failed error=%s", exc)

    def _stop_children(self, timeout: float = 15.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def run(self) -> int:
        problem = port_problem(self.host, self.port)
        if not problem and self.start_worker and importlib.util.find_spec("torch") is None:
            problem = (
                "the worker needs torch, which is not installed: pip install 'prefloop[worker]' "
                "(or start the web alone with --no-worker)"
            )
        if problem:
            self.echo(f"error: {problem}")
            return 2
        self._prepare()
        try:
            admin = ensure_admin()
        except BootstrapError as exc:
            self.echo(f"error: {exc}")
            return 2
        demo_lines: list[str] = []
        if self.demo:
            from app.demo import create_demo

            demo_lines = create_demo(f"http://{self.host}:{self.port}")
        received: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.commands = self._commands()
        for name in self.commands:
            self._start(name)
        threading.Thread(target=self._reap_loop, daemon=True).start()
        self._wait_until_ready()
        url = f"http://{self.host}:{self.port}/"
        # Last, after the children's start-up output, so the login is not scrolled away.
        self.echo("")
        self.echo(f"prefloop is running at {url}")
        if admin:
            self.echo(admin.announcement())
        for line in demo_lines:
            self.echo(line)
        while not self.stopping.wait(0.5):
            self._watch()
        self._stop_children()
        self.echo("prefloop stopped")
        return 0
