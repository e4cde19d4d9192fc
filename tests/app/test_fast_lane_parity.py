"""The fast lane answers as the full application does: one scripted annotator session, plain
requests and refusals mixed, against two real servers on two identical fresh databases, one with
the lane (the default) and one with `PREFLOOP_FAST_LANE=0`. Statuses, bodies (image ids and
expiry times aside: random per database) and the stored votes must be the same.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import make_engine
from app.core.migrate import upgrade_head
from app.pairs.models import Pair
from app.projects.service import add_member
from app.votes.models import Vote
from tests.conftest import REDIS_URL, create_database, drop_database
from tests.factories import World, build_world, user_factory
from tests.support import Proc, base_env, bearer, free_port, login, wait_for

# k = 2 so that three annotators finish the pairs; a rate limit no scripted session reaches
# (timing would decide it otherwise), and a viewing time the script's votes respect.
SETTINGS: dict[str, Any] = {"votes_per_pair": 2, "min_view_ms": 500, "votes_per_second": 100}
PAGE_EMAIL = "page-voter@example.com"
PAGE_PASSWORD = "page-password-1"


class Side:
    def __init__(self, tmp: Path, fast: bool) -> None:
        self.name = f"prefloop_parity_{uuid.uuid4().hex[:8]}"
        url = create_database(self.name)
        sa_url = url.replace("postgresql://", "postgresql+psycopg://")
        upgrade_head(sa_url)
        self.engine = make_engine(sa_url)
        self.factory = sessionmaker(bind=self.engine, expire_on_commit=False)
        with self.factory() as session:
            self.world, self.page_project = _world(session)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = base_env(
            PREFLOOP_DATABASE_URL=url,
            PREFLOOP_BROKER_URL=REDIS_URL,
            PREFLOOP_BROKER_KEY_PREFIX=f"{self.name}:",
            PREFLOOP_SECRET_KEY="parity-secret-" + uuid.uuid4().hex,
            PREFLOOP_DATA_DIR=str(tmp / self.name),
            PREFLOOP_LOG_LEVEL="WARNING",
            PREFLOOP_FAST_LANE="1" if fast else "0",
        )
        args = ["serve", "--no-worker", "--web-workers", "1", "--port", str(port)]
        self.proc = Proc(args, env, tmp / f"{self.name}.log")

    def close(self) -> None:
        self.proc.stop()
        self.engine.dispose()
        drop_database(self.name)


def _world(session: Session) -> tuple[World, int]:
    make = user_factory(session)
    world = build_world(session, make, n_prompts=3, n_models=3, n_annotators=3, **SETTINGS)
    # A member of another project only.
    other = build_world(session, make, n_prompts=1, n_models=2, n_annotators=1)
    world.annotators.append(other.annotators[0])
    # A project of its own for the vote page, with one annotator who has a password.
    page = build_world(
        session, make, n_prompts=3, n_models=3, n_annotators=0, change_vote_seconds=600, **SETTINGS
    )
    page_user, _ = make("annotator", email=PAGE_EMAIL, password=PAGE_PASSWORD)
    add_member(session, project=page.project, user=page_user, role="annotator")
    session.commit()
    return world, page.project.id


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    tmp = tmp_path_factory.mktemp("parity")
    fast, slow = Side(tmp, fast=True), Side(tmp, fast=False)
    try:
        for side in (fast, slow):
            wait_for(
                lambda s=side: httpx.get(f"{s.base}/login", timeout=2).status_code == 200,
                90,
                what="the web server",
            )
        yield fast, slow
    finally:
        fast.close()
        slow.close()


def _shown(response: httpx.Response) -> tuple[int, Any]:
    """Status and body, without what differs between two databases by chance."""
    if not response.content:
        return response.status_code, None
    body = response.json()
    if isinstance(body, dict) and "left" in body:
        body = {k: v for k, v in body.items() if k not in ("left", "right", "expires_at")}
    return response.status_code, body


def _session(side: Side) -> list[tuple[str, int, Any]]:
    w = side.world
    (_, a1), (_, a2), (_, a3), (_, outsider) = w.annotators
    pid = w.project.id
    log: list[tuple[str, int, Any]] = []
    with httpx.Client(base_url=side.base, timeout=30) as client:

        def note(label: str, response: httpx.Response) -> httpx.Response:
            log.append((label, *_shown(response)))
            return response

        nxt = f"/api/v1/projects/{pid}/pairs/next"
        pair = note("next", client.get(nxt, headers=bearer(a1))).json()
        note("next again", client.get(nxt, headers=bearer(a1)))
        votes = f"/api/v1/pairs/{pair['pair_id']}/votes"
        with side.factory() as session:
            another, another_image = session.execute(
                select(Pair.id, Pair.image_a_id)
                .where(Pair.id != pair["pair_id"])
                .order_by(Pair.id)
                .limit(1)
            ).one()
        body = {"choice": "left", "left_image_id": pair["left"]["image_id"], "latency_ms": 900}
        note(
            "foreign image",
            client.post(votes, json={**body, "left_image_id": "ffff"}, headers=bearer(a1)),
        )
        note("too quick", client.post(votes, json={**body, "latency_ms": 100}, headers=bearer(a1)))
        note("bad choice", client.post(votes, json={**body, "choice": "x"}, headers=bearer(a1)))
        note("outsider votes", client.post(votes, json=body, headers=bearer(outsider)))
        note("outsider asks", client.get(nxt, headers=bearer(outsider)))
        note("unknown token", client.get(nxt, headers=bearer("nope")))
        note("unknown project", client.get("/api/v1/projects/99999/pairs/next", headers=bearer(a1)))
        note(
            "unknown pair", client.post("/api/v1/pairs/99999/votes", json=body, headers=bearer(a1))
        )
        note("vote", client.post(votes, json={**body, "idempotency_key": "k1"}, headers=bearer(a1)))
        note(
            "replay", client.post(votes, json={**body, "idempotency_key": "k1"}, headers=bearer(a1))
        )
        note(
            "changed mind", client.post(votes, json={**body, "choice": "right"}, headers=bearer(a1))
        )
        note(
            "key reused",
            client.post(
                f"/api/v1/pairs/{another}/votes",
                json={**body, "left_image_id": another_image, "idempotency_key": "k1"},
                headers=bearer(a1),
            ),
        )
        # Then three annotators take turns until nothing is left (k = 2).
        choices = ["left", "right", "tie", "both_bad", "skip"]
        for turn in range(60):
            token = (a1, a2, a3)[turn % 3]
            got = note(f"turn {turn}", client.get(nxt, headers=bearer(token)))
            if got.status_code != 200:
                continue
            served = got.json()
            note(
                f"turn {turn} vote",
                client.post(
                    f"/api/v1/pairs/{served['pair_id']}/votes",
                    json={
                        "choice": choices[turn % 5],
                        "left_image_id": served["right"]["image_id"],
                        "latency_ms": 800,
                    },
                    headers=bearer(token),
                ),
            )
    return log


def _stored(side: Side) -> list[tuple[int, int, str]]:
    with side.factory() as session:
        names = {u.id: i for i, (u, _) in enumerate(side.world.annotators)}
        rows = session.execute(
            select(Vote.pair_id, Vote.annotator_id, Vote.choice).order_by(Vote.id)
        ).all()
        counts = session.execute(select(Pair.id, Pair.vote_count).order_by(Pair.id)).all()
    return [(p, names.get(a, -a), c) for p, a, c in rows] + [(p, n, "count") for p, n in counts]


@pytest.mark.slow
def test_the_lane_answers_as_the_full_application(sides: tuple[Side, Side]) -> None:
    fast, slow = sides
    fast_log, slow_log = _session(fast), _session(slow)
    assert [entry[:2] for entry in fast_log] == [entry[:2] for entry in slow_log]
    assert fast_log == slow_log
    statuses = {status for _, status, _ in fast_log}
    # The script reached every kind of answer: served, stored, replayed, refused, done.
    assert {200, 201, 204, 401, 403, 404, 409, 422} <= statuses, statuses
    assert _stored(fast) == _stored(slow)
    assert _lane_count(fast, "vote") > 10 and _lane_count(fast, "next") > 10
    assert _lane_count(slow, "vote") == 0


# What differs between two databases by chance: image ids and content hashes, idempotency keys
# and CSRF tokens (random), expiry times and signatures of image URLs, and the seconds left to
# change a vote (a second may tick between the two runs).
_RANDOM = [
    (re.compile(r"[0-9a-f]{32,64}"), "HEX"),
    (re.compile(r"([?&](?:amp;)?e=)\d+"), r"\1E"),
    (re.compile(r'(name="csrf_token" value=")[^"]*'), r"\1CSRF"),
    (re.compile(r'(data-expires-in=")\d+'), r"\1S"),
]


def _page_shown(response: httpx.Response) -> tuple[int, str]:
    text = response.text
    for pattern, replacement in _RANDOM:
        text = pattern.sub(replacement, text)
    return response.status_code, text


def _page_session(side: Side) -> list[tuple[str, int, str]]:
    pid = side.page_project
    log: list[tuple[str, int, str]] = []
    with httpx.Client(base_url=side.base, timeout=30) as client:
        csrf = login(client, PAGE_EMAIL, PAGE_PASSWORD)
        htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
        html = client.get(f"/projects/{pid}/vote", headers=htmx).text
        choices = ["left", "right", "tie", "both_bad", "skip"]
        for turn in range(12):
            pair_id = re.search(r'name="pair_id" value="(\d+)"', html)
            left = re.search(r'name="left_image_id" value="([0-9a-f]+)"', html)
            key = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', html)
            if not (pair_id and left and key):
                break
            form = {
                "pair_id": pair_id.group(1),
                "left_image_id": left.group(1),
                "choice": choices[turn % 5],
                "latency_ms": "900",
                "idempotency_key": key.group(1),
            }
            if turn == 2:  # refused: looked too briefly (422, the same pair again)
                quick = client.post(
                    f"/projects/{pid}/vote", data={**form, "latency_ms": "10"}, headers=htmx
                )
                log.append(("too quick", *_page_shown(quick)))
            if turn == 4:  # refused: a wrong CSRF token (403)
                forged = client.post(
                    f"/projects/{pid}/vote", data=form, headers={**htmx, "X-CSRF-Token": "x"}
                )
                log.append(("forged", *_page_shown(forged)))
            response = client.post(f"/projects/{pid}/vote", data=form, headers=htmx)
            log.append((f"turn {turn}", *_page_shown(response)))
            if turn == 6:  # the same form again: a replay, answered as saved
                again = client.post(f"/projects/{pid}/vote", data=form, headers=htmx)
                log.append(("replay", *_page_shown(again)))
            html = response.text
    return log


@pytest.mark.slow
def test_the_lane_renders_the_vote_page_as_the_full_application(
    sides: tuple[Side, Side],
) -> None:
    fast, slow = sides
    fast_log, slow_log = _page_session(fast), _page_session(slow)
    assert [entry[:2] for entry in fast_log] == [entry[:2] for entry in slow_log]
    for (label, _, fast_html), (_, _, slow_html) in zip(fast_log, slow_log, strict=True):
        assert fast_html == slow_html, label
    statuses = {status for _, status, _ in fast_log}
    assert {200, 403, 422} <= statuses, statuses
    assert any("Saved:" in html for _, _, html in fast_log)
    assert _stored(fast) == _stored(slow)
    # The plain votes took the lane (one web process: its counters are the server's).
    saved = sum(1 for label, status, _ in fast_log if label.startswith("turn") and status == 200)
    assert _lane_count(fast, "page") >= saved - 1 > 0
    assert _lane_count(slow, "page") == 0


def _lane_count(side: Side, request: str) -> float:
    text = httpx.get(f"{side.base}/metrics", timeout=10).text
    found = re.search(
        rf'prefloop_fast_lane_requests_total{{request="{request}",way="lane"}} ([0-9.e+]+)', text
    )
    return float(found.group(1)) if found else 0.0
