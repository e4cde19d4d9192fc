"""Concurrent annotators against a real server (2 uvicorn workers) on a fresh Postgres database.

Many annotators fetching and voting at once must never push a pair past k votes, never get a
pair twice, and never lose an acknowledged vote; the same vote sent several times at once is
stored once and answered identically.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import make_engine, session_scope
from app.core.migrate import upgrade_head
from app.core.storage import MediaStore
from app.pairs.models import Pair
from app.projects.schemas import ProjectCreate, ProjectSettings
from app.projects.service import add_member, create_project
from app.users import service as users
from app.votes.models import Vote
from tests.conftest import REDIS_URL, create_database, drop_database
from tests.factories import add_arena
from tests.support import Proc, base_env, bearer, free_port, wait_for

K = 3
N_ANNOTATORS = 20


@dataclass
class Stack:
    base: str
    factory: sessionmaker  # type: ignore[type-arg]
    project_id: int
    tokens: list[str]
    annotator_ids: list[int]


def populate(
    factory: sessionmaker, media: Path, *, n_prompts: int, n_models: int
) -> dict[str, Any]:  # type: ignore[type-arg]
    store = MediaStore(media)
    with session_scope(factory) as session:
        lead = users.create_user(session, email="lead@example.com", role="lead")
        project = create_project(
            session,
            data=ProjectCreate(
                name="concurrency",
                settings=ProjectSettings(votes_per_pair=K, votes_per_second=100),
            ),
            creator=lead,
        )
        add_arena(
            session,
            store,
            project.id,
            [f"prompt {i}" for i in range(n_prompts)],
            [f"m{i}" for i in range(n_models)],
        )
        tokens, ids = [], []
        for i in range(N_ANNOTATORS):
            user = users.create_user(session, email=f"a{i}@example.com", role="annotator")
            add_member(session, project=project, user=user, role="annotator")
            tokens.append(users.issue_token(session, user))
            ids.append(user.id)
        return {"project_id": project.id, "tokens": tokens, "annotator_ids": ids}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("vote-concurrency")
    name = f"prefloop_votes_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    upgrade_head(sa_url)
    engine = make_engine(sa_url)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    data = populate(factory, tmp / "media", n_prompts=6, n_models=3)
    env = base_env(
        PREFLOOP_DATABASE_URL=url,
        PREFLOOP_BROKER_URL=REDIS_URL,
        PREFLOOP_BROKER_KEY_PREFIX=f"prefloop-votes-{uuid.uuid4().hex[:8]}:",
        PREFLOOP_SECRET_KEY="votes-secret-" + uuid.uuid4().hex,
        PREFLOOP_DATA_DIR=str(tmp / "data"),
        PREFLOOP_MEDIA_DIR=str(tmp / "media"),
        PREFLOOP_LOG_LEVEL="WARNING",
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Proc(
        ["serve", "--no-worker", "--web-workers", "2", "--port", str(port)],
        env,
        tmp / "serve.log",
    )
    try:
        wait_for(
            lambda: httpx.get(f"{base}/login", timeout=2).status_code == 200,
            90,
            what="the web server",
        )
        yield Stack(base, factory, data["project_id"], data["tokens"], data["annotator_ids"])
    finally:
        serve.stop()
        engine.dispose()
        drop_database(name)


def _annotate(stack: Stack, token: str, start: threading.Barrier, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    acked: list[int] = []
    errors: list[str] = []
    seen: list[int] = []
    with httpx.Client(base_url=stack.base, headers=bearer(token), timeout=30) as client:
        start.wait()
        for _ in range(100):
            nxt = client.get(f"/api/v1/projects/{stack.project_id}/pairs/next")
            if nxt.status_code == 204:
                break
            if nxt.status_code == 503:  # every open pair locked at that instant: ask again
                time.sleep(float(nxt.headers["retry-after"]) / 10)
                continue
            if nxt.status_code != 200:
                errors.append(f"next {nxt.status_code} {nxt.text}")
                break
            pair = nxt.json()
            seen.append(pair["pair_id"])
            body = {
                "choice": rng.choice(["left", "right", "tie", "both_bad"]),
                "left_image_id": pair["left"]["image_id"],
                "latency_ms": rng.randrange(500, 3000),
                "idempotency_key": uuid.uuid4().hex,
            }
            vote = client.post(f"/api/v1/pairs/{pair['pair_id']}/votes", json=body)
            if vote.status_code in (200, 201):
                acked.append(vote.json()["vote_id"])
            else:
                errors.append(f"vote {vote.status_code} {vote.text}")
    return {"acked": acked, "errors": errors, "seen": seen}


@pytest.mark.slow
def test_twenty_annotators_at_once_never_exceed_k(stack: Stack) -> None:
    start = threading.Barrier(N_ANNOTATORS)
    with ThreadPoolExecutor(N_ANNOTATORS) as pool:
        results = list(
            pool.map(lambda i: _annotate(stack, stack.tokens[i], start, i), range(N_ANNOTATORS))
        )
    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    for r in results:
        assert len(r["seen"]) == len(set(r["seen"])), "a pair was served twice to one annotator"
    acked = [v for r in results for v in r["acked"]]
    with session_scope(stack.factory) as session:
        rows = session.execute(
            select(Vote.id, Vote.pair_id, Vote.annotator_id).where(
                Vote.project_id == stack.project_id
            )
        ).all()
        pairs = session.execute(
            select(Pair.id, Pair.vote_count).where(Pair.project_id == stack.project_id)
        ).all()
        live = session.scalar(select(func.count()).select_from(Vote))
    # No acknowledged vote lost, no vote stored that was not acknowledged.
    assert sorted(acked) == sorted(r.id for r in rows) and live == len(rows)
    per_pair = Counter(r.pair_id for r in rows)
    assert len({(r.pair_id, r.annotator_id) for r in rows}) == len(rows)
    # Every pair got exactly k votes: never more, and no annotator was sent away early.
    assert {pid: per_pair[pid] for pid, _ in pairs} == {pid: K for pid, _ in pairs}
    assert all(count == K for _, count in pairs)


@pytest.mark.slow
def test_same_vote_sent_five_times_at_once_is_stored_once(stack: Stack) -> None:
    token = stack.tokens[0]
    with session_scope(stack.factory) as session:
        pair = session.scalar(
            select(Pair).where(Pair.project_id == stack.project_id).order_by(Pair.id).limit(1)
        )
        assert pair is not None
        # A fresh pair nobody voted on (the other test may have filled the first ones).
        new_pair = Pair(
            project_id=stack.project_id,
            prompt_id=pair.prompt_id,
            image_a_id=pair.image_b_id,
            image_b_id=pair.image_a_id,
            purpose="eval",
            votes_wanted=K,
            vote_count=0,
        )
        session.add(new_pair)
        session.flush()
        pair_id, left = new_pair.id, new_pair.image_a_id
    body = {"choice": "left", "left_image_id": left, "idempotency_key": "five-" + uuid.uuid4().hex}
    start = threading.Barrier(5)

    def send(_: int) -> tuple[int, Any]:
        with httpx.Client(base_url=stack.base, headers=bearer(token), timeout=30) as client:
            start.wait()
            r = client.post(f"/api/v1/pairs/{pair_id}/votes", json=body)
            return r.status_code, r.json()

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(send, range(5)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200, 200, 200, 200, 201], answers
    assert len({str(b) for _, b in answers}) == 1
    with session_scope(stack.factory) as session:
        rows = session.scalars(select(Vote).where(Vote.pair_id == pair_id)).all()
        assert len(rows) == 1 and rows[0].id == answers[0][1]["vote_id"]
        assert session.get(Pair, pair_id).vote_count == 1
