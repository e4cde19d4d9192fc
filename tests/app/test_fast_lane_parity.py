"""The fast lane answers as the full application does: one scripted annotator session, plain
requests and refusals mixed, against two real servers on two identical fresh databases, one with
the lane (the default) and one with `PREFLOOP_FAST_LANE=0`. Statuses, bodies (image ids and
expiry times aside: random per database) and the stored votes must be the same.
"""

from __future__ import annotations

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
from app.votes.models import Vote
from tests.conftest import REDIS_URL, create_database, drop_database
from tests.factories import World, build_world, user_factory
from tests.support import Proc, base_env, bearer, free_port, wait_for


class Side:
    def __init__(self, tmp: Path, fast: bool) -> None:
        self.name = f"prefloop_parity_{uuid.uuid4().hex[:8]}"
        url = create_database(self.name)
        sa_url = url.replace("postgresql://", "postgresql+psycopg://")
        upgrade_head(sa_url)
        self.engine = make_engine(sa_url)
        self.factory = sessionmaker(bind=self.engine, expire_on_commit=False)
        with self.factory() as session:
            self.world = _world(session)
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


def _world(session: Session) -> World:
    make = user_factory(session)
    world = build_world(
        session,
        make,
        n_prompts=3,
        n_models=3,
        n_annotators=3,
        votes_per_pair=2,
        min_view_ms=500,
        votes_per_second=100,
    )
    # A member of another project only.
    other = build_world(session, make, n_prompts=1, n_models=2, n_annotators=1)
    world.annotators.append(other.annotators[0])
    return world


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
    return [(p, names[a], c) for p, a, c in rows] + [(p, n, "count") for p, n in counts]


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
