"""`prefloop serve --demo` in a fresh data dir: votable within 90 seconds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Proc, base_env, free_port, login, wait_for

DEMO_DEADLINE_S = 90


@pytest.mark.slow
def test_demo_serves_a_votable_pair_quickly(tmp_path: Path, artifacts: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    serve = Proc(
        ["serve", "--demo", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        base_env(),
        tmp_path / "serve.log",
    )
    try:
        match = wait_for(
            lambda: re.search(r"annotator login (\S+) / password (\S+)", serve.output()),
            DEMO_DEADLINE_S,
            what="the demo annotator login",
        )
        vote_url = re.search(r"vote at (\S+)", serve.output()).group(1)  # type: ignore[union-attr]
        project_id = int(vote_url.rstrip("/").split("/")[-2])
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, DEMO_DEADLINE_S)
        with httpx.Client(base_url=base, timeout=10) as client:
            login(client, match.group(1), match.group(2))

            def pair() -> dict | None:  # type: ignore[type-arg]
                response = client.get(f"/api/v1/projects/{project_id}/pairs/next")
                return response.json() if response.status_code == 200 else None

            remaining = DEMO_DEADLINE_S - (time.monotonic() - started)
            served = wait_for(pair, max(remaining, 1), interval=0.5, what="a votable pair")
            elapsed = time.monotonic() - started
            page = client.get(vote_url.removeprefix(base))
            assert page.status_code == 200 and served["prompt"] in page.text
            image = client.get(served["left"]["url"])
            assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        (artifacts / "demo_startup.json").write_text(json.dumps({"seconds_to_first_pair": elapsed}))
        assert elapsed <= DEMO_DEADLINE_S
        # Running it again reuses the project instead of creating another.
    finally:
        serve.stop()
    again = Proc(
        ["serve", "--demo", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        base_env(),
        tmp_path / "serve2.log",
    )
    try:
        wait_for(lambda: "exists; vote at" in again.output(), 60, what="the demo's second start")
    finally:
        again.stop()
