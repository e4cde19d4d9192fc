"""The annotator API's fast lane (app.votes.fast_lane): the plain next/vote requests on asyncpg in
a budget of statements, and every other request handed to the full application untouched.

In-process against a fresh, committed Postgres database (the lane's own connections cannot see
the usual rolled-back test transaction); the full application behind the lane is replaced by a
recorder, so a request that should take the long way is seen to take it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import app.models  # noqa: F401 - every table, for the flush order
from app.core.db import make_engine
from app.core.migrate import upgrade_head
from app.pairs.models import Pair, Reservation
from app.pairs.ordering import _spread, spread_sql
from app.projects.models import Membership, Project
from app.users.models import ApiToken
from app.votes.fast_lane import FastLane
from app.votes.models import Vote
from tests.conftest import create_database, drop_database
from tests.factories import World, build_world, user_factory
from tests.support import bearer

# Statements per request, BEGIN and COMMIT not counted (app.votes.fast_lane's docstring):
# next = who + candidate + reserve; vote = who + vote-and-release.
NEXT_BUDGET = 3
VOTE_BUDGET = 2
LONG_WAY = 299  # the recorder's status: the request went to the full application


class Recorder:
    """Stands in for the full application: answers LONG_WAY with the request it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": LONG_WAY, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def fresh() -> Iterator[tuple[str, sessionmaker[Session]]]:
    name = f"prefloop_lane_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    upgrade_head(sa_url)
    engine = make_engine(sa_url)
    try:
        yield url, sessionmaker(bind=engine, expire_on_commit=False)
    finally:
        engine.dispose()
        drop_database(name)


def _world(factory: sessionmaker[Session], **settings: Any) -> World:
    with factory() as session:
        return build_world(
            session, user_factory(session), n_prompts=4, n_models=3, n_annotators=3, **settings
        )


def _drive(lane: FastLane, calls: Any) -> Any:
    """Run `calls(client)` against the lane on a fresh event loop, then close its pool."""

    async def main() -> Any:
        transport = httpx.ASGITransport(app=lane)
        async with httpx.AsyncClient(transport=transport, base_url="http://lane") as client:
            try:
                return await calls(client)
            finally:
                await lane.close()

    return asyncio.run(main())


def _counting(lane: FastLane) -> list[str]:
    sent: list[str] = []
    lane.on_statement = sent.append
    return sent


def _sql(sent: list[str]) -> int:
    return sum(1 for s in sent if s not in ("BEGIN", "COMMIT"))


def test_plain_cycles_take_the_lane_within_the_budget(fresh: Any) -> None:
    url, factory = fresh
    w = _world(factory, votes_per_second=100, min_view_ms=0)
    recorder = Recorder()
    lane = FastLane(recorder, dsn=url)
    sent = _counting(lane)
    user, token = w.annotators[0]
    per_request: list[tuple[str, int, int]] = []

    async def cycles(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        served = []
        for i in range(5):
            sent.clear()
            nxt = await client.get(
                f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token)
            )
            per_request.append(("next", nxt.status_code, _sql(sent)))
            pair = nxt.json()
            served.append(pair)
            sent.clear()
            again = await client.get(
                f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token)
            )
            # The live reservation: the same pair and side, from the first statement alone.
            assert again.json()["pair_id"] == pair["pair_id"]
            assert again.json()["left"] == pair["left"]
            per_request.append(("held", again.status_code, _sql(sent)))
            sent.clear()
            vote = await client.post(
                f"/api/v1/pairs/{pair['pair_id']}/votes",
                json={
                    "choice": ["left", "right", "tie", "both_bad", "skip"][i],
                    "left_image_id": pair["left"]["image_id"],
                    "latency_ms": 700 + i,
                    "idempotency_key": f"k{i}",
                },
                headers=bearer(token),
            )
            per_request.append(("vote", vote.status_code, _sql(sent)))
            pair["vote_id"] = vote.json()["vote_id"]
        return served

    served = _drive(lane, cycles)
    print("statements per request:", per_request)
    assert recorder.seen == [], "a plain request went the long way"
    budget = {"next": NEXT_BUDGET, "held": 1, "vote": VOTE_BUDGET}
    status = {"next": 200, "held": 200, "vote": 201}
    for kind, code, count in per_request:
        assert code == status[kind], per_request
        assert count <= budget[kind], (kind, count, budget[kind])
    assert len({p["pair_id"] for p in served}) == 5
    with factory() as session:
        votes = {v.id: v for v in session.scalars(select(Vote).where(Vote.annotator_id == user.id))}
        assert sorted(votes) == sorted(p["vote_id"] for p in served)
        for i, p in enumerate(served):
            vote = votes[p["vote_id"]]
            assert (vote.pair_id, vote.left_image_id, vote.latency_ms, vote.idempotency_key) == (
                p["pair_id"],
                p["left"]["image_id"],
                700 + i,
                f"k{i}",
            )
            pair = session.get_one(Pair, p["pair_id"])
            # A skip is stored but takes no slot.
            assert pair.vote_count == (0 if vote.choice == "skip" else 1)
        held = session.scalars(select(Reservation).where(Reservation.annotator_id == user.id))
        assert list(held) == [], "a vote releases its reservation"
        last_used = session.scalar(select(ApiToken.last_used_at).where(ApiToken.user_id == user.id))
        assert last_used is not None


