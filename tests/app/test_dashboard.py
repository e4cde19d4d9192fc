"""The lead's dashboard: its queries on hand-built data, and the page and partials it renders."""

from __future__ import annotations

import datetime as dt
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.storage import get_media_store
from app.dashboard import service
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.projects.schemas import ProjectCreate
from app.projects.service import add_member, create_project
from app.ratings.models import Rating, RatingFit, RewardModel
from app.users.models import User
from app.votes.models import Vote
from tests.factories import lead_client, tiny_png
from tests.support import bearer, login

NOW = dt.datetime(2030, 5, 6, 12, 30, tzinfo=dt.UTC)


@dataclass
class World:
    project: Project
    lead: User
    lead_token: str
    annotators: list[User]
    models: list[ModelVersion]
    prompts: list[Prompt]
    images: list[Image]
    pairs: list[Pair]


def _world(db: Session, make_user: Any, *, lead_password: str | None = None) -> World:
    lead, lead_token = make_user("lead", password=lead_password)
    project = create_project(db, data=ProjectCreate(name="Dash"), creator=lead)
    annotators = []
    for i in range(3):
        user, _ = make_user("annotator", email=f"ann{i}-{project.id}@example.com")
        add_member(db, project=project, user=user, role="annotator")
        annotators.append(user)
    base = ModelVersion(project_id=project.id, name="base-model", base="toy", params={})
    db.add(base)
    db.flush()
    child = ModelVersion(
        project_id=project.id,
        name="child-<dpo>",
        base="toy",
        adapter="/adapters/1",
        params={},
        parent_id=base.id,
        evaluation={"reward": {"win_rate": 0.62, "ci": [0.55, 0.69]}, "n": 100},
    )
    grandchild = ModelVersion(project_id=project.id, name="grandchild", base="toy", params={})
    db.add(child)
    db.flush()
    grandchild.parent_id = child.id
    db.add(grandchild)
    prompts = [
        Prompt(project_id=project.id, text=f"prompt {i}", split="train" if i < 3 else "test")
        for i in range(4)
    ]
    db.add_all(prompts)
    db.flush()
    store = get_media_store()
    images = [
        store_image(
            db,
            store,
            project_id=project.id,
            prompt_id=p.id,
            png=tiny_png(p.id * 7 + m.id),
            model_version_id=m.id,
            seed=0,
        )
        for p in prompts[:3]
        for m in (base, child)
    ]
    pairs = [
        Pair(
            project_id=project.id,
            prompt_id=images[2 * i].prompt_id,
            image_a_id=images[2 * i].id,
            image_b_id=images[2 * i + 1].id,
            purpose="eval",
            votes_wanted=2,
            vote_count=0,
        )
        for i in range(3)
    ]
    db.add_all(pairs)
    db.flush()
    db.commit()
    return World(project, lead, lead_token, annotators, [base, child, grandchild], prompts,
                 images, pairs)  # fmt: skip


def _vote(db: Session, pair: Pair, user: User, choice: str, at: dt.datetime) -> Vote:
    vote = Vote(
        pair_id=pair.id,
        project_id=pair.project_id,
        annotator_id=user.id,
        left_image_id=pair.image_a_id,
        choice=choice,
        latency_ms=1500,
        created_at=at,
    )
    db.add(vote)
    if choice != "skip":
        pair.vote_count += 1
    db.flush()
    return vote


def test_votes_per_hour_buckets_and_fills_empty_hours(db: Session, make_user: Any) -> None:
    w = _world(db, make_user)
    a, b, _ = w.annotators
    _vote(db, w.pairs[0], a, "left", NOW - dt.timedelta(minutes=5))  # 12:25
    _vote(db, w.pairs[1], a, "right", NOW - dt.timedelta(minutes=29))  # 12:01
    _vote(db, w.pairs[0], b, "tie", NOW - dt.timedelta(hours=2))  # 10:30
    _vote(db, w.pairs[1], b, "left", NOW - dt.timedelta(hours=30))  # outside 24 h
    hours = service.votes_per_hour(db, w.project.id, hours=24, now=NOW)
    assert len(hours) == 24
    assert hours[-1] == (dt.datetime(2030, 5, 6, 12, tzinfo=dt.UTC), 2)
    assert hours[-2][1] == 0 and hours[-3] == (dt.datetime(2030, 5, 6, 10, tzinfo=dt.UTC), 1)
    assert sum(n for _, n in hours) == 3
    assert hours[0][0] == dt.datetime(2030, 5, 5, 13, tzinfo=dt.UTC)


