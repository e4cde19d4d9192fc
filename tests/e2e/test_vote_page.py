"""The vote page in real headless Chromium against a real `prefloop serve` (embedded SQLite).

Every step is checked against the database the server writes: votes by mouse and by each
keyboard shortcut, one htmx request per vote with the next images preloaded, changing the last
vote, the empty state, a phone-size layout, swipes on a touch screen and the layout at five
screen sizes.
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
from sqlalchemy.orm import sessionmaker

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import session_scope
from app.core.storage import MediaStore
from app.generators.models import ModelVersion
from app.projects.models import Project
from app.projects.schemas import ProjectCreate, ProjectSettings
from app.projects.service import add_member, create_project
from app.users import service as users
from app.votes.models import Vote
from tests.factories import add_arena
from tests.support import embedded_web, launch_chromium

PASSWORD = "vote-page-password-1"
QUESTION = "Which square is closer to the named colour?"
GUIDELINES = "Prefer the **exact hue**.\n\n<script>window.__injected = 1</script>\n\n- ignore size"


@dataclass
class Site:
    base: str
    factory: sessionmaker  # type: ignore[type-arg]
    projects: dict[str, int]
    emails: dict[str, str]
    model_names: list[str]


def _project(
    session: Any,
    store: MediaStore,
    lead: Any,
    name: str,
    n_prompts: int,
    *,
    image_size: int = 64,
    **settings: Any,
) -> int:
    project = create_project(
        session,
        data=ProjectCreate(
            name=name,
            settings=ProjectSettings(
                votes_per_pair=1, votes_per_second=50, change_vote_seconds=120, **settings
            ),
        ),
        creator=lead,
    )
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    add_arena(
        session,
        store,
        project.id,
        [f"a small {c} square on grey" for c in colours[:n_prompts]],
        [f"{name}-hidden-model-{i}" for i in range(2)],
        image_size=image_size,
        seed=7,
    )
    return project.id


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with embedded_web(tmp_path_factory.mktemp("vote-page")) as (base, factory, store):
        with session_scope(factory) as session:
            lead = users.create_user(session, email="lead@vote.test", role="lead")
            projects = {
                "desktop": _project(session, store, lead, "Shapes", 6),
                "phone": _project(session, store, lead, "Phone", 2),
                "layout": _project(
                    session, store, lead, "Layout", 2, image_size=32, guidelines=GUIDELINES,
                    session_target=30,  # the longer counter, with its progress bar
                ),
                "slow": _project(
                    session, store, lead, "Slow", 3, min_view_ms=1500, question=QUESTION,
                    guidelines=GUIDELINES,
                ),
                "swipe": _project(session, store, lead, "Swipe", 4, min_view_ms=1200),
            }
            emails = {}
            for key, project_id in projects.items():
                user = users.create_user(
                    session, email=f"{key}@vote.test", role="annotator", password=PASSWORD
                )
                project = session.get(Project, project_id)
                add_member(session, project=project, user=user, role="annotator")
                emails[key] = user.email
            names = [m.name for m in session.scalars(select(ModelVersion)).all()]
        yield Site(base, factory, projects, emails, names)


def _votes(site: Site, email: str) -> list[Vote]:
    with session_scope(site.factory) as session:
        user = users.get_by_email(session, email)
        assert user is not None
        return list(
            session.scalars(select(Vote).where(Vote.annotator_id == user.id).order_by(Vote.id))
        )


def _login(page: Page, site: Site, key: str) -> None:
    project_id = site.projects[key]
    page.goto(f"{site.base}/login?next=/projects/{project_id}/vote")
    page.fill("#email", site.emails[key])
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(rf".*/projects/{project_id}/vote$"))
    page.wait_for_selector("#vote-area")


def _wait_given(page: Page, n: int) -> None:
    page.wait_for_function(
        "n => document.querySelector('#vote-area .votes-given')?.textContent.trim() === String(n)",
        arg=n,
        timeout=15_000,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_vote_with_mouse_and_every_shortcut_then_change_and_empty(
    site: Site, browser: Any, artifacts: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[tuple[str, str]] = []
    page.on("request", lambda r: requests.append((r.method, r.url)))
    _login(page, site, "desktop")
    email = site.emails["desktop"]
    html = page.content()
    for name in site.model_names:
        assert name not in html
    # Buttons show their shortcut and say what they do; images have alt text.
    for label in ("Left", "Right", "Tie", "Both bad", "Skip"):
        button = page.get_by_role("button", name=re.compile(label, re.I)).first
        assert button.get_attribute("aria-keyshortcuts")
    assert all(img.get_attribute("alt") for img in page.query_selector_all(".pair img"))
    page.screenshot(path=str(artifacts / "vote_page_desktop.png"), full_page=True)
    page.evaluate("window.__sameDocument = true")

    steps = [
        ("mouse", "left"),
        ("ArrowRight", "right"),
        ("ArrowDown", "tie"),
        ("b", "both_bad"),
        ("s", "skip"),
        ("ArrowLeft", "left"),
    ]
    for n, (how, choice) in enumerate(steps, start=1):
        page.wait_for_selector("#vote-area[data-ready=true]")
        pair_id = int(page.get_attribute("#vote-area", "data-pair-id"))
        left_id = page.input_value("input[name=left_image_id]")
        preload = [el.get_attribute("href") for el in page.query_selector_all("link.preload-next")]
        posts_before = sum(1 for m, u in requests if m == "POST")
        seen_before = {u.split(site.base, 1)[-1] for _, u in requests}
        page.wait_for_timeout(150)  # the annotator looks before choosing
        if how == "mouse":
            page.click("button[value=left]")
        else:
            page.keyboard.press(how)
        _wait_given(page, n)
        votes = _votes(site, email)
        assert len(votes) == n
        last = votes[-1]
        assert (last.pair_id, last.choice, last.left_image_id) == (pair_id, choice, left_id)
        assert last.latency_ms is not None and last.latency_ms >= 100
        # One request per vote, and the images that came next had been preloaded.
        assert sum(1 for m, u in requests if m == "POST") == posts_before + 1
        if n < len(steps):
            shown = [img.get_attribute("src") for img in page.query_selector_all(".pair img")]
            assert sorted(shown) == sorted(preload), (shown, preload)
            assert set(shown) <= seen_before
    assert page.evaluate("window.__sameDocument") is True
    # The page itself was loaded once: every vote swapped its answer in.
    page_url = f"{site.base}/projects/{site.projects['desktop']}/vote"
    assert [u for m, u in requests if m == "GET" and u == page_url] == [page_url]

    # Everything voted: the empty state, with the undo control for the last vote.
    empty = page.locator(".empty-state")
    assert "Nothing to do" in empty.inner_text()
    assert page.locator(".pairs-left").inner_text() == "0"
    page.wait_for_selector(".undo")
    page.keyboard.press("u")
    page.wait_for_selector(".change-banner")
    assert "it was: Left" in page.inner_text(".change-banner")
    page.click("button[value=tie]")
    page.wait_for_selector("text=Changed your last vote to: Tie.")
    votes = _votes(site, email)
    assert len(votes) == len(steps) and votes[-1].choice == "tie"
    assert votes[-1].updated_at is not None
    assert "Nothing to do" in page.locator(".empty-state").inner_text()
    page.screenshot(path=str(artifacts / "vote_page_empty.png"), full_page=True)

    page.goto(f"{site.base}/projects/{site.projects['desktop']}/me")
    assert page.inner_text(".votes-total") == str(len(steps))
    assert page.inner_text(".votes-today") == str(len(steps))
    page.close()


@pytest.mark.slow
def test_phone_layout_stacks_the_images(site: Site, browser: Any, artifacts: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = context.new_page()
    _login(page, site, "phone")
    page.wait_for_selector("#vote-area[data-ready=true]")
    left = page.locator(".side-left img").bounding_box()
    right = page.locator(".side-right img").bounding_box()
    assert left and right
    # One above the other, each using most of the width, nothing wider than the screen.
    assert right["y"] >= left["y"] + left["height"] - 1
    assert left["width"] > 200 and left["x"] + left["width"] <= 390
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # Every vote button can be reached without scrolling.
    for value in ("left", "right", "tie", "both_bad", "skip"):
        box = page.locator(f"button[value={value}]").bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= 844, (value, box)
    page.screenshot(path=str(artifacts / "vote_page_phone.png"), full_page=True)
    page.locator("button[value=right]").tap()
    _wait_given(page, 1)
    assert [v.choice for v in _votes(site, site.emails["phone"])] == ["right"]
    context.close()


@pytest.mark.slow
def test_controls_inert_until_min_view_ms_and_during_the_swap(
    site: Site, browser: Any, artifacts: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    _login(page, site, "slow")
    email = site.emails["slow"]
    posts.clear()
    # The project's question and its guidelines (Markdown; raw HTML shown as text, not run).
    assert page.inner_text(".question") == QUESTION
    assert page.inner_text(".guidelines strong") == "exact hue"
    assert "<script>" in page.inner_text(".guidelines-body")
    assert page.evaluate("window.__injected") is None
    assert page.locator(".guidelines").get_attribute("open") is not None  # first visit: open
    page.evaluate("window.__sameDocument = true")

    # Images loaded, but the minimum viewing time has not passed: nothing can vote, not the
    # keyboard, not the mouse, not a native form submission.
    page.wait_for_function("[...document.querySelectorAll('.pair img')].every(i => i.complete)")
    assert page.get_attribute("#vote-area", "data-ready") == "false"
    page.keyboard.press("ArrowLeft")
    assert page.locator("button[value=left]").is_disabled()
    page.evaluate(
        "document.querySelector('form.vote-form').requestSubmit("
        "document.querySelector('button[value=right]'))"
    )
    page.wait_for_timeout(300)
    assert posts == [] and _votes(site, email) == []
    assert page.evaluate("window.__sameDocument") is True

    page.wait_for_selector("#vote-area[data-ready=true]", timeout=5_000)
    page.keyboard.press("ArrowLeft")
    _wait_given(page, 1)
    (first,) = _votes(site, email)
    assert first.choice == "left" and first.latency_ms is not None and first.latency_ms >= 1500
    # A key pressed right after the swap is swallowed, not queued into the next pair.
    page.keyboard.press("ArrowRight")
    page.wait_for_timeout(500)
    assert len(_votes(site, email)) == 1 and len(posts) == 1
    page.wait_for_selector("#vote-area[data-ready=true]", timeout=5_000)
    page.keyboard.press("ArrowRight")
    _wait_given(page, 2)
    assert [v.choice for v in _votes(site, email)] == ["left", "right"]
    assert all(v.latency_ms >= 1500 for v in _votes(site, email))
    assert page.evaluate("window.__sameDocument") is True
    page.screenshot(path=str(artifacts / "vote_page_guidelines.png"), full_page=True)
    page.close()


# (width, height, touch): laptop, small laptop, desktop, phone portrait, phone landscape.
VIEWPORTS = [
    (1366, 768, False),
    (1280, 720, False),
    (1920, 1080, False),
    (390, 844, True),
    (844, 390, True),
]


def _overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"]
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("width", "height", "touch"), VIEWPORTS)
def test_vote_page_fits_the_screen(
    site: Site, browser: Any, artifacts: Path, width: int, height: int, touch: bool
) -> None:
    context = browser.new_context(
        viewport={"width": width, "height": height}, is_mobile=touch, has_touch=touch
    )
    page = context.new_page()
    _login(page, site, "layout")
    page.wait_for_selector("#vote-area[data-ready=true]", timeout=5_000)
    # Guidelines are open on a first visit; once read they fold into one line.
    if page.locator("details.guidelines[open]").count():
        page.click("details.guidelines summary")
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    images = [page.locator(f".side-{side} img").bounding_box() for side in ("left", "right")]
    prompt = page.locator(".prompt").bounding_box()
    assert prompt and prompt["y"] >= 0 and prompt["y"] + prompt["height"] <= height
    for box in images:
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= height + 1, box
        assert box["x"] >= 0 and box["x"] + box["width"] <= width
    for value in ("left", "right", "tie", "both_bad", "skip"):
        button = page.locator(f"button[value={value}]")
        box = button.bounding_box()
        assert box, value
        assert box["y"] >= 0 and box["y"] + box["height"] <= height, (value, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (value, box)
        assert not any(_overlaps(box, img) for img in images if img), (value, box)
        # Touch screens: no keyboard hints, and targets a finger can hit.
        kbd_shown = button.locator("kbd").is_visible()
        assert kbd_shown is not touch, value
        if touch:
            assert box["height"] >= 44, (value, box)
    assert page.locator(".session-progress").is_visible()
    # 32×32 images enlarged without smoothing.
    assert page.locator(".side-left img.pixelated").count() == 1
    rendering = page.eval_on_selector(".side-left img", "i => getComputedStyle(i).imageRendering")
    assert rendering == "pixelated"
    page.screenshot(path=str(artifacts / f"vote_layout_{width}x{height}.png"))
    # A click (tap) on an image opens it full size; Escape closes it; neither votes.
    if touch:
        page.locator(".side-right img").tap()
    else:
        page.click(".side-right img")
    big = page.locator("dialog.fullsize[open] img")
    big.wait_for()
    assert (big.get_attribute("src") or "").endswith(
        page.get_attribute(".side-right img", "src") or "?"
    )
    shown = big.bounding_box()
    assert shown and shown["width"] > images[1]["width"]  # type: ignore[index]
    page.keyboard.press("ArrowLeft")  # ignored while the full view is open
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog.fullsize[open]", state="detached", timeout=2_000)
    assert _votes(site, site.emails["layout"]) == []
    context.close()


def _swipe(cdp: Any, box: dict[str, float], dx: float, dy: float = 0.0) -> None:
    """A one-finger swipe from the middle of `box`, through Chromium's real touch input."""
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 6):
        point = {"x": x + dx * step / 5, "y": y + dy * step / 5}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


