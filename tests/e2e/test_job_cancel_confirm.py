"""Cancelling a job from its page asks first, in headless Chromium (no inline script: app.js)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from app.core.db import session_scope
from app.jobs.models import Job
from app.projects.models import Project
from app.users import service as users
from tests.support import embedded_web, launch_chromium

PASSWORD = "lead-password-1"


@pytest.mark.slow
def test_cancel_asks_for_confirmation(tmp_path: Path) -> None:
    with embedded_web(tmp_path) as (base, factory, _store):
        with session_scope(factory) as session:
            users.create_user(session, email="lead@example.org", role="admin")
            admin = users.get_by_email(session, "lead@example.org")
            assert admin is not None
            users.set_password(session, admin, PASSWORD)
            project = Project(name="P", description="", settings={})
            session.add(project)
            session.flush()
            job = Job(project_id=project.id, kind="fit_ratings", queue="cpu", params={},
                      status="running", progress=0.3)  # fmt: skip
            session.add(job)
            session.flush()
            job_id = job.id

        def cancel_requested() -> bool:
            with session_scope(factory) as session:
                found = session.get(Job, job_id)
                assert found is not None
                return found.cancel_requested

        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page()
                page.goto(f"{base}/login")
                page.fill("#email", "lead@example.org")
                page.fill("#password", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url(f"{base}/")
                page.goto(f"{base}/jobs/{job_id}")
                asked: list[str] = []

                def say_no(dialog):  # type: ignore[no-untyped-def]
                    asked.append(dialog.message)
                    dialog.dismiss()

                page.once("dialog", say_no)
                page.click("text=Cancel job")
                page.wait_for_timeout(500)
                question = f"Cancel job {job_id} (fit_ratings)? Work in progress is discarded."
                assert asked == [question]
                assert not cancel_requested()
                assert "cancelling" not in page.inner_text("#job-status")

                page.once("dialog", lambda dialog: dialog.accept())
                page.click("text=Cancel job")
                page.wait_for_selector("text=cancelling…")
                assert cancel_requested()
            finally:
                browser.close()