def test_votes_per_annotator_lists_members_and_voters(db: Session, make_user: Any) -> None:
    w = _world(db, make_user)
    a, b, c = w.annotators
    outsider, _ = make_user("annotator")
    _vote(db, w.pairs[0], a, "left", NOW - dt.timedelta(minutes=5))
    _vote(db, w.pairs[1], a, "skip", NOW - dt.timedelta(hours=3))
    _vote(db, w.pairs[2], outsider, "right", NOW - dt.timedelta(hours=3))
    c.is_active = False
    db.flush()
    rows = {r.user_id: r for r in service.votes_per_annotator(db, w.project.id, now=NOW)}
    assert set(rows) == {a.id, b.id, c.id, outsider.id}
    assert (rows[a.id].votes, rows[a.id].votes_last_hour) == (2, 1)
    assert rows[a.id].last_vote_at == NOW - dt.timedelta(minutes=5)
    assert rows[b.id].votes == 0 and rows[b.id].member
    assert not rows[c.id].is_active
    assert rows[outsider.id].votes == 1 and not rows[outsider.id].member
    first = service.votes_per_annotator(db, w.project.id, now=NOW)[0]
    assert first.user_id == a.id


def test_overview_counts(db: Session, make_user: Any) -> None:
    w = _world(db, make_user)
    a, b, _ = w.annotators
    _vote(db, w.pairs[0], a, "left", NOW)
    _vote(db, w.pairs[0], b, "right", NOW)
    counts = service.overview(db, w.project.id)
    assert counts["prompts"] == 4 and counts["prompts_by_split"] == {
        "train": 3,
        "val": 0,
        "test": 1,
    }
    assert (counts["models"], counts["images"], counts["pairs"]) == (3, 6, 3)
    assert counts["pairs_complete"] == 1 and counts["votes"] == 2


def test_lineage_is_a_depth_first_tree_with_win_rates(db: Session, make_user: Any) -> None:
    w = _world(db, make_user)
    orphan = ModelVersion(project_id=w.project.id, name="other-root", base="toy", params={})
    db.add(orphan)
    db.flush()
    nodes = service.lineage(db, w.project.id)
    assert [(n.name, n.depth) for n in nodes] == [
        ("base-model", 0),
        ("child-<dpo>", 1),
        ("grandchild", 2),
        ("other-root", 0),
    ]
    summary = service.evaluation_summary(nodes[1].evaluation)
    assert summary == [
        {"label": "reward win rate", "value": 0.62, "low": 0.55, "high": 0.69, "n": None}
    ]
    flat = service.evaluation_summary(
        {"win_rate": 0.4, "ci_low": 0.3, "ci_high": 0.5, "human_win_rate": "n/a"}
    )
    assert flat == [{"label": "win rate", "value": 0.4, "low": 0.3, "high": 0.5, "n": None}]
    # What the evaluate job records on a child.
    evaluated = {"vs_parent": {"win_rate": 0.7, "ci_low": 0.6, "ci_high": 0.8, "wins": 7,
                               "ties": 0, "losses": 3, "n": 10, "parent_id": 1}}  # fmt: skip
    assert service.evaluation_summary(evaluated) == [
        {"label": "vs parent win rate", "value": 0.7, "low": 0.6, "high": 0.8, "n": 10}
    ]
    assert service.evaluation_summary({}) == []


