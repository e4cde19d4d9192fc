"""`prefloop serve`: one command that runs the platform as a small process tree.

The parent migrates once, creates the first admin, then starts uvicorn and a Celery worker as
children and watches them. It also runs the stale-job reaper on a timer, which in the embedded
mode stands in for Celery beat. SIGINT/SIGTERM stop both children; if one child dies the other
is stopped too and the command exits non-zero.
"""

from __future__ import annotations

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
from collections.abc import Callable

import click

from app.bootstrap import BootstrapError, ensure_admin
from app.core.config import get_settings
from app.core.migrate import upgrade_head

log = logging.getLogger("prefloop.serve")


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

    def _spawn(self) -> None:
        settings = get_settings()
        env = {**os.environ, "PREFLOOP_DATA_DIR": str(settings.resolved_data_dir)}
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
        ]
        if self.web_workers > 1:
            web += ["--workers", str(self.web_workers)]
        self.children["web"] = subprocess.Popen(web, env=env)
        if self.start_worker:
            self.children["worker"] = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "worker", "--queues", "gpu,cpu"], env=env
            )

    def _reap_loop(self) -> None:
        from worker.tasks.run import periodic_work

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
        if self.start_worker and importlib.util.find_spec("torch") is None:
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
        self._spawn()
        threading.Thread(target=self._reap_loop, daemon=True).start()
        url = f"http://{self.host}:{self.port}/"
        self.echo(f"prefloop is starting at {url}")
        if admin:
            self.echo(admin.announcement())
        for line in demo_lines:
            self.echo(line)
        code = 0
        while not self.stopping.wait(0.5):
            dead = {name: c.returncode for name, c in self.children.items() if c.poll() is not None}
            if dead:
                self.echo(f"error: {', '.join(dead)} exited ({dead}); stopping")
                code = 1
                self.stopping.set()
        self._stop_children()
        self.echo("prefloop stopped")
        return code