def test_every_other_request_goes_the_long_way_with_its_body(fresh: Any) -> None:
    url, factory = fresh
    w = _world(factory, votes_per_second=100, min_view_ms=400)
    other = _world(factory)
    recorder = Recorder()
    lane = FastLane(recorder, dsn=url)
    (_, token), (second, token2), _ = w.annotators
    outsider = other.annotators[0][1]
    nxt = f"/api/v1/projects/{w.project.id}/pairs/next"

    async def script(client: httpx.AsyncClient) -> dict[str, int]:
        got: dict[str, int] = {}
        pair = (await client.get(nxt, headers=bearer(token))).json()
        votes = f"/api/v1/pairs/{pair['pair_id']}/votes"
        left = pair["left"]["image_id"]
        plain = {"choice": "left", "left_image_id": left, "latency_ms": 900}
        got["anonymous next"] = (await client.get(nxt)).status_code
        got["unknown token"] = (await client.get(nxt, headers=bearer("nope"))).status_code
        got["not a member"] = (await client.get(nxt, headers=bearer(outsider))).status_code
        got["unknown project"] = (
            await client.get("/api/v1/projects/999999/pairs/next", headers=bearer(token))
        ).status_code
        got["id past int4"] = (
            await client.get("/api/v1/projects/99999999999/pairs/next", headers=bearer(token))
        ).status_code
        got["cookie login"] = (
            await client.get(nxt, headers={"Cookie": "prefloop_session=x"})
        ).status_code
        got["too quick"] = (
            await client.post(votes, json={**plain, "latency_ms": 100}, headers=bearer(token))
        ).status_code
        got["not its image"] = (
            await client.post(votes, json={**plain, "left_image_id": "ffff"}, headers=bearer(token))
        ).status_code
        got["unknown choice"] = (
            await client.post(votes, json={**plain, "choice": "maybe"}, headers=bearer(token))
        ).status_code
        got["extra field"] = (
            await client.post(votes, json={**plain, "x": 1}, headers=bearer(token))
        ).status_code
        got["not JSON"] = (
            await client.post(
                votes,
                content=b"choice=left",
                headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"},
            )
        ).status_code
        got["vote of an outsider"] = (
            await client.post(votes, json=plain, headers=bearer(outsider))
        ).status_code
        voted = await client.post(votes, json=plain, headers=bearer(token))
        got["plain vote"] = voted.status_code
        got["identical repeat"] = (
            await client.post(votes, json=plain, headers=bearer(token))
        ).status_code
        got["changed mind"] = (
            await client.post(votes, json={**plain, "choice": "right"}, headers=bearer(token))
        ).status_code
        return got

    got = _drive(lane, script)
    assert got.pop("plain vote") == 201
    assert got == {case: LONG_WAY for case in got}, got
    assert len(recorder.seen) == len(got)
    # The long way gets the body exactly as sent.
    bodies = [body for method, _, body in recorder.seen if method == "POST"]
    assert b"choice=left" in bodies
    assert any(json.loads(b).get("choice") == "maybe" for b in bodies if b.startswith(b"{"))

    # Revocation and deactivation take effect on the very next request (nothing is cached).
    with factory() as session:
        session.execute(
            update(Membership)
            .where(Membership.project_id == w.project.id, Membership.user_id == second.id)
            .values(is_active=False)
        )
        session.execute(
            update(ApiToken)
            .where(ApiToken.user_id == w.annotators[2][0].id)
            .values(revoked_at=dt.datetime.now(dt.UTC))
        )
        session.commit()
    recorder.seen.clear()

    async def after(client: httpx.AsyncClient) -> list[int]:
        return [
            (await client.get(nxt, headers=bearer(token2))).status_code,
            (await client.get(nxt, headers=bearer(w.annotators[2][1]))).status_code,
            (await client.get(nxt, headers=bearer(token))).status_code,
        ]

    assert _drive(lane, after) == [LONG_WAY, LONG_WAY, 200]


def test_a_full_or_archived_project_goes_the_long_way(fresh: Any) -> None:
    url, factory = fresh
    w = _world(factory, votes_per_pair=1, votes_per_second=100, min_view_ms=0)
    recorder = Recorder()
    lane = FastLane(recorder, dsn=url)
    (_, token), (_, token2), _ = w.annotators
    nxt = f"/api/v1/projects/{w.project.id}/pairs/next"

    async def fill(client: httpx.AsyncClient) -> list[int]:
        codes = []
        for _ in range(20):
            response = await client.get(nxt, headers=bearer(token))
            codes.append(response.status_code)
            if response.status_code != 200:
                break
            pair = response.json()
            await client.post(
                f"/api/v1/pairs/{pair['pair_id']}/votes",
                json={"choice": "tie", "left_image_id": pair["left"]["image_id"]},
                headers=bearer(token),
            )
        # k = 1 and every pair voted: nothing plain is left for the second annotator either.
        codes.append((await client.get(nxt, headers=bearer(token2))).status_code)
        return codes

    codes = _drive(lane, fill)
    with factory() as session:
        n_pairs = len(session.scalars(select(Pair.id).where(Pair.project_id == w.project.id)).all())
    assert codes == [200] * n_pairs + [LONG_WAY, LONG_WAY]
    with factory() as session:
        session.execute(
            update(Project)
            .where(Project.id == w.project.id)
            .values(archived_at=dt.datetime.now(dt.UTC))
        )
        session.commit()
    recorder.seen.clear()

    async def archived(client: httpx.AsyncClient) -> int:
        return (await client.get(nxt, headers=bearer(token2))).status_code

    assert _drive(lane, archived) == LONG_WAY