def test_annotator_quality_reward_models_and_gallery(db: Session, make_user: Any) -> None:
    w = _world(db, make_user)
    a, b, _ = w.annotators
    assert service.annotator_quality(db, w.project.id)["rows"] == []
    fit = RatingFit(
        project_id=w.project.id,
        method={},
        vote_count=4,
        annotators=[
            {"annotator_id": a.id, "votes": 10, "flags": [], "gold_accuracy": 1.0},
            {"annotator_id": b.id, "votes": 3, "flags": ["left_bias"], "gold_accuracy": None},
        ],
    )
    db.add(fit)
    db.add(
        RewardModel(
            project_id=w.project.id,
            version=1,
            backbone="toyconv",
            path="/rm/1",
            metrics={"val_accuracy": 0.7, "val_ece": 0.05, "notes": "text is left out"},
        )
    )
    db.flush()
    quality = service.annotator_quality(db, w.project.id)
    assert quality["fit_id"] == fit.id
    # Flagged annotators first.
    assert [(r["email"], r["flags"]) for r in quality["rows"]] == [
        (b.email, ["left_bias"]),
        (a.email, []),
    ]
    (rm,) = service.reward_models(db, w.project.id)
    assert rm["metrics"] == {"val_accuracy": 0.7, "val_ece": 0.05}
    gallery = service.gallery(db, w.project.id, limit=2)
    assert gallery["total"] == 3 and len(gallery["rows"]) == 2
    assert [m["name"] for m in gallery["models"]] == ["base-model", "child-<dpo>", "grandchild"]
    first = gallery["rows"][0]
    assert first["text"] == "prompt 0"
    assert [len(c) for c in first["cells"]] == [1, 1, 0]
    assert first["cells"][0][0]["url"] == f"/api/v1/images/{w.images[0].id}"
    only_child = service.gallery(db, w.project.id, model_id=w.models[1].id, offset=2)
    assert only_child["total"] == 3 and [r["text"] for r in only_child["rows"]] == ["prompt 2"]
    assert service.gallery(db, w.project.id, split="test")["total"] == 0


def _svg_ok(html: str) -> int:
    """How many charts the page holds; each must parse as XML on its own."""
    figures = re.findall(r'<figure class="plot"[^>]*>(.*?)</figure>', html, flags=re.S)
    for svg in figures:
        assert ET.fromstring(svg).tag.endswith("svg")
    return len(figures)


def test_dashboard_page_shows_every_section_and_updates_after_votes(
    client: Any, db: Session, make_user: Any
) -> None:
    w = _world(db, make_user, lead_password="lead-password-1")
    fit = RatingFit(project_id=w.project.id, method={}, vote_count=1, annotators=[
        {"annotator_id": w.annotators[0].id, "votes": 1, "flags": ["fast"],
         "median_latency_ms": 1500.0, "gold_accuracy": 0.5, "agreement": 0.75,
         "left_rate": 1.0, "position_bias_p": 0.5, "skill": 0.9, "gold_votes": 2}])  # fmt: skip
    db.add(fit)
    db.flush()
    for model, rating in zip(w.models, (1000.0, 1040.0, 980.0), strict=True):
        db.add(Rating(fit_id=fit.id, model_version_id=model.id, score=0, rating=rating,
                      ci_low=rating - 20, ci_high=rating + 20, rank=1, votes=5))  # fmt: skip
    db.commit()
    login(client, w.lead.email, "lead-password-1")
    page = client.get(f"/projects/{w.project.id}")
    assert page.status_code == 200
    html = page.text
    for section in ("overview", "leaderboard", "quality", "lineage", "reward", "gallery"):
        assert f'id="dash-{section}"' in html
    # Names are escaped, charts are well-formed SVG, images come through the image endpoint.
    assert "child-&lt;dpo&gt;" in html and "child-<dpo>" not in html
    assert _svg_ok(html) >= 3
    assert f"/api/v1/images/{w.images[0].id}" in html
    assert "reward win rate: 62.0 %" in html and "[55.0, 69.0]" in html
    assert w.annotators[0].email in html and "fast" in html
    for fmt in ("pickapic", "fastchat", "jsonl", "csv"):
        assert f"/api/v1/projects/{w.project.id}/export?format={fmt}" in html
    before = client.get(f"/projects/{w.project.id}/dash/overview", headers={"HX-Request": "true"})
    assert 'data-stat="votes">0<' in before.text and "<html" not in before.text
    _vote(db, w.pairs[0], w.annotators[0], "left", utcnow())
    db.commit()
    after = client.get(f"/projects/{w.project.id}/dash/overview", headers={"HX-Request": "true"})
    assert 'data-stat="votes">1<' in after.text
    assert 'data-stat="votes-last-hour">1<' in after.text
    for section in ("leaderboard", "quality", "lineage", "reward", "gallery"):
        partial = client.get(f"/projects/{w.project.id}/dash/{section}")
        assert partial.status_code == 200 and f'id="dash-{section}"' in partial.text
    assert client.get(f"/projects/{w.project.id}/dash/nope").status_code == 404
    filtered = client.get(
        f"/projects/{w.project.id}/dash/gallery", params={"model_id": w.models[2].id}
    )
    assert "/api/v1/images/" not in filtered.text


