"""Quality control in the product, end to end: a fresh `prefloop serve --demo` (gold rate 0.1)
makes gold pairs after its generate job; an annotator in headless Chromium answers pairs, gold
ones among them (served blind, like every other pair); the periodic rating refresh fits the
leaderboard, and the lead's dashboard then shows that annotator's gold accuracy as a number.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import make_engine, session_scope
from app.jobs.models import Job
from app.pairs.models import Pair
from app.pairs.service import gold_wanted
from app.projects.models import Project
from app.projects.service import project_settings
from app.users import service as users
from app.votes.models import Vote
from tests.support import FAST_JOBS, Proc, base_env, free_port, launch_chromium, wait_for

# Every gold answer after the first is given wrong, so the accuracy shown is not trivially 100 %.
GOLD_WANTED = 2
MAX_VOTES = 96  # the demo's regular pairs: 24 train prompts × 4


def _login(page: Page, base: str, email: str, password: str, path: str) -> None:
    page.goto(f"{base}/login?next={path}")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(rf".*{re.escape(path)}$"))


@pytest.mark.slow
def test_demo_gold_pairs_reach_the_lead_dashboard_as_gold_accuracy(
    tmp_path: Path, artifacts: Path
) -> None:
    data = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = base_env(
        PREFLOOP_LOG_LEVEL="WARNING",
        **{**FAST_JOBS, "PREFLOOP_REAPER_INTERVAL_SECONDS": "2"},
        # Refit as soon as votes change (the default waits a minute between fits).
        PREFLOOP_RATINGS_REFRESH_SECONDS="0",
    )
    serve = Proc(["serve", "--demo", "--data-dir", str(data), "--port", str(port)], env,
                 tmp_path / "serve.log")  # fmt: skip
    engine = None
    try:
        admin = wait_for(
            lambda: re.search(r"admin login (\S+) / password (\S+)", serve.output()),
            120,
            what="the first-run admin login",
        )
        annotator = wait_for(
            lambda: re.search(r"annotator login (\S+) / password (\S+)", serve.output()),
            120,
            what="the demo annotator login",
        )
        vote_path = re.search(r"vote at \S+?(/projects/(\d+)/vote)", serve.output())
        assert vote_path, serve.output()
        project_id = int(vote_path.group(2))
        engine = make_engine(f"sqlite:///{data / 'prefloop.db'}")
        factory = sessionmaker(bind=engine, expire_on_commit=False)

        def generated() -> str | None:
            with session_scope(factory) as session:
                status = session.scalar(
                    select(Job.status).where(Job.project_id == project_id, Job.kind == "generate")
                )
            assert status not in ("failed", "cancelled"), serve.output()
            return status if status == "succeeded" else None

        wait_for(generated, 300, interval=1, what="the demo's generate job")
        with session_scope(factory) as session:
            project = session.get(Project, project_id)
            assert project is not None and project_settings(project).gold_rate == 0.1
            counts = dict(
                session.execute(
                    select(Pair.is_gold, func.count())
                    .where(Pair.project_id == project_id)
                    .group_by(Pair.is_gold)
                ).all()
            )
            gold = {
                p.id: p.gold_expected
                for p in session.scalars(
                    select(Pair).where(Pair.project_id == project_id, Pair.is_gold)
                )
            }
            user = users.get_by_email(session, annotator.group(1))
            assert user is not None
            annotator_id = user.id
        # The generate job made gold pairs at the demo's rate, without anyone asking.
        assert counts[True] == gold_wanted(0.1, counts[False]) == len(gold) > 0

        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(20_000)
            _login(page, base, annotator.group(1), annotator.group(2), vote_path.group(1))
            rng = random.Random(16)
            answered_gold: list[bool] = []
            voted = 0
            while len(answered_gold) < GOLD_WANTED and voted < MAX_VOTES:
                if page.locator(".empty-state").count():
                    break
                page.wait_for_selector("#vote-area[data-ready=true]")
                pair_id = int(page.get_attribute("#vote-area", "data-pair-id") or 0)
                left = page.input_value("input[name=left_image_id]")
                if pair_id in gold:
                    right_answer = "left" if gold[pair_id] == left else "right"
                    wrong = "right" if right_answer == "left" else "left"
                    choice = right_answer if not answered_gold else wrong
                    answered_gold.append(choice == right_answer)
                else:
                    choice = rng.choice(["left", "right"])
                if voted % 2:
                    page.click(f"button[value={choice}]")
                else:
                    page.keyboard.press("ArrowLeft" if choice == "left" else "ArrowRight")
                voted += 1
                page.wait_for_function(
                    "n => document.querySelector('#vote-area .votes-given')?.textContent.trim()"
                    " === String(n)",
                    arg=voted,
                )
            assert answered_gold, f"no gold pair among {voted} served pairs"
            with session_scope(factory) as session:
                gold_votes = session.scalars(
                    select(Vote).where(
                        Vote.annotator_id == annotator_id, Vote.pair_id.in_(list(gold))
                    )
                ).all()
            assert len(gold_votes) == len(answered_gold)
            expected = f"{100 * sum(answered_gold) / len(answered_gold):.0f} % ({len(gold_votes)})"

            # The lead (here the admin) sees the annotator's gold accuracy on the dashboard once
            # the periodic refresh has refitted the ratings.
            lead = browser.new_page(viewport={"width": 1366, "height": 900})
            lead.set_default_timeout(20_000)
            dashboard = f"/projects/{project_id}"
            _login(lead, base, admin.group(1), admin.group(2), dashboard)
            cell = f'#dash-quality tr[data-annotator="{annotator_id}"] td:nth-child(4)'

            def shown() -> str | None:
                lead.reload()
                lead.wait_for_selector("#dash-quality")
                if not lead.locator(cell).count():
                    return None
                text = " ".join(lead.inner_text(cell).split())
                return text if text == expected else None

            wait_for(shown, 180, interval=3, what=f"gold accuracy {expected} on the dashboard")
            assert re.fullmatch(r"\d+ % \(\d+\)", expected)
            lead.screenshot(path=str(artifacts / "dashboard_gold_accuracy.png"), full_page=True)
            browser.close()
    finally:
        serve.stop()
        if engine is not None:
            engine.dispose()
