"""A lead's lifecycle pages in headless Chromium: archiving a model from the models page, a
generate job with one bad model ending `partial` on the job page (real Celery worker), and the
DPO job page's links to its child model, evaluation and arena jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from app.core.db import session_scope, utcnow
from app.generators.models import ModelVersion
from app.jobs.models import Job
from app.projects.models import Project
from app.users import service as users
from tests.support import Stack, embedded_web, launch_chromium, wait_for

PASSWORD = "lead-password-1"
EMAIL = "lead@lifecycle.test"


def _sign_in(page: Page, base: str, email: str = EMAIL, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def _admin(session: Any) -> None:
    users.create_user(session, email=EMAIL, role="admin")
    admin = users.get_by_email(session, EMAIL)
    assert admin is not None
    users.set_password(session, admin, PASSWORD)


@pytest.fixture()
def browser_page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.mark.slow
def test_a_model_is_archived_from_its_page_and_leaves_the_job_form(
    tmp_path: Path, browser_page: Page
) -> None:
    page = browser_page
    with embedded_web(tmp_path) as (base, factory, _store):
        with session_scope(factory) as session:
            _admin(session)
            project = Project(name="Lifecycle", description="", settings={})
            session.add(project)
            session.flush()
            kept = ModelVersion(project_id=project.id, name="keeper", base="toy", params={})
            old = ModelVersion(project_id=project.id, name="old-timer", base="toy", params={})
            session.add_all([kept, old])
            session.flush()
            pid, kept_id, old_id = project.id, kept.id, old.id
        _sign_in(page, base)
        page.goto(f"{base}/projects/{pid}/models")
        expect(page.locator(f"#model-{old_id} [data-status]")).to_have_text("ready")
        page.locator(f"#model-{old_id} button[data-action=archive]").click()
        page.wait_for_url(f"**/projects/{pid}/models#model-{old_id}")
        archived = page.locator("#archived-models")
        expect(archived).to_contain_text("Archived (1)")
        # The redirect's #model-… fragment may already have opened the fold.
        archived.evaluate("details => { details.open = true; }")
        expect(archived.locator(f"#model-{old_id}")).to_be_visible()
        expect(page.locator(f"#models > table #model-{old_id}")).to_have_count(0)
        with session_scope(factory) as session:
            row = session.get(ModelVersion, old_id)
            assert row is not None and row.archived_at is not None
        # New jobs no longer offer it; the other model is still ticked.
        page.goto(f"{base}/projects/{pid}/jobs/new?kind=generate")
        expect(page.locator(f"input[name=model_ids][value='{kept_id}']")).to_be_checked()
        expect(page.locator(f"input[name=model_ids][value='{old_id}']")).to_have_count(0)
        # And it comes back with one click.
        page.goto(f"{base}/projects/{pid}/models")
        page.locator("#archived-models summary").click()
        expect(page.locator("#archived-models")).to_have_attribute("open", "")
        page.locator(f"#model-{old_id} button[data-action=unarchive]").click()
        page.wait_for_url(f"**/projects/{pid}/models#model-{old_id}")
        expect(page.locator("#archived-models")).to_have_count(0)
        expect(page.locator(f"#model-{old_id}")).to_be_visible()


@pytest.mark.slow
def test_the_dpo_job_page_links_to_its_child_evaluation_and_arena_jobs(
    tmp_path: Path, browser_page: Page
) -> None:
    page = browser_page
    with embedded_web(tmp_path) as (base, factory, _store):
        with session_scope(factory) as session:
            _admin(session)
            project = Project(name="Loop", description="", settings={})
            session.add(project)
            session.flush()
            parent = ModelVersion(project_id=project.id, name="parent-model", base="toy",
                                  params={})  # fmt: skip
            session.add(parent)
            session.flush()
            child = ModelVersion(project_id=project.id, name="parent-model+dpo", base="toy",
                                 params={}, parent_id=parent.id)  # fmt: skip
            session.add(child)
            session.flush()
            done = {"status": "succeeded", "progress": 1.0, "finished_at": utcnow()}
            evaluate = Job(project_id=project.id, kind="evaluate", queue="gpu",
                           params={"model_ids": [parent.id, child.id]}, **done)  # fmt: skip
            arena = Job(project_id=project.id, kind="generate", queue="gpu",
                        params={"model_ids": [parent.id, child.id]}, **done)  # fmt: skip
            session.add_all([evaluate, arena])
            session.flush()
            # What a finished train_dpo job records (worker.tasks.children.close_the_loop).
            result = {"model_id": child.id, "parent_id": parent.id,
                      "evaluate_job_id": evaluate.id, "arena_job_id": arena.id}  # fmt: skip
            dpo = Job(project_id=project.id, kind="train_dpo", queue="gpu",
                      params={"model_id": parent.id}, result=result, **done)  # fmt: skip
            session.add(dpo)
            session.flush()
            pid, child_id, ids = project.id, child.id, (dpo.id, evaluate.id, arena.id)
        dpo_id, evaluate_id, arena_id = ids
        _sign_in(page, base)
        page.goto(f"{base}/jobs/{dpo_id}")
        # The result names the models beside their ids.
        expect(page.locator("#job-status details pre")).to_contain_text(
            '"model_name": "parent-model+dpo"'
        )
        page.get_by_role("link", name="Trained model: parent-model+dpo").click()
        page.wait_for_url(f"{base}/projects/{pid}/models#model-{child_id}")
        expect(page.locator(f"#model-{child_id}")).to_contain_text("parent-model+dpo")
        page.goto(f"{base}/jobs/{dpo_id}")
        page.get_by_role("link", name=f"Evaluate job {evaluate_id}").click()
        page.wait_for_url(f"{base}/jobs/{evaluate_id}")
        expect(page.locator("h2", has_text=f"Job {evaluate_id}")).to_contain_text("evaluate")
        page.goto(f"{base}/jobs/{dpo_id}")
        page.get_by_role("link", name=f"Arena job {arena_id}").click()
        page.wait_for_url(f"{base}/jobs/{arena_id}")
        expect(page.locator("h2", has_text=f"Job {arena_id}")).to_contain_text("generate")


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    from tests.tiny_pipelines import build_tiny_sd

    with Stack(tmp_path) as running:
        running.model_path = build_tiny_sd(tmp_path / "data" / "models" / "tiny-sd")  # type: ignore[attr-defined]
        yield running


@pytest.mark.slow
def test_generate_with_one_bad_model_shows_partial_on_the_job_page(
    stack: Stack, browser_page: Page
) -> None:
    page = browser_page
    # Launched before the checks have run (no worker yet), as a lead in a hurry would.
    stack.workers[-1].stop()
    pid = stack.post("/api/v1/projects", {"name": "hurry"}).json()["id"]
    prompts = [{"text": "a red circle"}, {"text": "a blue square"}]
    assert stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": prompts}).status_code == 201
    tiny = str(stack.model_path)  # type: ignore[attr-defined]
    ids = {}
    for name, base, steps in (("tiny-a", tiny, 3), ("hub-typo", "prefloop-test/no-such-model", 3),
                              ("tiny-b", tiny, 4)):  # fmt: skip
        made = stack.post(f"/api/v1/projects/{pid}/models",
                          {"name": name, "base": base, "params": {"steps": steps}})  # fmt: skip
        assert made.status_code == 201, made.text
        ids[name] = made.json()["id"]
    _sign_in(page, stack.base, *stack.admin)
    page.goto(f"{stack.base}/projects/{pid}/jobs/new?kind=generate")
    for model_id in ids.values():
        expect(page.locator(f"input[name=model_ids][value='{model_id}']")).to_be_checked()
    page.fill("input[name=images_per_prompt]", "1")
    page.click("#job-form button[type=submit]")
    page.wait_for_url(f"{stack.base}/jobs/*")
    stack.start_worker()
    status = page.locator("#job-status [data-status]")
    expect(status).to_have_text("partial", timeout=240_000)
    expect(page.locator("[data-partial]")).to_be_visible()
    expect(page.locator("#job-status pre.error")).to_contain_text("prefloop-test/no-such-model")
    result = page.locator("#job-status details pre")
    expect(result).to_contain_text('"model_name": "hub-typo"')
    expect(result).to_contain_text('"pairs": 2')
    # The models page shows the check's verdict and reason once the check has run.
    def verdict() -> str:
        page.goto(f"{stack.base}/projects/{pid}/models")
        return page.locator(f"#model-{ids['hub-typo']}").get_attribute("data-check") or ""

    assert wait_for(lambda: verdict() == "failed", 120, what="the check's verdict")
    expect(page.locator(f"#model-{ids['hub-typo']} .check-error")).to_contain_text(
        "cannot load model"
    )
    expect(page.locator(f"#model-{ids['tiny-a']}")).to_have_attribute("data-check", "ready")