def test_leaderboard_says_why_a_fit_ranks_nothing(
    client: Any, db: Session, make_user: Any
) -> None:
    w = _world(db, make_user, lead_password="lead-password-1")
    login(client, w.lead.email, "lead-password-1")
    url = f"/projects/{w.project.id}/dash/leaderboard"
    assert "No rating fit yet" in client.get(url).text
    # Every vote came from an annotator the reliability rule left out: the fit exists but is empty.
    excluded = {str(w.annotators[0].id): ["too_fast"]}
    method = {"reliability": {"rule": "exclude_flagged", "excluded": excluded}}
    db.add(RatingFit(project_id=w.project.id, vote_count=7, annotators=[], method=method))
    db.commit()
    html = client.get(url).text
    assert "No rating fit yet" not in html
    assert "used 7 votes" in html and "1 annotator(s) were left out" in html


@pytest.mark.parametrize("role", ["annotator", "other-lead"])
def test_dashboard_refuses_annotators_and_other_leads(
    client: Any, db: Session, make_user: Any, role: str
) -> None:
    w = _world(db, make_user)
    if role == "annotator":
        user = w.annotators[0]
        from app.users.service import issue_token

        token = issue_token(db, user)
        db.commit()
    else:
        _, token = make_user("lead")
    for path in (f"/projects/{w.project.id}", f"/projects/{w.project.id}/dash/gallery"):
        response = client.get(path, headers=bearer(token))
        assert response.status_code == 403
        assert "base-model" not in response.text and "/api/v1/images/" not in response.text


# -- forms generated from schemas ------------------------------------------------------------


def test_forms_follow_the_schema() -> None:
    from starlette.datastructures import FormData

    from app.dashboard.forms import errors_by_field, fields_for, parse_form
    from app.jobs.kinds import GenerateParams
    from app.projects.schemas import ProjectSettings

    fields = {f.key: f for f in fields_for(GenerateParams, models=[(4, "a"), (7, "b")])}
    assert fields["model_ids"].kind == "models" and fields["model_ids"].required
    assert fields["model_ids"].options == [("4", "a (#4)"), ("7", "b (#7)")]
    assert fields["split"].kind == "select" and fields["split"].value == "train"
    assert ("all", "all") in fields["split"].options
    assert (fields["images_per_prompt"].min, fields["images_per_prompt"].max) == (1, 64)
    assert fields["images_per_prompt"].value == "2" and fields["images_per_prompt"].step == "1"
    assert fields["seeds"].kind == "list" and fields["seeds"].value == ""
    assert fields["make_pairs"].kind == "checkbox" and fields["make_pairs"].value is True
    assert fields["batch_size"].kind == "number" and not fields["batch_size"].required
    settings = {f.key: f for f in fields_for(ProjectSettings, {"gold_rate": 0.25})}
    assert settings["gold_rate"].value == "0.25" and settings["gold_rate"].step == "any"
    assert settings["votes_per_pair"].help == "overlap k"

    form = FormData(
        [
            ("model_ids", "4"),
            ("model_ids", "7"),
            ("images_per_prompt", " 3 "),
            ("seeds", "1, 2 3"),
            ("batch_size", ""),
            ("split", "val"),
        ]  # fmt: skip
    )
    raw, problems = parse_form(GenerateParams, form)
    assert problems == {}
    assert raw == {
        "model_ids": ["4", "7"],
        "images_per_prompt": "3",
        "split": "val",
        "seeds": ["1", "2", "3"],
        "make_pairs": False,  # an unchecked box
    }
    clean = GenerateParams.model_validate(raw)
    assert clean.model_ids == [4, 7] and clean.seeds == [1, 2, 3] and clean.batch_size is None
    errors = errors_by_field(
        [
            {"loc": ["params", "seeds"], "msg": "needs exactly images_per_prompt seeds"},
            {"loc": ["params", "seeds", 0], "msg": "too big"},
            {"loc": ["kind"], "msg": "unknown"},
        ],
        skip_head=1,
    )
    assert errors == {"seeds": "needs exactly images_per_prompt seeds; 0: too big", "": "unknown"}


