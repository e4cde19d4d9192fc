"""Script in names and prompts, in real headless Chromium against a real `prefloop serve`.

A project, its prompts, its model names and an annotator's email all carry script payloads. The
vote page and the dashboard must show them as text (the payload is readable on the page) and
none may run: `window.__xss` stays undefined and no dialog opens. The CSP header must also stop
inline script that gets into the page some other way.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright
from sqlalchemy import select

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import session_scope
from app.generators.models import ModelVersion
from app.projects.schemas import ProjectCreate, ProjectSettings
from app.projects.service import add_member, create_project
from app.ratings.models import Rating, RatingFit
from app.users import service as users
from app.votes.models import Vote
from tests.factories import add_arena
from tests.support import embedded_web, launch_chromium

PASSWORD = "xss-test-password-1"
PROJECT = '<script>window.__xss=1</script>Proj "X"'
PROMPTS = [
    '<img src=x onerror="window.__xss=1">a red square',
    "<svg onload=window.__xss=1></svg>a blue circle",
    "</textarea><script>window.__xss=1</script>a green star",
]
MODELS = ['<img src=x onerror="window.__xss=1;alert(1)">', "<script>window.__xss=1</script>m2"]
EMAIL = "<script>window.__xss=1</script>@xss.test"


@dataclass
class Site:
    base: str
    project_id: int


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with embedded_web(tmp_path_factory.mktemp("xss")) as (base, factory, store):
        with session_scope(factory) as session:
            lead = users.create_user(session, email="lead@xss.test", role="lead", password=PASSWORD)
            annotator = users.create_user(session, email=EMAIL, role="annotator", password=PASSWORD)
            project = create_project(
                session,
                data=ProjectCreate(
                    name=PROJECT, settings=ProjectSettings(votes_per_pair=2, votes_per_second=50)
                ),
                creator=lead,
            )
            add_member(session, project=project, user=annotator, role="annotator")
            pairs = add_arena(
                session, store, project.id, PROMPTS, MODELS, image_size=32, seed=1
            )
            session.flush()
            first = pairs[0]
            session.add(
                Vote(
                    pair_id=first.id,
                    project_id=project.id,
                    annotator_id=annotator.id,
                    left_image_id=first.image_a_id,
                    choice="left",
                    latency_ms=1200,
                )
            )
            first.vote_count += 1
            fit = RatingFit(project_id=project.id, method={}, annotators=[], vote_count=1)
            session.add(fit)
            session.flush()
            models = session.scalars(
                select(ModelVersion)
                .where(ModelVersion.project_id == project.id)
                .order_by(ModelVersion.id)
            ).all()
            for rank, model in enumerate(models):
                session.add(
                    Rating(
                        fit_id=fit.id,
                        model_version_id=model.id,
                        score=0.0,
                        rating=1000.0,
                        ci_low=950.0,
                        ci_high=1050.0,
                        rank=rank + 1,
                        votes=1,
                    )
                )
            project_id = project.id
        yield Site(base, project_id)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


def _watched_page(browser: Any) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return page, dialogs


def _login(page: Page, site: Site, email: str, next_path: str) -> None:
    page.goto(f"{site.base}/login?next={next_path}")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    # The browser's own email check would refuse the payload address; the server accepts it.
    page.evaluate("document.querySelector('form').noValidate = true")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(site.base + next_path) + "$"))


def _assert_inert(page: Page, dialogs: list[str], shown: list[str]) -> None:
    page.wait_for_load_state("networkidle")
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert dialogs == []
    text = page.inner_text("body")
    for payload in shown:
        assert payload in text, f"{payload!r} is not shown as text"
    # No element the payloads would have created exists in the document.
    assert page.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    assert page.evaluate("document.querySelectorAll('[onerror], [onload]').length") == 0


@pytest.mark.slow
def test_vote_page_shows_script_prompts_as_text(site: Site, browser: Any, artifacts: Path) -> None:
    page, dialogs = _watched_page(browser)
    path = f"/projects/{site.project_id}/vote"
    _login(page, site, EMAIL, path)
    page.wait_for_selector("#vote-area")
    served = page.inner_text("#vote-area")
    assert any(prompt in served for prompt in PROMPTS), served[:500]
    _assert_inert(page, dialogs, [])
    # Vote once (an htmx swap brings the next prompt in): still inert.
    page.get_by_role("button", name=re.compile("Left", re.I)).first.click()
    page.wait_for_function("document.querySelector('#vote-area .votes-given')?.textContent")
    _assert_inert(page, dialogs, [])
    page.screenshot(path=str(artifacts / "xss_vote_page.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_dashboard_shows_script_names_as_text(site: Site, browser: Any, artifacts: Path) -> None:
    page, dialogs = _watched_page(browser)
    path = f"/projects/{site.project_id}"
    _login(page, site, "lead@xss.test", path)
    _assert_inert(page, dialogs, [PROJECT, *MODELS])
    # The leaderboard chart labels (inline SVG) carry the model names as text too.
    labels = page.evaluate(
        "Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)"
    )
    assert any(MODELS[0] in label for label in labels), labels
    page.goto(f"{site.base}/projects/{site.project_id}/prompts")
    _assert_inert(page, dialogs, [PROJECT, PROMPTS[0]])
    page.goto(f"{site.base}/projects/{site.project_id}/annotators")
    _assert_inert(page, dialogs, [PROJECT, EMAIL])
    page.goto(f"{site.base}/")
    _assert_inert(page, dialogs, [PROJECT])
    page.screenshot(path=str(artifacts / "xss_dashboard.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_csp_blocks_inline_script_that_gets_into_a_page(site: Site, browser: Any) -> None:
    page, _ = _watched_page(browser)
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security" in m.text else 0)
    response = page.goto(f"{site.base}/login")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    inject = """() => {
        const s = document.createElement('script');
        s.textContent = 'window.__inline = 1';
        document.body.appendChild(s);
        const d = document.createElement('div');
        d.innerHTML = '<img src="/static/none.png" onerror="window.__handler = 1">';
        document.body.appendChild(d);
        return new Promise(r => setTimeout(() => r([typeof window.__inline,
                                                     typeof window.__handler]), 500));
    }"""
    assert page.evaluate(inject) == ["undefined", "undefined"]
    assert violations, "the browser reported no CSP violation"
    # The same injection on a page without the header runs: the check above can fail.
    page.close()
    control = browser.new_page()
    control.set_content("<html><body></body></html>")
    assert control.evaluate(inject) == ["number", "number"]
    control.close()
