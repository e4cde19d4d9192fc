"""The vote API and the vote service: status codes, replays, slots, rate limit, changes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import func, select

from app.core.db import utcnow
from app.core.health import VOTES
from app.core.storage import get_media_store
from app.pairs import service as pairs
from app.pairs.models import Pair, Reservation
from app.projects.service import add_member
from app.votes import service
from app.votes.models import Vote
from tests.factories import build_world
from tests.support import bearer, login


def serve(client: Any, project_id: int, token: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/projects/{project_id}/pairs/next", headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def vote(client: Any, pair_id: int, token: str, **body: Any) -> Any:
    return client.post(f"/api/v1/pairs/{pair_id}/votes", json=body, headers=bearer(token))


def count_votes(db: Any, **where: Any) -> int:
    stmt = select(func.count()).select_from(Vote)
    for key, value in where.items():
        stmt = stmt.where(getattr(Vote, key) == value)
    return int(db.scalar(stmt))


def test_vote_created_stores_the_shown_side_and_frees_the_reservation(
    client, db, make_user
) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user)
    user, token = w.annotators[0]
    served = serve(client, w.project.id, token)
    before = VOTES.labels("right")._value.get()
    response = vote(
        client,
        served["pair_id"],
        token,
        choice="right",
        left_image_id=served["left"]["image_id"],
        latency_ms=1234,
        idempotency_key="k-1",
    )
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"vote_id"}
    row = db.get(Vote, response.json()["vote_id"])
    assert (row.choice, row.left_image_id, row.latency_ms, row.annotator_id) == (
        "right",
        served["left"]["image_id"],
        1234,
        user.id,
    )
    assert db.get(Pair, served["pair_id"]).vote_count == 1
    assert db.get(Reservation, (served["pair_id"], user.id)) is None
    assert VOTES.labels("right")._value.get() == before + 1


def test_replays_answer_200_with_the_same_vote(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2, votes_per_second=100)
    _, token = w.annotators[0]
    served = serve(client, w.project.id, token)
    pid, left = served["pair_id"], served["left"]["image_id"]
    first = vote(client, pid, token, choice="left", left_image_id=left, idempotency_key="abc")
    assert first.status_code == 201
    replay = vote(client, pid, token, choice="left", left_image_id=left, idempotency_key="abc")
    assert replay.status_code == 200 and replay.json() == first.json()
    # An identical repeat without a key is a replay too.
    bare = vote(client, pid, token, choice="left", left_image_id=left)
    assert bare.status_code == 200 and bare.json() == first.json()
    assert count_votes(db, pair_id=pid) == 1
    assert db.get(Pair, pid).vote_count == 1
    # Voting otherwise on the same pair is a conflict, with or without a new key.
    for extra in ({}, {"idempotency_key": "other"}):
        clash = vote(client, pid, token, choice="right", left_image_id=left, **extra)
        assert clash.status_code == 409 and "already voted" in clash.json()["detail"]
    # The key reused for another pair is a conflict.
    other = serve(client, w.project.id, token)
    reused = vote(
        client,
        other["pair_id"],
        token,
        choice="left",
        left_image_id=other["left"]["image_id"],
        idempotency_key="abc",
    )
    assert reused.status_code == 409 and "idempotency key" in reused.json()["detail"]
    assert count_votes(db, project_id=w.project.id) == 1


def test_refusals_404_403_422_401(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user)
    _, token = w.annotators[0]
    _, stranger = make_user("annotator")
    served = serve(client, w.project.id, token)
    pid, left = served["pair_id"], served["left"]["image_id"]
    assert vote(client, 999999, token, choice="left", left_image_id=left).status_code == 404
    assert vote(client, pid, stranger, choice="left", left_image_id=left).status_code == 403
    bad_choice = vote(client, pid, token, choice="maybe", left_image_id=left)
    assert bad_choice.status_code == 422 and "choice" in str(bad_choice.json()["detail"])
    alien = w.add_image(db, 0, 0, 99)
    db.commit()
    bad_left = vote(client, pid, token, choice="left", left_image_id=alien.id)
    assert bad_left.status_code == 422 and "left_image_id" in bad_left.json()["detail"]
    missing = vote(client, pid, token, choice="left")
    assert missing.status_code == 422 and "left_image_id" in str(missing.json()["detail"])
    negative = vote(client, pid, token, choice="left", left_image_id=left, latency_ms=-5)
    assert negative.status_code == 422 and "latency_ms" in str(negative.json()["detail"])
    assert client.post(f"/api/v1/pairs/{pid}/votes", json={}).status_code == 401
    assert count_votes(db, project_id=w.project.id) == 0


def test_service_rejects_bad_choice_directly(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user)
    user, _ = w.annotators[0]
    served = pairs.next_pair(db, project=w.project, annotator=user)
    assert served is not None
    with pytest.raises(service.InvalidVote, match="choice must be one of"):
        service.record_vote(
            db,
            pair_id=served.pair_id,
            annotator=user,
            choice="LEFT",
            left_image_id=served.left_image_id,
            latency_ms=None,
            idempotency_key=None,
        )


def test_skip_is_stored_but_takes_no_slot(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, votes_per_pair=1)
    (u1, t1), (u2, t2) = w.annotators
    served = serve(client, w.project.id, t1)
    skip = vote(
        client, served["pair_id"], t1, choice="skip", left_image_id=served["left"]["image_id"]
    )
    assert skip.status_code == 201
    pair = db.get(Pair, served["pair_id"])
    assert pair.vote_count == 0
    # u1 never sees it again; u2 gets it (the skip left the slot free).
    assert (
        client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(t1)).status_code
        == 204
    )
    assert serve(client, w.project.id, t2)["pair_id"] == pair.id


def test_full_pair_refuses_votes_without_a_reservation(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, votes_per_pair=1, n_annotators=3)
    (_, t1), (_, t2), (u3, t3) = w.annotators
    served = serve(client, w.project.id, t1)
    pid, left = served["pair_id"], served["left"]["image_id"]
    # u2 never asked for the pair, and u1 holds its only slot.
    blocked = vote(client, pid, t2, choice="left", left_image_id=left)
    assert blocked.status_code == 409 and "votes it needs" in blocked.json()["detail"]
    assert vote(client, pid, t1, choice="left", left_image_id=left).status_code == 201
    assert vote(client, pid, t3, choice="tie", left_image_id=left).status_code == 409
    # A skip takes no slot, so it is accepted even on a full pair.
    assert vote(client, pid, t3, choice="skip", left_image_id=left).status_code == 201
    assert db.get(Pair, pid).vote_count == 1


def test_vote_without_asking_uses_a_free_slot(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, votes_per_pair=2)
    _, token = w.annotators[0]
    pair = db.scalar(select(Pair).where(Pair.project_id == w.project.id))
    response = vote(client, pair.id, token, choice="both_bad", left_image_id=pair.image_b_id)
    assert response.status_code == 201
    assert db.get(Pair, pair.id).vote_count == 1


def test_rate_limit_429_with_retry_after(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    # 0.2 votes per second: one vote per 5 s window, so the test does not race the clock.
    w = build_world(db, make_user, n_prompts=2, votes_per_second=0.2)
    user, token = w.annotators[0]
    first = serve(client, w.project.id, token)
    ok = vote(
        client, first["pair_id"], token, choice="left", left_image_id=first["left"]["image_id"]
    )
    assert ok.status_code == 201
    second = serve(client, w.project.id, token)
    limited = vote(
        client, second["pair_id"], token, choice="left", left_image_id=second["left"]["image_id"]
    )
    assert limited.status_code == 429
    assert "too many votes" in limited.json()["detail"]
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    # A replay of the acknowledged vote is not limited.
    replay = vote(
        client, first["pair_id"], token, choice="left", left_image_id=first["left"]["image_id"]
    )
    assert replay.status_code == 200
    # Once the window has passed, the vote goes through (service clock moved on).
    later = utcnow() + dt.timedelta(seconds=6)
    row, created = service.record_vote(
        db,
        pair_id=second["pair_id"],
        annotator=user,
        choice="left",
        left_image_id=second["left"]["image_id"],
        latency_ms=None,
        idempotency_key=None,
        now=later,
    )
    assert created and row.pair_id == second["pair_id"]


def test_rate_limit_per_second(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=4, votes_per_second=2)
    user, _ = w.annotators[0]
    t0 = utcnow()
    pair_ids = [p for p in db.scalars(select(Pair.id).where(Pair.project_id == w.project.id))]
    image = {
        p.id: p.image_a_id for p in db.scalars(select(Pair).where(Pair.project_id == w.project.id))
    }

    def cast(pid: int, at: dt.datetime) -> Any:
        return service.record_vote(
            db,
            pair_id=pid,
            annotator=user,
            choice="tie",
            left_image_id=image[pid],
            latency_ms=None,
            idempotency_key=None,
            now=at,
        )

    cast(pair_ids[0], t0)
    cast(pair_ids[1], t0 + dt.timedelta(milliseconds=100))
    with pytest.raises(service.RateLimited) as info:
        cast(pair_ids[2], t0 + dt.timedelta(milliseconds=200))
    assert info.value.status == 429 and info.value.retry_after == 1
    cast(pair_ids[2], t0 + dt.timedelta(milliseconds=1050))


def test_change_last_vote(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=3, votes_per_second=100, change_vote_seconds=30)
    user, token = w.annotators[0]
    _, other_token = w.annotators[1]
    a = serve(client, w.project.id, token)
    first = vote(client, a["pair_id"], token, choice="left", left_image_id=a["left"]["image_id"])
    b = serve(client, w.project.id, token)
    second = vote(client, b["pair_id"], token, choice="skip", left_image_id=b["left"]["image_id"])
    vid = second.json()["vote_id"]
    # Only the most recent vote can be changed.
    old = client.put(
        f"/api/v1/votes/{first.json()['vote_id']}", json={"choice": "right"}, headers=bearer(token)
    )
    assert old.status_code == 409 and "most recent" in old.json()["detail"]
    # Skip -> left takes a slot; left -> skip frees it.
    changed = client.put(f"/api/v1/votes/{vid}", json={"choice": "left"}, headers=bearer(token))
    assert changed.status_code == 200 and changed.json() == {"vote_id": vid, "choice": "left"}
    assert db.get(Pair, b["pair_id"]).vote_count == 1
    assert db.get(Vote, vid).updated_at is not None
    back = client.put(f"/api/v1/votes/{vid}", json={"choice": "skip"}, headers=bearer(token))
    assert back.status_code == 200 and db.get(Pair, b["pair_id"]).vote_count == 0
    # Someone else's vote: not found; a bad choice: 422.
    assert (
        client.put(
            f"/api/v1/votes/{vid}", json={"choice": "left"}, headers=bearer(other_token)
        ).status_code
        == 404
    )
    assert (
        client.put(f"/api/v1/votes/{vid}", json={"choice": "x"}, headers=bearer(token)).status_code
        == 422
    )
    assert (
        client.put(
            "/api/v1/votes/999999", json={"choice": "left"}, headers=bearer(token)
        ).status_code
        == 404
    )
    # Too late.
    with pytest.raises(service.VoteConflict, match="too late"):
        service.change_last_vote(
            db, vote_id=vid, annotator=user, choice="tie", now=utcnow() + dt.timedelta(seconds=31)
        )


def test_me_counts_and_gold_accuracy_when_revealed(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(
        db, make_user, n_prompts=2, votes_per_second=100, gold_rate=1.0, reveal_gold=True
    )
    _, token = w.annotators[0]
    originals = [w.images[(0, 0, 0)], w.images[(1, 0, 0)]]
    gold = pairs.create_gold_pairs(db, get_media_store(), project=w.project, images=originals)
    db.commit()
    gold_ids = {p.id: p.gold_expected for p in gold}
    for right_answer in (True, False):
        served = serve(client, w.project.id, token)
        assert served["pair_id"] in gold_ids
        expected = gold_ids[served["pair_id"]]
        good = "left" if served["left"]["image_id"] == expected else "right"
        bad = "right" if good == "left" else "left"
        choice = good if right_answer else bad
        r = vote(
            client,
            served["pair_id"],
            token,
            choice=choice,
            left_image_id=served["left"]["image_id"],
        )
        assert r.status_code == 201
    me = client.get(f"/api/v1/projects/{w.project.id}/me", headers=bearer(token))
    assert me.status_code == 200
    body = me.json()
    assert body["votes_today"] == body["votes_total"] == 2
    assert body["pairs_left"] == 2
    assert body["gold"] == {"answered": 2, "correct": 1, "accuracy": 0.5}
    # Without reveal_gold the annotator does not see gold figures.
    w.project.settings = {**w.project.settings, "reveal_gold": False}
    db.commit()
    hidden = client.get(f"/api/v1/projects/{w.project.id}/me", headers=bearer(token)).json()
    assert hidden["gold"] is None and hidden["votes_total"] == 2
    _, stranger = make_user("annotator")
    assert (
        client.get(f"/api/v1/projects/{w.project.id}/me", headers=bearer(stranger)).status_code
        == 403
    )


def test_gold_correct_rules() -> None:
    kw = {"image_a_id": "a", "image_b_id": "b"}
    assert service.gold_correct(choice="left", left_image_id="a", expected="a", **kw) is True
    assert service.gold_correct(choice="right", left_image_id="b", expected="a", **kw) is True
    assert service.gold_correct(choice="right", left_image_id="a", expected="a", **kw) is False
    assert service.gold_correct(choice="tie", left_image_id="a", expected="a", **kw) is False
    assert service.gold_correct(choice="tie", left_image_id="a", expected="tie", **kw) is True
    assert service.gold_correct(choice="skip", left_image_id="a", expected="a", **kw) is None


def test_unique_race_is_answered_from_the_savepoint(db, make_user, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A concurrent identical request committed between our checks and our insert."""
    w = build_world(db, make_user)
    user, _ = w.annotators[0]
    served = pairs.next_pair(db, project=w.project, annotator=user)
    assert served is not None
    kwargs = dict(
        pair_id=served.pair_id,
        annotator=user,
        choice="left",
        left_image_id=served.left_image_id,
        latency_ms=900,
        idempotency_key="same",
    )
    first, created = service.record_vote(db, **kwargs)
    assert created
    real = service._existing
    calls = {"n": 0}

    def blind_first_time(*args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        return (None, None) if calls["n"] == 1 else real(*args, **kw)

    monkeypatch.setattr(service, "_existing", blind_first_time)
    again, created = service.record_vote(db, **kwargs)
    assert not created and again.id == first.id and calls["n"] == 2
    # The session is still usable: the failed insert was rolled back to its savepoint only.
    assert count_votes(db, pair_id=served.pair_id) == 1
    assert db.get(Pair, served.pair_id).vote_count == 1


def test_vote_page_partials_blind_and_one_request_per_vote(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2, votes_per_second=100)
    user, _ = make_user("annotator", email="page@example.com", password="pw-123456789")
    add_member(db, project=w.project, user=user, role="annotator")
    db.commit()
    csrf = login(client, "page@example.com", "pw-123456789")
    page = client.get(f"/projects/{w.project.id}/vote")
    assert page.status_code == 200 and page.headers["vary"] == "HX-Request"
    html = page.text
    assert "a red shape number" in html and 'rel="preload"' in html
    for model in w.models:
        assert model.name not in html
    assert "seed" not in html.lower()
    served = pairs.next_pair(db, project=w.project, annotator=user)  # the held reservation
    assert served is not None and f'value="{served.left_image_id}"' in html
    form = {
        "pair_id": str(served.pair_id),
        "left_image_id": served.left_image_id,
        "choice": "tie",
        "latency_ms": "850",
        "idempotency_key": "page-1",
    }
    htmx = {"HX-Request": "true", "X-CSRF-Token": csrf}
    answer = client.post(f"/projects/{w.project.id}/vote", data=form, headers=htmx)
    assert answer.status_code == 200, answer.text
    assert answer.text.lstrip().startswith('<section id="vote-area"')
    assert "Saved: Tie." in answer.text and "Undo / change last vote" in answer.text
    row = db.scalar(select(Vote).where(Vote.annotator_id == user.id))
    assert (row.choice, row.latency_ms, row.left_image_id) == ("tie", 850, served.left_image_id)
    # The same form posted again (a double submit) is a replay: still one vote.
    again = client.post(f"/projects/{w.project.id}/vote", data=form, headers=htmx)
    assert again.status_code == 200 and count_votes(db, annotator_id=user.id) == 1
    # Without the CSRF token a cookie-authenticated vote is refused.
    forged = client.post(
        f"/projects/{w.project.id}/vote", data=form, headers={"HX-Request": "true"}
    )
    assert forged.status_code == 403
    # Changing the last vote through the page.
    change = client.get(f"/projects/{w.project.id}/vote/change/{row.id}", headers=htmx)
    assert change.status_code == 200 and "it was: <strong>Tie</strong>" in change.text
    changed = client.post(
        f"/projects/{w.project.id}/vote/change/{row.id}", data={"choice": "right"}, headers=htmx
    )
    assert changed.status_code == 200 and "Changed your last vote to: Right." in changed.text
    db.refresh(row)
    assert row.choice == "right"
    # A refused vote (409) still answers with the page state, for htmx to swap in.
    clash = client.post(
        f"/projects/{w.project.id}/vote",
        data={**form, "choice": "left", "idempotency_key": ""},
        headers=htmx,
    )
    assert clash.status_code == 409 and "already voted" in clash.text
    me = client.get(f"/projects/{w.project.id}/me")
    assert me.status_code == 200 and 'class="votes-total">1<' in me.text