# -- project setup pages ---------------------------------------------------------------------



def test_lead_creates_a_project_with_settings_and_sees_name_errors(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = lead_client(client, make_user)
    page = client.get("/")
    assert 'href="/projects/new"' in page.text
    form = client.get("/projects/new")
    assert form.status_code == 200 and 'name="votes_per_pair"' in form.text
    bad = client.post("/projects/new", data={"csrf_token": csrf, "name": "   "})
    assert bad.status_code == 422 and "must not be blank" in bad.text
    no_csrf = client.post("/projects/new", data={"name": "x"})
    assert no_csrf.status_code == 403
    made = client.post(
        "/projects/new",
        data={"csrf_token": csrf, "name": "Cats", "votes_per_pair": "5", "tie_policy": "soft"},
        follow_redirects=False,
    )
    assert made.status_code == 303
    project_id = int(made.headers["location"].split("/")[2])
    project = db.get(Project, project_id)
    assert project is not None and project.name == "Cats"
    assert project.settings["votes_per_pair"] == 5 and project.settings["tie_policy"] == "soft"
    assert f'href="/projects/{project_id}"' in client.get("/").text


def test_prompt_upload_page_imports_or_lists_errors_with_line_numbers(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.commit()
    url = f"/projects/{project.id}/prompts"
    bad = client.post(
        url,
        data={"csrf_token": csrf},
        files={"file": ("p.jsonl", b'{"text": "ok"}\n{"text": ""}\n{"txt": "x"}\n')},
    )
    assert bad.status_code == 422
    assert "Nothing was imported" in bad.text
    assert "line 2: text must not be blank" in bad.text and "line 3:" in bad.text
    assert (
        db.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == project.id))
        == 0
    )
    good = client.post(
        url,
        data={"csrf_token": csrf, "format": "csv"},
        files={"file": ("p.csv", b"text,split\na cat,train\na dog,test\n")},
        follow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"].endswith("created=2")
    shown = client.get(good.headers["location"])
    assert "Added 2 prompts" in shown.text and "train 1 · val 0 · test 1" in shown.text


def test_model_registration_page(client: Any, db: Session, make_user: Any) -> None:
    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.commit()
    url = f"/projects/{project.id}/models"
    page = client.get(url)
    assert 'name="p_scheduler"' in page.text and 'name="p_guidance_scale"' in page.text
    fields = {"csrf_token": csrf, "name": "base", "base": "toy", "p_scheduler": "euler",
              "p_steps": "8", "p_guidance_scale": "3.5", "p_height": "", "p_width": ""}  # fmt: skip
    bad = client.post(url, data={**fields, "p_steps": "0", "p_height": "30"})
    assert bad.status_code == 422
    assert "greater than or equal to 1" in bad.text and "multiple of 8" in bad.text
    ok = client.post(url, data=fields, follow_redirects=False)
    assert ok.status_code == 303
    (model,) = db.scalars(select(ModelVersion).where(ModelVersion.project_id == project.id))
    assert model.params["scheduler"] == "euler" and model.params["steps"] == 8
    assert model.params["guidance_scale"] == 3.5 and model.params["height"] is None
    twice = client.post(url, data=fields)
    assert twice.status_code == 409 and "already exists" in twice.text
    child = client.post(url, data={**fields, "name": "child", "parent_id": str(model.id)},
                        follow_redirects=False)  # fmt: skip
    assert child.status_code == 303
    assert db.scalar(select(ModelVersion.parent_id).where(ModelVersion.name == "child")) == model.id


def test_settings_page_saves_valid_settings_only(client: Any, db: Session, make_user: Any) -> None:
    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.commit()
    url = f"/projects/{project.id}/settings"
    assert 'name="active_sampling"' in client.get(url).text
    base = {"csrf_token": csrf, "votes_per_pair": "4", "gold_rate": "0.1", "tie_policy": "soft",
            "active_sampling": "1", "votes_per_second": "2"}  # fmt: skip
    bad = client.post(url, data={**base, "gold_rate": "2"})
    assert bad.status_code == 422 and "less than or equal to 1" in bad.text
    db.refresh(project)
    assert project.settings.get("gold_rate", 0.0) == 0.0
    ok = client.post(url, data=base, follow_redirects=False)
    assert ok.status_code == 303
    db.refresh(project)
    assert project.settings["gold_rate"] == 0.1 and project.settings["active_sampling"] is True
    assert project.settings["votes_per_pair"] == 4 and project.settings["votes_per_second"] == 2
    assert "Saved." in client.get(ok.headers["location"]).text


@pytest.mark.slow
def test_invite_link_sets_a_password_once_and_deactivation_is_per_project(
    client: Any, db: Session, make_user: Any
) -> None:
    from fastapi.testclient import TestClient

    from app.users.invites import InviteError, make_invite_token, read_invite_token
    from app.users.service import get_by_email, issue_token

    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.commit()
    url = f"/projects/{project.id}/annotators"
    email = f"new-{project.id}@example.com"
    bad = client.post(url, data={"csrf_token": csrf, "email": "nope"})
    assert bad.status_code == 422 and "not an email" in bad.text
    shown = client.post(url, data={"csrf_token": csrf, "email": email})
    assert shown.status_code == 200
    link = re.search(r'id="invite-link">http://testserver(/invite/[^<]+)<', shown.text)
    assert link, shown.text
    invitee = get_by_email(db, email)
    assert invitee is not None and invitee.role == "annotator" and invitee.password_hash is None

    with TestClient(client.app, base_url="http://testserver") as guest:
        form = guest.get(link.group(1))
        assert form.status_code == 200 and email in form.text
        differ = guest.post(link.group(1), data={"password": "abcdefgh1", "confirm": "x"})
        assert differ.status_code == 422 and "differ" in differ.text
        short = guest.post(link.group(1), data={"password": "short", "confirm": "short"})
        assert short.status_code == 422 and "at least 8" in short.text
        done = guest.post(
            link.group(1),
            data={"password": "annotator-pw-1", "confirm": "annotator-pw-1"},
            follow_redirects=False,
        )
        assert done.status_code == 303
        assert guest.get("/").status_code == 200  # logged in by the invite
        assert guest.get(link.group(1)).status_code == 400  # used once
    db.refresh(invitee)
    assert invitee.password_hash is not None
    with pytest.raises(InviteError, match="expired"):
        token = make_invite_token(invitee, now=utcnow() - dt.timedelta(days=8))
        read_invite_token(db, token)
    with pytest.raises(InviteError, match="not valid"):
        read_invite_token(db, make_invite_token(invitee)[:-2] + "00", secret="another-secret")
    with pytest.raises(InviteError, match="not valid"):
        read_invite_token(db, "12.x.y")

    token = issue_token(db, invitee)
    db.commit()
    before = client.get(f"/api/v1/projects/{project.id}/pairs/next", headers=bearer(token))
    assert before.status_code == 204
    off = client.post(
        f"{url}/{invitee.id}/active",
        data={"csrf_token": csrf, "active": "false"},
        follow_redirects=False,
    )
    assert off.status_code == 303
    # The membership is off, the account is not: it still logs in and works elsewhere.
    db.refresh(invitee)
    assert invitee.is_active
    assert "deactivated" in client.get(url).text
    api = client.get(f"/api/v1/projects/{project.id}/pairs/next", headers=bearer(token))
    assert api.status_code == 403
    with TestClient(client.app, base_url="http://testserver") as guest:
        signed_in = guest.post(
            "/login",
            data={"email": email, "password": "annotator-pw-1"},
            follow_redirects=False,
        )
        assert signed_in.status_code == 303
        assert guest.get(f"/projects/{project.id}/vote").status_code == 403
    on = client.post(
        f"{url}/{invitee.id}/active",
        data={"csrf_token": csrf, "active": "true"},
        follow_redirects=False,
    )
    assert on.status_code == 303
    again = client.get(f"/api/v1/projects/{project.id}/pairs/next", headers=bearer(token))
    assert again.status_code == 204
    # Leads cannot deactivate themselves or other leads through this page.
    assert (
        client.post(
            f"{url}/{lead.id}/active", data={"csrf_token": csrf, "active": "false"}
        ).status_code
        == 404
    )


# -- jobs pages -------------------------------------------------------------------------------


def test_launch_job_form_validates_with_the_kind_schema(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    from app.jobs.models import Job

    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    model = ModelVersion(project_id=project.id, name="m1", base="toy", params={})
    db.add(model)
    db.commit()
    jobs_url = f"/projects/{project.id}/jobs"
    listing = client.get(jobs_url)
    assert "kind=generate" in listing.text and "kind=fit_ratings" in listing.text
    assert "kind=selftest" not in listing.text  # not a project job
    form = client.get(f"{jobs_url}/new", params={"kind": "generate"})
    # Every model is ticked to start with; defaults come from the schema.
    assert re.search(rf'name="model_ids" value="{model.id}" checked', form.text)
    assert 'name="images_per_prompt" value="2"' in form.text
    assert client.get(f"{jobs_url}/new", params={"kind": "selftest"}).status_code == 404
    assert client.get(f"{jobs_url}/new", params={"kind": "nope"}).status_code == 404

    post = {"csrf_token": csrf, "kind": "generate", "images_per_prompt": "2", "split": "train",
            "make_pairs": "1"}  # fmt: skip
    none = client.post(f"{jobs_url}/new", data=post)
    assert none.status_code == 422 and "at least 1 item" in none.text
    seeds = client.post(f"{jobs_url}/new", data={**post, "model_ids": str(model.id),
                                                  "seeds": "1"})  # fmt: skip
    assert seeds.status_code == 422
    assert re.search(
        r'data-field="seeds".*?needs exactly images_per_prompt seeds', seeds.text, re.S
    )
    assert 'value="1"' in seeds.text  # what was typed stays in the form
    words = client.post(f"{jobs_url}/new", data={**post, "model_ids": str(model.id),
                                                  "images_per_prompt": "many"})  # fmt: skip
    assert words.status_code == 422 and "valid integer" in words.text
    jobs = select(func.count()).select_from(Job).where(Job.project_id == project.id)
    assert not sent_jobs and db.scalar(jobs) == 0
    ok = client.post(
        f"{jobs_url}/new", data={**post, "model_ids": str(model.id)}, follow_redirects=False
    )
    assert ok.status_code == 303
    job_id = int(ok.headers["location"].rsplit("/", 1)[1])
    job = db.get(Job, job_id)
    assert (
        job is not None and job.params["model_ids"] == [model.id] and job.created_by_id == lead.id
    )
    assert sent_jobs == [(job_id, "gpu")]
    listing = client.get(jobs_url)
    assert f'data-job="{job_id}"' in listing.text and 'hx-trigger="every 3s"' in listing.text


def test_job_page_live_status_metrics_log_cancel_and_retry(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    from app.jobs.service import create_job

    client, lead, csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    job = create_job(db, kind="fit_ratings", params={}, project_id=project.id,
                     created_by_id=lead.id, max_attempts=3)  # fmt: skip
    job.status = "running"
    job.progress = 0.4
    job.log = [f"line {i}" for i in range(50)] + ["<b>not bold</b>"]
    job.metrics = {
        "loss": [[1, 0.69], [2, 0.6], [3, 0.5]],
        "implicit_acc": [[1, 0.5], [2, 0.6], [3, 0.7]],
        "model_err_w": [[1, 0.3], [2, 0.2], [3, 0.1]],
        "model_err_l": [[1, 0.3], [2, 0.35], [3, 0.4]],
    }
    db.commit()
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    html = page.text
    assert 'data-status="running"' in html and "40%" in html
    assert 'hx-trigger="every 1s"' in html
    assert "line 49" in html and "line 20" not in html  # the last lines only
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html
    figure = re.search(r'<figure class="plot" id="job-metrics">(.*?)</figure>', html, re.S)
    assert figure
    root = ET.fromstring(figure.group(1))
    titles = {t.text for t in root.iter("{http://www.w3.org/2000/svg}title")}
    assert {"loss", "implicit_acc", "model_err (winner / loser)"} <= titles
    assert f'action="/jobs/{job.id}/cancel"' in html and f"/jobs/{job.id}/retry" not in html
    partial = client.get(f"/jobs/{job.id}", headers={"HX-Request": "true"})
    assert partial.text.lstrip().startswith('<section id="job-status"')

    cancel = client.post(f"/jobs/{job.id}/cancel", data={"csrf_token": csrf},
                         follow_redirects=False)  # fmt: skip
    assert cancel.status_code == 303
    db.refresh(job)
    assert job.cancel_requested
    job.status = "cancelled"
    db.commit()
    done = client.get(f"/jobs/{job.id}").text
    assert "hx-trigger" not in done.split('id="job-status"')[1].split(">")[0]
    assert f'action="/jobs/{job.id}/retry"' in done
    again = client.post(f"/jobs/{job.id}/cancel", data={"csrf_token": csrf})
    assert again.status_code == 409 and "already cancelled" in again.text
    retry = client.post(f"/jobs/{job.id}/retry", data={"csrf_token": csrf},
                        follow_redirects=False)  # fmt: skip
    assert retry.status_code == 303
    db.refresh(job)
    assert job.status == "queued" and (job.id, "cpu") in sent_jobs


def test_every_project_job_kind_has_a_form_whose_defaults_validate() -> None:
    """What a browser posts from an untouched form is the schema's defaults, for every kind."""
    from starlette.datastructures import FormData

    from app.dashboard.forms import fields_for, parse_form
    from app.jobs.pages import project_kinds

    kinds = project_kinds()
    assert {"generate", "fit_ratings"} <= {k.name for k in kinds}
    for kind in kinds:
        fields = fields_for(kind.params, models=[(3, "m"), (4, "n")])
        posted: list[tuple[str, str]] = []
        for f in fields:
            if f.kind == "checkbox":
                posted += [(f.name, "1")] if f.value else []
            elif f.kind == "models":
                posted += [(f.name, "3"), (f.name, "4")] if f.required else []
            elif f.kind in ("select", "model"):
                chosen = f.value if any(v == f.value for v, _ in f.options) else f.options[0][0]
                posted.append((f.name, chosen))
            else:
                posted.append((f.name, f.value))
        raw, problems = parse_form(kind.params, FormData(posted))
        assert problems == {}, kind.name
        clean = kind.params.model_validate(raw)
        defaults = {
            key: info.get_default(call_default_factory=True)
            for key, info in kind.params.model_fields.items()
            if not info.is_required()
        }
        assert {k: getattr(clean, k) for k in defaults} == defaults, kind.name


def test_every_project_job_kind_form_renders(client: Any, db: Session, make_user: Any) -> None:
    from app.jobs.pages import project_kinds

    client, lead, _ = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    db.add_all(
        [ModelVersion(project_id=project.id, name=f"m{i}", base="toy", params={}) for i in (1, 2)]
    )
    db.commit()
    for kind in project_kinds():
        page = client.get(f"/projects/{project.id}/jobs/new", params={"kind": kind.name})
        assert page.status_code == 200, kind.name
        for key in kind.params.model_fields:
            assert f'data-field="{key}"' in page.text, (kind.name, key)
