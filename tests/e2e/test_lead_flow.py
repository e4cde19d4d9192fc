"""A lead's whole loop in real headless Chromium against a real `prefloop serve` (embedded).

Log in, create a project, upload prompts (a bad file first: its errors, nothing imported),
register two model versions, tune the settings, launch a generate job (a bad form first: its
errors inline) and watch it finish on the job page, invite an annotator, then see the dashboard
follow votes cast through the JSON API and a rating fit.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support import (
    FAST_JOBS,
    REPO,
    Proc,
    base_env,
    bearer,
    free_port,
    launch_chromium,
    login,
    wait_for,
)

LEAD = ("lead@flow.test", "lead-flow-password-1")
TOY = REPO / "worker" / "toy" / "weights" / "toy-v1" / "model_index.json"
PROMPTS = b"a red circle\na blue square\na green triangle\na yellow circle\n"
BAD_PROMPTS = b'{"text": "fine"}\n{"text": ""}\nnot json\n'


def _healthy(base: str) -> bool:
    body = httpx.get(f"{base}/healthz", timeout=5).json()
    return body["status"] == "ok" and body["worker"]["last_heartbeat"] is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("lead-flow")
    env = base_env(PREFLOOP_DATA_DIR=str(tmp / "data"), PREFLOOP_LOG_LEVEL="WARNING", **FAST_JOBS)
    if TOY.exists():
        base_model = "toy"
    else:
        from tests.tiny_pipelines import build_tiny_sd

        base_model = str(build_tiny_sd(tmp / "data" / "models" / "tiny-sd"))
    port = free_port()
    serve = Proc(["serve", "--port", str(port)], env, tmp / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: "admin login" in serve.output(), 90, what="serve to migrate")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "app.cli",
                "user",
                "add",
                LEAD[0],
                "--role",
                "lead",
                "--password",
                LEAD[1],
            ],  # fmt: skip
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        wait_for(lambda: _healthy(base), 120, what="web and worker up")
        yield {"base": base, "model": base_model, "serve": serve}
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


def _stat(page: Page, name: str) -> str:
    return page.inner_text(f'#dash-overview [data-stat="{name}"]').strip()


@pytest.mark.slow
def test_lead_sets_up_generates_and_watches_the_dashboard(
    server: dict[str, Any], browser: Any, artifacts: Path
) -> None:
    base = server["base"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    # Script errors only: 4xx answers (a form's 422, a missing favicon) are expected.
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and "Failed to load resource" not in m.text
            else None
        ),
    )

    # Log in and create a project.
    page.goto(f"{base}/")
    page.wait_for_url(re.compile(r".*/login\?next=/$"))
    page.fill("#email", LEAD[0])
    page.fill("#password", LEAD[1])
    page.click("button[type=submit]")
    page.click("text=New project")
    page.fill("#name", "Shapes <lead flow>")
    page.click("button:has-text('Create project')")
    page.wait_for_url(re.compile(r".*/projects/\d+/prompts$"))
    project_id = int(page.url.rsplit("/", 2)[1])

    # A bad file: every problem with its line, nothing imported.
    page.set_input_files(
        "#file", {"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": BAD_PROMPTS}
    )
    page.click("button:has-text('Upload')")
    problems = page.inner_text("#upload-errors")
    assert "Nothing was imported" in problems
    assert "line 2" in problems and "line 3" in problems
    assert "train 0 · val 0 · test 0" in page.inner_text("[data-stat=prompt-counts]")
    page.screenshot(path=str(artifacts / "lead_prompt_errors.png"), full_page=True)
    page.set_input_files(
        "#file", {"name": "prompts.txt", "mimeType": "text/plain", "buffer": PROMPTS}
    )
    page.click("button:has-text('Upload')")
    expect(page.locator("text=Added 4 prompts")).to_be_visible()

    # Two model versions of one base (different guidance), fast settings for the test.
    page.click("nav.tabs >> text=Models")
    for name, guidance in (("sharp", "7.5"), ("soft", "1.0")):
        page.fill("#m-name", name)
        page.fill("#m-base", server["model"])
        page.select_option("#f-p_scheduler", "ddim")
        page.fill("#f-p_steps", "4")
        page.fill("#f-p_guidance_scale", guidance)
        page.click("button:has-text('Register')")
        expect(page.locator(f"table.models >> text={name}")).to_be_visible()
    page.click("nav.tabs >> text=Settings")
    page.fill("#f-votes_per_pair", "1")
    page.fill("#f-votes_per_second", "50")
    page.click("button:has-text('Save settings')")
    expect(page.locator("text=Saved.")).to_be_visible()

    # Launch generate: a bad form first (no model ticked), then the real one.
    page.click("nav.tabs >> text=Jobs")
    page.click("a.button:has-text('generate')")
    for box in page.query_selector_all("input[name=model_ids]"):
        box.uncheck()
    page.click("button:has-text('Launch')")
    expect(page.locator("[data-field=model_ids] .field-error")).to_contain_text("at least 1")
    for box in page.query_selector_all("input[name=model_ids]"):
        box.check()
    page.fill("#f-images_per_prompt", "1")
    page.click("button:has-text('Launch')")
    page.wait_for_url(re.compile(r".*/jobs/\d+$"))
    # The live page follows the job through htmx polling until it is done.
    expect(page.locator("#job-status [data-status]")).to_have_attribute(
        "data-status", "succeeded", timeout=60_000
    )
    assert '"images": 8' in page.inner_text("#job-status details")
    page.screenshot(path=str(artifacts / "lead_job_page.png"), full_page=True)
    expect(page.locator("#jobs-table, #job-status")).to_have_count(1)

    # Invite an annotator: the link lets them set a password and start.
    page.click("nav.tabs >> text=Annotators")
    page.fill("#invite-email", "ann@flow.test")
    page.click("button:has-text('Add and get an invite link')")
    link = page.inner_text("#invite-link").strip()
    guest = browser.new_context(viewport={"width": 800, "height": 700})
    invited = guest.new_page()
    invited.goto(link)
    invited.fill("#password", "annotator-flow-1")
    invited.fill("#confirm", "annotator-flow-1")
    invited.click("button[type=submit]")
    invited.wait_for_url(f"{base}/")
    expect(invited.locator(f'a[href="/projects/{project_id}/vote"]')).to_be_visible()
    # Annotators never reach the dashboard.
    assert invited.goto(f"{base}/projects/{project_id}").status == 403  # type: ignore[union-attr]
    guest.close()

    # The dashboard before any vote.
    page.click("nav.tabs >> text=Dashboard")
    assert _stat(page, "votes") == "0" and _stat(page, "images") == "8"
    assert len(page.query_selector_all("#dash-gallery img")) == 8

    # Votes through the JSON API with an annotator token; the page follows by polling.
    with httpx.Client(base_url=base, timeout=15) as api:
        csrf = login(api, *LEAD)
        made = api.post(
            f"/api/v1/projects/{project_id}/annotators",
            json={"email": "api-annotator@flow.test"},
            headers={"X-CSRF-Token": csrf},
        )
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        cast = 0
        while True:
            pair = api.get(f"/api/v1/projects/{project_id}/pairs/next", headers=bearer(token))
            if pair.status_code == 204:
                break
            body = pair.json()
            choice = "left" if cast % 4 != 3 else "right"
            vote = api.post(
                f"/api/v1/pairs/{body['pair_id']}/votes",
                json={
                    "choice": choice,
                    "left_image_id": body["left"]["image_id"],
                    "latency_ms": 900,
                },  # fmt: skip
                headers=bearer(token),
            )
            assert vote.status_code == 201, vote.text
            cast += 1
        assert cast == 4
        expect(page.locator('#dash-overview [data-stat="votes"]')).to_have_text(
            str(cast), timeout=15_000
        )
        assert _stat(page, "pairs-complete") == "4 / 4"
        fit = api.post(
            f"/api/v1/projects/{project_id}/jobs",
            json={"kind": "fit_ratings", "params": {"bootstrap": 50}},
            headers={"X-CSRF-Token": csrf},
        )
        assert fit.status_code == 202, fit.text
    # The leaderboard and the annotator-quality table arrive with the fit.
    expect(page.locator("#dash-leaderboard table.leaderboard tbody tr")).to_have_count(
        2, timeout=30_000
    )
    expect(page.locator("#dash-leaderboard svg .bar")).to_have_count(2)
    expect(page.locator("#dash-quality table.quality")).to_contain_text("api-annotator@flow.test")
    page.screenshot(path=str(artifacts / "lead_dashboard.png"), full_page=True)
    assert "Shapes &lt;lead flow&gt;" in page.content()
    assert not errors, errors
    context.close()