@pytest.mark.slow
def test_swipe_left_or_right_votes_on_a_touch_screen(
    site: Site, browser: Any, artifacts: Path
) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    _login(page, site, "swipe")
    email = site.emails["swipe"]
    posts.clear()
    cdp = context.new_cdp_session(page)
    page.evaluate("window.__sameDocument = true")
    # Touch screens are told about swipes instead of keys.
    assert page.locator(".swipe-help").is_visible()
    assert not page.locator(".shortcuts-help").is_visible()
    pair = page.locator(".pair").bounding_box()
    assert pair

    # Before the minimum viewing time (1.2 s) a swipe does nothing, and is not queued.
    page.wait_for_function("[...document.querySelectorAll('.pair img')].every(i => i.complete)")
    assert page.get_attribute("#vote-area", "data-ready") == "false"
    _swipe(cdp, pair, -200)
    page.wait_for_selector("#vote-area[data-ready=true]", timeout=5_000)
    page.wait_for_timeout(300)
    assert posts == [] and _votes(site, email) == []

    # A short move, or a mostly vertical one, is no vote either (a tap, or scrolling).
    _swipe(cdp, pair, -30)
    _swipe(cdp, pair, -90, 200)
    page.wait_for_timeout(300)
    assert posts == [] and _votes(site, email) == []

    first = int(page.get_attribute("#vote-area", "data-pair-id") or 0)
    _swipe(cdp, pair, -200)  # to the left: Left
    _wait_given(page, 1)
    page.wait_for_selector("#vote-area[data-ready=true]", timeout=5_000)
    second = int(page.get_attribute("#vote-area", "data-pair-id") or 0)
    left_id = page.input_value("input[name=left_image_id]")
    _swipe(cdp, pair, 200)  # to the right: Right
    _wait_given(page, 2)
    votes = _votes(site, email)
    assert [(v.pair_id, v.choice) for v in votes] == [(first, "left"), (second, "right")]
    assert votes[1].left_image_id == left_id
    assert all(v.latency_ms is not None and v.latency_ms >= 1200 for v in votes)
    # Each swipe was one htmx request: no native form POST reloaded the page.
    assert len(posts) == 2 and page.evaluate("window.__sameDocument") is True
    assert page.locator(".session-votes").inner_text() == "2"
    # A swipe that starts on an image is not also a tap: the full-size view stayed closed.
    assert page.locator("dialog.fullsize[open]").count() == 0
    page.screenshot(path=str(artifacts / "vote_page_swipe.png"))
    context.close()
