"""Credentials go to their owner only: adding someone to a project never hands the lead a token,
an invite link or a password for an account that existed before."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.projects.models import Membership
from app.projects.schemas import ProjectCreate
from app.projects.service import add_member, create_project
from app.users import service as users
from app.users.models import ApiToken
from tests.support import bearer, login

PASSWORD = "a long enough password"


def _tokens(db: Session, user_id: int) -> int:
    return db.scalar(select(func.count()).where(ApiToken.user_id == user_id)) or 0


def test_adding_an_existing_account_by_api_returns_no_token(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, lead_token = make_user("lead")
    admin, admin_token = make_user("admin")
    other_lead, _ = make_user("lead")
    stranger, _ = make_user("annotator")
    project = create_project(db, data=ProjectCreate(name="mine"), creator=lead)
    elsewhere = create_project(db, data=ProjectCreate(name="theirs"), creator=other_lead)
    add_member(db, project=elsewhere, user=stranger, role="annotator")
    db.commit()
    url = f"/api/v1/projects/{project.id}/annotators"
    for victim in (admin, other_lead, stranger):
        before = _tokens(db, victim.id)
        answer = client.post(url, json={"email": victim.email.upper()}, headers=bearer(lead_token))
        assert answer.status_code == 201, answer.text
        assert answer.json() == {"user_id": victim.id, "token": None, "existing": True}
        assert "pfl_" not in answer.text and "/invite/" not in answer.text
        assert _tokens(db, victim.id) == before
        db.refresh(victim)
        assert victim.password_hash is None or victim.password_changed_at is None
        assert db.get(Membership, (project.id, victim.id)) is not None
    # The admin's own token still works and nothing else does for them.
    assert client.get("/api/v1/audit", headers=bearer(admin_token)).status_code == 200
    assert client.get("/api/v1/audit", headers=bearer(lead_token)).status_code == 403


def test_a_new_account_comes_with_a_token_confined_to_the_project(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, lead_token = make_user("lead")
    other_lead, other_token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="mine"), creator=lead)
    elsewhere = create_project(db, data=ProjectCreate(name="theirs"), creator=other_lead)
    db.commit()
    created = client.post(
        f"/api/v1/projects/{project.id}/annotators",
        json={"email": "fresh@example.com"},
        headers=bearer(lead_token),
    )
    assert created.status_code == 201
    body = created.json()
    assert body["existing"] is False and body["token"].startswith("pfl_")
    token = body["token"]
    mine = client.get(f"/api/v1/projects/{project.id}/pairs/next", headers=bearer(token))
    assert mine.status_code == 204
    # The account later joins another project: the lead's token does not follow it there.
    joined = client.post(
        f"/api/v1/projects/{elsewhere.id}/annotators",
        json={"email": "fresh@example.com"},
        headers=bearer(other_token),
    )
    assert joined.json() == {"user_id": body["user_id"], "token": None, "existing": True}
    theirs = client.get(f"/api/v1/projects/{elsewhere.id}/pairs/next", headers=bearer(token))
    assert theirs.status_code == 403


def test_the_form_flow_gives_no_invite_for_an_existing_account(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, _ = make_user("lead", password=PASSWORD)
    other_lead, _ = make_user("lead")
    admin, _ = make_user("admin")
    project = create_project(db, data=ProjectCreate(name="mine"), creator=lead)
    elsewhere = create_project(db, data=ProjectCreate(name="theirs"), creator=other_lead)
    # An annotator of another project who has not set a password yet.
    passwordless = users.create_user(db, email="pending@example.com", role="annotator")
    add_member(db, project=elsewhere, user=passwordless, role="annotator")
    db.commit()
    csrf = login(client, lead.email, PASSWORD)
    url = f"/projects/{project.id}/annotators"
    for victim in (passwordless, admin, other_lead):
        page = client.post(url, data={"csrf_token": csrf, "email": victim.email})
        assert page.status_code == 200
        assert "/invite/" not in page.text, victim.email
        assert "already has an account" in page.text
    # Nor on asking for a new link explicitly.
    again = client.post(f"{url}/{passwordless.id}/invite", data={"csrf_token": csrf})
    assert again.status_code == 409 and "/invite/" not in again.text
    # A brand-new account does get its one-time link.
    fresh = client.post(url, data={"csrf_token": csrf, "email": "brand-new@example.com"})
    assert re.search(r'id="invite-link">[^<]*/invite/', fresh.text)