def test_spread_in_sql_equals_the_python_order(fresh: Any) -> None:
    url, factory = fresh
    ids = [(1, 1), (7, 3), (2**31 - 1, 2**31 - 1), (123456, 987), (99, 2**20)]
    with factory() as session:
        for pair_id, annotator_id in ids:
            got = session.scalar(
                text(f"SELECT {spread_sql(':p', ':a')}"), {"p": pair_id, "a": annotator_id}
            )
            assert got == _spread(pair_id, annotator_id)


PAGE_BUDGET = 7  # vote 2 + next 3 + the page's counters 1 + the preload peek 1


def test_a_vote_on_the_page_takes_the_lane_within_the_budget(fresh: Any) -> None:
    from app.users.service import start_session

    url, factory = fresh
    w = _world(factory, votes_per_second=100, min_view_ms=0)
    user = w.annotators[0][0]
    with factory() as session:
        cookie, login = start_session(session, session.get_one(type(user), user.id), days=1)
        csrf = login.csrf_token
        session.commit()
    recorder = Recorder()
    lane = FastLane(recorder, dsn=url)
    sent = _counting(lane)
    api = w.annotators[0][1]
    page = f"/projects/{w.project.id}/vote"
    headers = {"HX-Request": "true", "X-CSRF-Token": csrf, "Cookie": f"prefloop_session={cookie}"}

    async def vote(client: httpx.AsyncClient) -> list[tuple[int, int, str]]:
        got = []
        pair = (
            await client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(api))
        ).json()
        for _ in range(3):
            sent.clear()
            response = await client.post(
                page,
                data={
                    "pair_id": str(pair["pair_id"]),
                    "left_image_id": pair["left"]["image_id"],
                    "choice": "left",
                    "latency_ms": "900",
                    "idempotency_key": uuid.uuid4().hex,
                },
                headers=headers,
            )
            got.append((response.status_code, _sql(sent), response.text))
            html = response.text

            found = re.search(r'name="pair_id" value="(\d+)"', html)
            left = re.search(r'name="left_image_id" value="([0-9a-f]+)"', html)
            assert found and left, html
            pair = {"pair_id": int(found.group(1)), "left": {"image_id": left.group(1)}}
        # Without the CSRF token: the long way (which refuses it).
        forged = await client.post(
            page,
            data={"pair_id": "1", "left_image_id": "a", "choice": "left"},
            headers={**headers, "X-CSRF-Token": "forged"},
        )
        got.append((forged.status_code, 0, ""))
        return got

    got = _drive(lane, vote)
    for status, count, html in got[:3]:
        assert status == 200 and count <= PAGE_BUDGET, (status, count)
        assert "Saved: Left." in html and 'name="pair_id"' in html
        assert html.count('rel="preload"') == 2
    assert got[3][0] == LONG_WAY
    assert len(recorder.seen) == 1
    with factory() as session:
        n = session.scalar(
            select(func.count()).select_from(Vote).where(Vote.annotator_id == user.id)
        )
    assert n == 3


def test_a_lapsed_reservation_is_dropped_and_a_new_pair_served(fresh: Any) -> None:
    url, factory = fresh
    w = _world(factory, votes_per_second=100, min_view_ms=0)
    user, token = w.annotators[0]
    lane = FastLane(Recorder(), dsn=url)
    sent = _counting(lane)
    nxt = f"/api/v1/projects/{w.project.id}/pairs/next"

    async def first(client: httpx.AsyncClient) -> int:
        return int((await client.get(nxt, headers=bearer(token))).json()["pair_id"])

    held = _drive(lane, first)
    with factory() as session:
        session.execute(
            update(Reservation)
            .where(Reservation.annotator_id == user.id)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        )
        session.commit()
    sent.clear()

    async def again(client: httpx.AsyncClient) -> int:
        response = await client.get(nxt, headers=bearer(token))
        assert response.status_code == 200
        return int(response.json()["pair_id"])

    served = _drive(lane, again)
    assert any(sql.startswith("DELETE FROM reservations") for sql in sent)
    with factory() as session:
        rows = session.execute(
            select(Reservation.pair_id, Reservation.expires_at).where(
                Reservation.annotator_id == user.id
            )
        ).all()
    # The lapsed one is gone; the one served now is live (the same pair may come back).
    assert [pair for pair, _ in rows] == [served]
    assert all(expires > dt.datetime.now(dt.UTC) for _, expires in rows)
    assert held > 0
