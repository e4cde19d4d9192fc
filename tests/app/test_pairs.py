"""The pair scheduler: building pairs, gold pairs, and serving the next pair (Postgres)."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.storage import get_media_store
from app.images.models import Image
from app.pairs import scheduler, service
from app.pairs.models import Pair, Reservation
from app.projects.service import add_member
from app.votes.models import Vote
from tests.factories import build_world
from tests.support import bearer


def pair_keys(db: Session, project_id: int) -> dict[frozenset[str], Pair]:
    rows = db.scalars(select(Pair).where(Pair.project_id == project_id))
    return {frozenset((p.image_a_id, p.image_b_id)): p for p in rows}


# --- building pairs ---------------------------------------------------------------------------


def test_make_pairs_eval_across_models_train_within_a_model(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(
        db, make_user, n_models=2, seeds=(0, 1, 2), votes_per_pair=4, train_pairs_per_prompt=2
    )
    img = w.images
    pairs = pair_keys(db, w.project.id)
    evals = {k for k, p in pairs.items() if p.purpose == "eval"}
    trains = {k for k, p in pairs.items() if p.purpose == "train"}
    # Eval pairs are seed-matched across the two models.
    assert evals == {frozenset((img[(0, 0, s)].id, img[(0, 1, s)].id)) for s in (0, 1, 2)}
    # Train pairs: adjacent seeds first, at most 2 per (prompt, model).
    for m in (0, 1):
        assert {k for k in trains if img[(0, m, 0)].id in k or img[(0, m, 2)].id in k} >= {
            frozenset((img[(0, m, 0)].id, img[(0, m, 1)].id)),
            frozenset((img[(0, m, 1)].id, img[(0, m, 2)].id)),
        }
    assert len(trains) == 4
    assert all(p.votes_wanted == 4 and p.vote_count == 0 and not p.is_gold for p in pairs.values())
    assert all(p.image_a_id < p.image_b_id for p in pairs.values())

    # Same images again: nothing new.
    assert service.make_pairs(db, project=w.project, images=list(img.values())) == []


def test_make_pairs_never_duplicates_either_order_and_caps_train_pairs(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_models=2, seeds=(0,), pairs=False, train_pairs_per_prompt=1)
    a, b = w.images[(0, 0, 0)], w.images[(0, 1, 0)]
    # An existing pair stored in the "wrong" order (e.g. imported).
    hi, lo = max(a.id, b.id), min(a.id, b.id)
    db.add(
        Pair(
            project_id=w.project.id,
            prompt_id=a.prompt_id,
            image_a_id=hi,
            image_b_id=lo,
            purpose="eval",
            votes_wanted=3,
            vote_count=0,
        )
    )
    db.flush()
    assert service.make_pairs(db, project=w.project, images=[a, b]) == []

    # New seeds for model 0: one eval pair each (no seed match: the lowest seed of model 1),
    # and a single train pair, as the cap says.
    new = [w.add_image(db, 0, 0, 1), w.add_image(db, 0, 0, 2)]
    created = service.make_pairs(db, project=w.project, images=new)
    kinds = sorted(p.purpose for p in created)
    assert kinds == ["eval", "eval", "train"]
    for p in created:
        if p.purpose == "eval":
            assert b.id in (p.image_a_id, p.image_b_id)
    again = service.make_pairs(db, project=w.project, images=[*new, w.add_image(db, 0, 0, 3)])
    assert [p.purpose for p in again] == ["eval"]  # train cap reached


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_gold_pairs_from_degraded_copies(db, make_user, kind: str) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_models=1, seeds=(0,), pairs=False)
    original = w.images[(0, 0, 0)]
    store = get_media_store()
    (pair,) = service.create_gold_pairs(db, store, project=w.project, images=[original], kind=kind)
    copy_id = pair.image_b_id if pair.image_a_id == original.id else pair.image_a_id
    copy = db.get(Image, copy_id)
    assert copy is not None
    assert pair.is_gold and pair.gold_expected == original.id
    assert copy.prompt_id == original.prompt_id and copy.model_version_id is None
    assert copy.provenance["gold_of"] == original.id
    assert copy.provenance["degradation"]["kind"] == kind
    assert store.read(copy.storage_key) != store.read(original.storage_key)
    with pytest.raises(ValueError, match="unknown degradation"):
        service.degrade_png(store.read(original.storage_key), "jpeg")


def test_mark_existing_pair_gold(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user)
    (pair,) = pair_keys(db, w.project.id).values()
    with pytest.raises(ValueError, match="expected must be"):
        service.mark_gold(db, pair=pair, expected="not-an-image")
    service.mark_gold(db, pair=pair, expected="tie")
    assert pair.is_gold and pair.gold_expected == "tie"
    service.mark_gold(db, pair=pair, expected=pair.image_b_id)
    assert pair.gold_expected == pair.image_b_id


# --- serving pairs ----------------------------------------------------------------------------


def test_next_pair_api_shape_and_blindness(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_models=2, seeds=(0, 1))
    _, token = w.annotators[0]
    response = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"pair_id", "prompt", "left", "right", "expires_at"}
    assert set(body["left"]) == set(body["right"]) == {"image_id", "url"}
    assert body["prompt"] == "a red shape number 0"
    for side in ("left", "right"):
        # A signed URL of the image, for this annotator (tests/app/test_image_urls.py).
        assert body[side]["url"].startswith(f"/api/v1/images/{body[side]['image_id']}?u=")
    image_ids = {body["left"]["image_id"], body["right"]["image_id"]}
    pair = db.get(Pair, body["pair_id"])
    assert image_ids == {pair.image_a_id, pair.image_b_id}
    # Nothing tells which model made an image: no model id, model name or seed anywhere.
    text = json.dumps(body).lower()
    for model in w.models:
        assert model.name.lower() not in text
    assert "model" not in text and "seed" not in text and "gold" not in text
    # The image itself is served to the annotator, by its opaque URL.
    image = client.get(body["left"]["url"], headers=bearer(token))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # Asking again while holding the reservation: the same pair, the same side.
    again = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token))
    assert again.json() == body


def test_next_pair_auth_and_empty(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=1, n_models=1, seeds=(0,))  # one model: no pairs
    _, token = w.annotators[0]
    _, stranger = make_user("annotator")
    url = f"/api/v1/projects/{w.project.id}/pairs/next"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=bearer(stranger)).status_code == 403
    assert (
        client.get("/api/v1/projects/999999/pairs/next", headers=bearer(token)).status_code == 404
    )
    empty = client.get(url, headers=bearer(token))
    assert empty.status_code == 204 and empty.content == b""


def test_random_left_side_per_assignment(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=12, n_models=2, seeds=(0,), n_annotators=1)
    user, _ = w.annotators[0]
    rng = random.Random(7)
    firsts = []
    for _ in range(12):
        served = service.next_pair(db, project=w.project, annotator=user, rng=rng)
        assert served is not None
        pair = db.get(Pair, served.pair_id)
        firsts.append(served.left_image_id == pair.image_a_id)
        reservation = db.get(Reservation, (served.pair_id, user.id))
        assert reservation.left_image_id == served.left_image_id
        db.add(
            Vote(
                pair_id=pair.id,
                project_id=w.project.id,
                annotator_id=user.id,
                left_image_id=served.left_image_id,
                choice="left",
            )
        )
        db.delete(reservation)
        db.flush()
    assert any(firsts) and not all(firsts)


def test_fewest_votes_and_reservations_first_and_capacity(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(
        db, make_user, n_prompts=3, n_models=2, seeds=(0,), n_annotators=3, votes_per_pair=2
    )
    (u1, _), (u2, _), (u3, _) = w.annotators
    pairs = sorted(pair_keys(db, w.project.id).values(), key=lambda p: p.id)
    busy, reserved, fresh = pairs
    busy.vote_count = 1
    db.flush()
    now = utcnow()
    # u3 holds a live reservation on `reserved`: it counts like a vote for others.
    db.add(
        Reservation(
            pair_id=reserved.id,
            annotator_id=u3.id,
            left_image_id=reserved.image_a_id,
            created_at=now,
            expires_at=now + dt.timedelta(minutes=5),
        )
    )
    reserved.vote_count = 0
    db.flush()
    first = service.next_pair(db, project=w.project, annotator=u1, now=now)
    assert first is not None and first.pair_id == fresh.id
    # For u2: fresh now has 1 reservation (u1), busy has 1 vote, reserved 1 reservation:
    # all at load 1 and still open (k = 2).
    second = service.next_pair(db, project=w.project, annotator=u2, now=now)
    assert second is not None and second.pair_id in {p.id for p in pairs}
    # Fill `busy` to k: it is never served again.
    busy.vote_count = 2
    db.flush()
    u4, _ = make_user("annotator")
    add_member(db, project=w.project, user=u4, role="annotator")
    served_ids = set()
    for _ in range(3):
        got = service.next_pair(db, project=w.project, annotator=u4, now=now)
        if got is None:
            break
        served_ids.add(got.pair_id)
        db.execute(Reservation.__table__.delete().where(Reservation.annotator_id == u4.id))
        db.add(
            Vote(
                pair_id=got.pair_id,
                project_id=w.project.id,
                annotator_id=u4.id,
                left_image_id=got.left_image_id,
                choice="skip",
            )
        )
        db.flush()
    assert busy.id not in served_ids


def test_reservation_expiry_frees_the_slot(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, votes_per_pair=1, reservation_minutes=2)
    (u1, _), (u2, _) = w.annotators
    t0 = utcnow()
    held = service.next_pair(db, project=w.project, annotator=u1, now=t0)
    assert held is not None
    assert held.expires_at == t0 + dt.timedelta(minutes=2)
    # k = 1 and u1 holds the only slot.
    assert (
        service.next_pair(db, project=w.project, annotator=u2, now=t0 + dt.timedelta(minutes=1))
        is None
    )
    later = t0 + dt.timedelta(minutes=2, seconds=1)
    taken = service.next_pair(db, project=w.project, annotator=u2, now=later)
    assert taken is not None and taken.pair_id == held.pair_id
    # u1's reservation lapsed and u2 now holds the slot.
    assert service.next_pair(db, project=w.project, annotator=u1, now=later) is None
    assert db.get(Reservation, (held.pair_id, u1.id)) is None


def test_gold_served_at_rate_and_never_twice(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=3, n_models=2, seeds=(0,), gold_rate=1.0)
    user, token = w.annotators[0]
    gold_pairs = service.create_gold_pairs(
        db, get_media_store(), project=w.project, images=[w.images[(0, 0, 0)]]
    )
    db.commit()
    gold_id = gold_pairs[0].id
    h = bearer(token)
    served: list[int] = []
    while True:
        r = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=h)
        if r.status_code == 204:
            break
        body = r.json()
        served.append(body["pair_id"])
        vote = client.post(
            f"/api/v1/pairs/{body['pair_id']}/votes",
            json={"choice": "left", "left_image_id": body["left"]["image_id"]},
            headers=h,
        )
        assert vote.status_code == 201, vote.text
        # Rate limit: keep the test quick without tripping it.
        db.execute(Vote.__table__.update().values(created_at=utcnow() - dt.timedelta(seconds=5)))
        db.commit()
    # gold_rate = 1: the gold pair comes first, once; then the three regular pairs.
    assert served[0] == gold_id
    assert served.count(gold_id) == 1 and len(served) == 4
    # With gold_rate 0 a new annotator never meets it.
    w.project.settings = {**w.project.settings, "gold_rate": 0.0}
    db.flush()
    other, _ = w.annotators[1]
    got = [service.next_pair(db, project=w.project, annotator=other)]
    assert got[0] is not None and got[0].pair_id != gold_id and not got[0].is_gold


def test_active_sampling_hook_reorders_candidates(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=4, n_models=2, seeds=(0,), active_sampling=True)
    user, _ = w.annotators[0]
    seen: list[list[int]] = []

    def highest_id_first(session, project, candidates, annotator):  # type: ignore[no-untyped-def]
        seen.append([c.pair_id for c in candidates])
        return sorted(candidates, key=lambda c: -c.pair_id)

    served = service.next_pair(db, project=w.project, annotator=user, active_order=highest_id_first)
    ids = sorted(p.id for p in pair_keys(db, w.project.id).values())
    assert served is not None and served.pair_id == ids[-1]
    assert sorted(seen[0]) == ids
    # An explicit order wins over the project's.
    other, _ = w.annotators[1]
    served = service.next_pair(
        db,
        project=w.project,
        annotator=other,
        order=lambda s, p, c, a: sorted(c, key=lambda x: x.pair_id),
    )
    assert served is not None and served.pair_id == ids[0]


def test_peek_and_pairs_left(db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=3, n_models=2, seeds=(0,))
    user, _ = w.annotators[0]
    assert service.pairs_left(db, project=w.project, annotator=user) == 3
    served = service.next_pair(db, project=w.project, annotator=user)
    assert served is not None
    peek = service.peek_next(db, project=w.project, annotator=user, exclude=[served.pair_id])
    assert peek is not None and served.left_image_id not in peek
    db.add(
        Vote(
            pair_id=served.pair_id,
            project_id=w.project.id,
            annotator_id=user.id,
            left_image_id=served.left_image_id,
            choice="tie",
        )
    )
    db.execute(Reservation.__table__.delete().where(Reservation.annotator_id == user.id))
    db.flush()
    nxt = service.next_pair(db, project=w.project, annotator=user)
    assert nxt is not None and {nxt.left_image_id, nxt.right_image_id} == set(peek)
    assert service.pairs_left(db, project=w.project, annotator=user) == 2


def test_all_candidates_locked_is_busy_not_empty(client, db, make_user, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2)
    user, token = w.annotators[0]
    monkeypatch.setattr(scheduler, "_try_lock", lambda session, pair_id: False)
    with pytest.raises(service.PairsBusy):
        service.next_pair(db, project=w.project, annotator=user)
    busy = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert db.scalar(select(Reservation.pair_id).where(Reservation.annotator_id == user.id)) is None
