"""The platform as real processes: `prefloop serve`, `prefloop worker`, SIGTERM and SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL, create_database, drop_database
from tests.support import Proc, base_env, free_port, login, wait_for, wait_job

FAST_JOBS = {
    "PREFLOOP_JOB_HEARTBEAT_SECONDS": "0.5",
    "PREFLOOP_JOB_STALE_SECONDS": "3",
    "PREFLOOP_REAPER_INTERVAL_SECONDS": "1",
}


def _admin_password(proc: Proc) -> tuple[str, str]:
    match = wait_for(
        lambda: re.search(r"admin login (\S+) / password (\S+)", proc.output()),
        60,
        what="the first-run admin login",
    )
    return match.group(1), match.group(2)


def _healthy(base: str) -> bool:
    body = httpx.get(f"{base}/healthz", timeout=5).json()
    return body["status"] == "ok" and body["worker"]["last_heartbeat"] is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _run_selftest(client: httpx.Client, csrf: str, **params: object) -> int:
    response = client.post(
        "/api/v1/jobs", json={"kind": "selftest", "params": params}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


@pytest.mark.slow
def test_embedded_serve_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    serve = Proc(
        ["serve", "--data-dir", str(data_dir), "--port", str(port)],
        base_env(**FAST_JOBS),
        tmp_path / "serve.log",
    )
    try:
        email, password = _admin_password(serve)
        wait_for(lambda: _healthy(base), 90, what="a healthy /healthz")
        assert (data_dir / "prefloop.db").exists() and (data_dir / "media").is_dir()
        with httpx.Client(base_url=base, timeout=10) as client:
            csrf = login(client, email, password)
            job_id = _run_selftest(client, csrf, steps=3, sleep=0.1)
            job = wait_job(client, job_id, {}, 60)
            assert job["status"] == "succeeded", job
            assert job["progress"] == 1.0 and len(job["metrics"]["step_seconds"]) == 3
            result = job["result"]
            assert result["device"] in ("cpu", "cuda") and result["torch"] and result["host"]
            assert (data_dir / "media" / result["media_file"]).exists()
        children = serve.children()
        assert len(children) == 2, serve.output()
    finally:
        code = serve.stop()
    assert code == 0, serve.output()
    assert "prefloop stopped" in serve.output()
    assert not [pid for pid in children if _alive(pid)], "children left running"


def _child(serve: Proc, marker: str) -> int:
    """The pid of serve's child whose command line contains marker."""
    for pid in serve.children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if marker in cmdline:
            return pid
    raise AssertionError(f"no child running {marker!r}: {serve.children()}")


def _last_lines(output: str, n: int) -> list[str]:
    return [line for line in output.splitlines() if line.strip()][-n:]


