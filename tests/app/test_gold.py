"""Gold pairs made by the product, votes only on served gold pairs, the minimum viewing time."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from app.audit.models import AuditEvent
from app.core.storage import get_media_store
from app.images.models import Image
from app.pairs import service as pairs
from app.pairs.models import Pair
from app.votes.models import Vote
from tests.factories import build_world, lead_client
from tests.support import bearer


def gold_pairs(db: Any, project_id: int) -> list[Pair]:
    db.expire_all()
    return list(db.scalars(select(Pair).where(Pair.project_id == project_id, Pair.is_gold)))


def test_gold_wanted_rule() -> None:
    assert pairs.gold_wanted(0.0, 100) == 0
    assert pairs.gold_wanted(0.1, 0) == 0
    assert pairs.gold_wanted(0.1, 100) == 10
    assert pairs.gold_wanted(0.1, 3) == 1  # at least one while the rate is on
    assert pairs.gold_wanted(0.25, 9) == 3  # rounded up


def test_post_gold_tops_up_to_the_rate_once_and_is_audited(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=4, n_models=2, seeds=(0, 1), gold_rate=0.25)
    regular = db.scalar(
        select(func.count()).select_from(Pair).where(Pair.project_id == w.project.id)
    )
    url = f"/api/v1/projects/{w.project.id}/gold"
    # Annotators may not create gold pairs.
    assert client.post(url, headers=bearer(w.annotators[0][1])).status_code == 403
    r = client.post(url, headers=bearer(w.lead_token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["created"] == pairs.gold_wanted(0.25, regular) == body["gold_pairs"]
    made = gold_pairs(db, w.project.id)
    assert sorted(p.id for p in made) == sorted(body["pair_ids"])
    for pair in made:
        copy_id = pair.image_b_id if pair.image_a_id == pair.gold_expected else pair.image_a_id
        copy = db.get(Image, copy_id)
        original = db.get(Image, pair.gold_expected)
        assert copy.provenance["gold_of"] == original.id and original.model_version_id is not None
    # Originals differ, and both degradations are used.
    assert len({p.gold_expected for p in made}) == len(made)
    kinds = {db.get(Image, p.image_a_id if p.image_a_id != p.gold_expected else p.image_b_id)
             .provenance["degradation"]["kind"] for p in made}
    assert kinds == set(pairs.GOLD_KINDS)
    # Already at the rate: nothing more.
    again = client.post(url, headers=bearer(w.lead_token)).json()
    assert again["created"] == 0 and again["gold_pairs"] == len(made)
    events = db.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "gold.create", AuditEvent.project_id == w.project.id
        )
    ).all()
    assert [e.details["created"] for e in events] == [len(made), 0]


def test_no_gold_when_the_rate_is_zero(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2)
    r = client.post(f"/api/v1/projects/{w.project.id}/gold", headers=bearer(w.lead_token))
    assert r.status_code == 200 and r.json()["created"] == 0
    assert gold_pairs(db, w.project.id) == []


def test_gold_vote_needs_the_pair_served_to_you(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2, gold_rate=1.0, votes_per_second=100)
    (gold,) = pairs.create_gold_pairs(
        db, get_media_store(), project=w.project, images=[w.images[(0, 0, 0)]]
    )
    db.commit()
    (alice, alice_token), (bob, bob_token) = w.annotators
    body = {"choice": "left", "left_image_id": gold.image_a_id, "latency_ms": 900}
    # Bob knows the pair id but was never shown it.
    r = client.post(f"/api/v1/pairs/{gold.id}/votes", json=body, headers=bearer(bob_token))
    assert r.status_code == 409 and "not served" in r.json()["detail"]
    # Alice is served it (gold_rate 1.0 serves gold first) and may answer.
    served = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(alice_token))
    assert served.json()["pair_id"] == gold.id
    body["left_image_id"] = served.json()["left"]["image_id"]
    r = client.post(f"/api/v1/pairs/{gold.id}/votes", json=body, headers=bearer(alice_token))
    assert r.status_code == 201, r.text
    assert db.scalar(select(func.count()).select_from(Vote).where(Vote.pair_id == gold.id)) == 1


def test_votes_faster_than_min_view_ms_are_refused(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    w = build_world(db, make_user, n_prompts=2, min_view_ms=500, votes_per_second=100)
    (_, token), (_, other) = w.annotators
    served = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(token)).json()
    url = f"/api/v1/pairs/{served['pair_id']}/votes"
    body = {"choice": "left", "left_image_id": served["left"]["image_id"], "latency_ms": 499}
    r = client.post(url, json=body, headers=bearer(token))
    assert r.status_code == 422 and "minimum viewing time of 500 ms" in r.json()["detail"]
    in_project = select(func.count()).select_from(Vote).where(Vote.project_id == w.project.id)
    assert db.scalar(in_project) == 0
    body["latency_ms"] = 500
    assert client.post(url, json=body, headers=bearer(token)).status_code == 201
    # Turned off (0): any measured latency is accepted.
    w.project.settings = {**w.project.settings, "min_view_ms": 0}
    db.commit()
    served = client.get(f"/api/v1/projects/{w.project.id}/pairs/next", headers=bearer(other)).json()
    body = {"choice": "right", "left_image_id": served["left"]["image_id"], "latency_ms": 20}
    r = client.post(f"/api/v1/pairs/{served['pair_id']}/votes", json=body, headers=bearer(other))
    assert r.status_code == 201, r.text


def test_settings_page_button_creates_gold_and_edits_question(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from app.projects.service import add_member
    w = build_world(db, make_user, n_prompts=3, n_models=2, gold_rate=0.5)
    client, lead, csrf = lead_client(client, make_user)
    add_member(db, project=w.project, user=lead, role="lead")
    db.commit()
    page = client.get(f"/projects/{w.project.id}/settings")
    assert "This project has 0" in page.text and 'name="guidelines"' in page.text
    assert '<textarea id="f-guidelines"' in page.text and 'name="question"' in page.text
    r = client.post(f"/projects/{w.project.id}/settings/gold", data={"csrf_token": csrf})
    assert r.status_code == 200 and "2 new gold pairs" in r.text
    assert len(gold_pairs(db, w.project.id)) == 2


def test_empty_vote_page_says_when_new_pairs_are_coming(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from app.jobs.models import Job

    w = build_world(db, make_user, n_prompts=1, pairs=False)
    _, token = w.annotators[0]
    page = client.get(f"/projects/{w.project.id}/vote", headers=bearer(token))
    assert page.status_code == 200 and "Nothing to do" in page.text
    assert "being generated" not in page.text
    db.add(Job(project_id=w.project.id, kind="generate", queue="gpu", params={}, status="running"))
    db.commit()
    page = client.get(f"/projects/{w.project.id}/vote", headers=bearer(token))
    assert "Images are being generated for this project right now" in page.text
    assert 'hx-trigger="every 15s"' in page.text


def test_lead_excludes_and_includes_an_annotator_by_hand(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    from app.projects.service import add_member, project_settings
    from app.ratings.reliability import project_exclusion
    w = build_world(db, make_user, n_prompts=1)
    client, lead, csrf = lead_client(client, make_user)
    add_member(db, project=w.project, user=lead, role="lead")
    db.commit()
    target = w.annotators[0][0]
    url = f"/projects/{w.project.id}/annotators/{target.id}/votes-used"
    r = client.post(url, data={"csrf_token": csrf, "use": "exclude"}, follow_redirects=False)
    assert r.status_code == 303
    db.expire_all()
    assert project_exclusion(db, w.project).excluded == {target.id: ("lead",)}
    client.post(url, data={"csrf_token": csrf, "use": "include"}, follow_redirects=False)
    db.expire_all()
    settings = project_settings(w.project)
    assert settings.included_annotators == [target.id] and settings.excluded_annotators == []
    assert client.post(url, data={"csrf_token": csrf, "use": "maybe"}).status_code == 422
    actions = db.scalars(
        select(AuditEvent.action).where(AuditEvent.target == f"user:{target.id}")
    ).all()
    assert actions == ["annotator.votes_exclude", "annotator.votes_include"]
