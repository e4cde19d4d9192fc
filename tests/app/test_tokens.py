"""API tokens are made by their owner (or an admin), named, listed without their secret,
revocable, and carry their last use."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project
from app.users.models import ApiToken
from tests.support import bearer, login

PASSWORD = "a long enough password"


def test_owner_creates_lists_uses_and_revokes_tokens(
    client: Any, db: Session, make_user: Any
) -> None:
    user, first = make_user("lead")
    h = bearer(first)
    created = client.post("/api/v1/me/tokens", json={"name": "ci script"}, headers=h)
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["token"]
    assert secret.startswith("pfl_") and secret.startswith(body["prefix"])
    assert body["name"] == "ci script" and body["last_used_at"] is None
    listed = client.get("/api/v1/me/tokens", headers=h)
    assert listed.status_code == 200
    assert secret not in listed.text and "token_hash" not in listed.text
    assert {t["name"] for t in listed.json()} >= {"ci script"}

    assert client.get("/api/v1/projects", headers=bearer(secret)).status_code == 200
    row = db.get(ApiToken, body["id"])
    db.refresh(row)
    assert row is not None and row.last_used_at is not None
    first_use = row.last_used_at
    # A second use within the minute writes nothing; one after it does.
    client.get("/api/v1/projects", headers=bearer(secret))
    db.refresh(row)
    assert row.last_used_at == first_use
    row.last_used_at = utcnow() - dt.timedelta(minutes=5)
    db.commit()
    client.get("/api/v1/projects", headers=bearer(secret))
    db.refresh(row)
    assert row.last_used_at > first_use - dt.timedelta(seconds=1)
    assert row.last_used_at > utcnow() - dt.timedelta(minutes=1)

    assert client.delete(f"/api/v1/me/tokens/{body['id']}", headers=h).status_code == 204
    assert client.get("/api/v1/projects", headers=bearer(secret)).status_code == 401
    assert client.post("/api/v1/me/tokens", json={"name": ""}, headers=h).status_code == 422
    # Someone else's token id is not found, and stays live.
    _, other = make_user("annotator")
    other_id = client.get("/api/v1/me/tokens", headers=bearer(other)).json()[0]["id"]
    assert client.delete(f"/api/v1/me/tokens/{other_id}", headers=h).status_code == 404
    assert client.get("/api/v1/me/tokens", headers=bearer(other)).status_code == 200


def test_admins_issue_tokens_for_others_and_nobody_else_does(
    client: Any, make_user: Any
) -> None:
    target, _ = make_user("annotator")
    _, admin = make_user("admin")
    _, lead = make_user("lead")
    url = f"/api/v1/users/{target.id}/tokens"
    assert client.post(url, json={"name": "x"}, headers=bearer(lead)).status_code == 403
    made = client.post(url, json={"name": "for a script"}, headers=bearer(admin))
    assert made.status_code == 201
    assert client.get("/api/v1/me/tokens", headers=bearer(made.json()["token"])).status_code == 200


def test_a_project_confined_token_cannot_manage_the_account(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, lead_token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    confined = client.post(
        f"/api/v1/projects/{project.id}/annotators",
        json={"email": "scripted@example.com"},
        headers=bearer(lead_token),
    ).json()["token"]
    h = bearer(confined)
    assert client.post("/api/v1/me/tokens", json={"name": "mine"}, headers=h).status_code == 403
    assert client.get("/api/v1/me/tokens", headers=h).status_code == 403
    assert client.get("/me/tokens", headers=h).status_code == 403
    assert client.post("/me/tokens", data={"name": "x"}, headers=h).status_code == 403


def test_my_tokens_page(client: Any, make_user: Any) -> None:
    user, _ = make_user("annotator", password=PASSWORD)
    csrf = login(client, user.email, PASSWORD)
    assert 'href="/me/tokens"' in client.get("/").text
    made = client.post("/me/tokens", data={"csrf_token": csrf, "name": "laptop"})
    assert made.status_code == 201
    secret = re.search(r'id="new-token">(pfl_[^<]+)<', made.text)
    assert secret, made.text
    page = client.get("/me/tokens")
    assert "laptop" in page.text and secret.group(1) not in page.text
    token_id = re.search(r'data-token="(\d+)"', page.text)
    assert token_id
    gone = client.post(
        f"/me/tokens/{token_id.group(1)}/revoke", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert gone.status_code == 303
    assert "revoked" in client.get("/me/tokens").text
    assert client.get("/api/v1/me/tokens", headers=bearer(secret.group(1))).status_code == 401