@pytest.mark.slow
@pytest.mark.long(100)
def test_serve_prints_the_login_last_and_restarts_dead_children(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Proc(
        ["serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        base_env(**FAST_JOBS),
        tmp_path / "serve.log",
    )
    try:
        email, password = _admin_password(serve)
        # The login comes once the web answers and the worker has reported in: nothing after it.
        assert _healthy(base)
        time.sleep(2)
        url_line, login_line = _last_lines(serve.output(), 2)
        assert url_line == f"prefloop is running at {base}/"
        assert login_line.startswith(f"first run: admin login {email} / password {password}")
        assert " -------------- " not in serve.output()  # no Celery banner

        worker = _child(serve, "app.cli worker")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "serve: worker restarted" in serve.output(), 30, what="worker restart")
        assert re.search(
            r"serve: worker exited with code -9 after \d+ s; restarting in 1 s \(voting stays up",
            serve.output(),
        ), serve.output()
        # Voting (the web) never went away; the new worker reports in and health is ok again.
        assert httpx.get(f"{base}/login", timeout=5).status_code == 200
        assert _child(serve, "app.cli worker") != worker
        wait_for(lambda: _healthy(base), 60, what="the restarted worker to report in")

        web = _child(serve, "uvicorn")
        os.kill(web, signal.SIGKILL)
        wait_for(lambda: "serve: web restarted" in serve.output(), 30, what="web restart")
        wait_for(lambda: httpx.get(f"{base}/login", timeout=2).status_code == 200, 60, what="web")
        assert _child(serve, "uvicorn") != web
        with httpx.Client(base_url=base, timeout=10) as client:
            login(client, email, password)
    finally:
        code = serve.stop()
    assert code == 0, serve.output()


@pytest.mark.slow
def test_serve_reports_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        serve = Proc(
            ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)],
            base_env(),
            tmp_path / "s.log",
        )
        serve.proc.wait(timeout=60)
        assert serve.proc.returncode == 2
        assert f"port {port} on 127.0.0.1 is already in use" in serve.output()
        serve.stop()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Postgres + Redis: `serve --no-worker` (web and reaper) and a separately started worker."""
    tmp = tmp_path_factory.mktemp("distributed")
    name = f"prefloop_e2e_{uuid.uuid4().hex[:8]}"
    db_url = create_database(name)
    env = base_env(
        PREFLOOP_DATABASE_URL=db_url,
        PREFLOOP_BROKER_URL=REDIS_URL,
        PREFLOOP_BROKER_KEY_PREFIX=f"prefloop-e2e-{uuid.uuid4().hex[:8]}:",
        PREFLOOP_SECRET_KEY="e2e-secret-" + uuid.uuid4().hex,
        PREFLOOP_DATA_DIR=str(tmp / "data"),
        PREFLOOP_MEDIA_DIR=str(tmp / "media"),
        **FAST_JOBS,
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Proc(["serve", "--no-worker", "--port", str(port)], env, tmp / "serve.log")
    workers: list[Proc] = []

    def start_worker() -> Proc:
        proc = Proc(["worker", "--queues", "gpu,cpu"], env, tmp / f"worker{len(workers)}.log")
        workers.append(proc)
        return proc

    try:
        email, password = _admin_password(serve)
        start_worker()
        wait_for(lambda: _healthy(base), 90, what="a healthy distributed stack")
        client = httpx.Client(base_url=base, timeout=10)
        csrf = login(client, email, password)
        yield {
            "client": client,
            "csrf": csrf,
            "start_worker": start_worker,
            "workers": workers,
            "serve": serve,
        }
        client.close()
    finally:
        for proc in workers:
            proc.stop()
        serve.stop()
        drop_database(name)


@pytest.mark.slow
def test_distributed_selftest(distributed: dict) -> None:  # type: ignore[type-arg]
    client, csrf = distributed["client"], distributed["csrf"]
    job = wait_job(client, _run_selftest(client, csrf, steps=2, sleep=0.1, queue="gpu"), {}, 60)
    assert job["status"] == "succeeded", job
    assert job["queue"] == "gpu" and job["attempts"] == 1


@pytest.mark.slow
def test_worker_killed_mid_job_is_rerun_by_the_reaper(distributed: dict) -> None:  # type: ignore[type-arg]
    client, csrf = distributed["client"], distributed["csrf"]
    worker: Proc = distributed["workers"][-1]
    job_id = _run_selftest(client, csrf, steps=12, sleep=0.5)
    wait_for(
        lambda: client.get(f"/api/v1/jobs/{job_id}").json()["progress"] > 0.1, 60, what="progress"
    )
    worker.kill(signal.SIGKILL)
    running = client.get(f"/api/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["attempts"] == 1
    distributed["start_worker"]()
    job = wait_job(client, job_id, {}, 90)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert any("lost during attempt 1" in line for line in job["log"]), job["log"]


@pytest.mark.slow
def test_job_failing_every_attempt_ends_failed(distributed: dict) -> None:  # type: ignore[type-arg]
    client, csrf = distributed["client"], distributed["csrf"]
    job = wait_job(client, _run_selftest(client, csrf, steps=1, sleep=0, fail=True), {}, 60)
    assert job["status"] == "failed"
    assert job["attempts"] == job["max_attempts"] == 3
    assert "selftest asked to fail" in job["error"] and "gave up after 3 attempts" in job["error"]
