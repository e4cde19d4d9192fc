"""Memberships per project (co-leads, roles, removal) and the account life cycle (own password,
admin resets and (de)activation, the Users page, the CLI)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.cli import main
from app.projects.models import Membership
from app.projects.schemas import ProjectCreate
from app.projects.service import add_member, create_project
from app.users import service as users
from app.users.models import User
from tests.support import bearer, login

PASSWORD = "a long enough password"


def test_leads_manage_co_leads_and_roles_by_api(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, lead_token = make_user("lead")
    colead, colead_token = make_user("lead")
    annotator, _ = make_user("annotator")
    project = create_project(db, data=ProjectCreate(name="shared"), creator=lead)
    db.commit()
    h = bearer(lead_token)
    members = f"/api/v1/projects/{project.id}/members"
    project_url = f"/api/v1/projects/{project.id}"
    assert client.get(project_url, headers=bearer(colead_token)).status_code == 403

    added = client.post(members, json={"email": colead.email, "role": "lead"}, headers=h)
    assert added.status_code == 201, added.text
    assert added.json() == {"user_id": colead.id, "role": "lead", "existing": True,
                            "invite_url": None}  # fmt: skip
    ch = bearer(colead_token)
    assert client.get(f"/api/v1/projects/{project.id}", headers=ch).status_code == 200
    # The co-lead manages members too.
    listed = client.get(members, headers=ch).json()
    assert {(m["user_id"], m["role"]) for m in listed} == {(lead.id, "lead"), (colead.id, "lead")}

    # An annotator account cannot lead (only an admin changes account roles).
    refused = client.post(members, json={"email": annotator.email, "role": "lead"}, headers=h)
    assert refused.status_code == 422 and "annotator account" in refused.json()["detail"]
    # A brand-new account comes with a one-time invite link, and no token.
    fresh = client.post(members, json={"email": "new-lead@example.com", "role": "lead"}, headers=h)
    assert fresh.status_code == 201 and fresh.json()["existing"] is False
    assert "/invite/" in fresh.json()["invite_url"] and "token" not in fresh.json()

    demote = client.patch(f"{members}/{colead.id}", json={"role": "annotator"}, headers=h)
    assert demote.status_code == 200 and demote.json()["role"] == "annotator"
    assert client.get(f"/api/v1/projects/{project.id}", headers=ch).status_code == 403
    assert client.delete(f"{members}/{colead.id}", headers=h).status_code == 204
    assert db.get(Membership, (project.id, colead.id)) is None
    assert client.delete(f"{members}/{colead.id}", headers=h).status_code == 404
    # The last active lead stays.
    new_lead = users.get_by_email(db, "new-lead@example.com")
    assert new_lead is not None
    client.delete(f"{members}/{new_lead.id}", headers=h)
    last = client.delete(f"{members}/{lead.id}", headers=h)
    assert last.status_code == 409 and "at least one active lead" in last.json()["detail"]
    off = client.patch(f"{members}/{lead.id}", json={"active": False}, headers=h)
    assert off.status_code == 409


def test_leads_manage_members_from_the_annotators_page(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, _ = make_user("lead", password=PASSWORD)
    colead, colead_token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="page"), creator=lead)
    db.commit()
    csrf = login(client, lead.email, PASSWORD)
    url = f"/projects/{project.id}"
    page = client.get(f"{url}/annotators")
    assert 'id="members"' in page.text and 'value="lead">co-lead' in page.text
    added = client.post(
        f"{url}/members", data={"csrf_token": csrf, "email": colead.email, "role": "lead"}
    )
    assert added.status_code == 200 and "already has an account" in added.text
    assert "/invite/" not in added.text
    assert f'data-member="{colead.id}"' in added.text
    project_url = f"/api/v1/projects/{project.id}"
    assert client.get(project_url, headers=bearer(colead_token)).status_code == 200
    role = client.post(
        f"{url}/members/{colead.id}/role",
        data={"csrf_token": csrf, "role": "annotator"},
        follow_redirects=False,
    )
    assert role.status_code == 303
    db.expire_all()
    membership = db.get(Membership, (project.id, colead.id))
    assert membership is not None and membership.role == "annotator"
    off = client.post(
        f"{url}/members/{colead.id}/active",
        data={"csrf_token": csrf, "active": "false"},
        follow_redirects=False,
    )
    assert off.status_code == 303
    db.expire_all()
    assert not db.get(Membership, (project.id, colead.id)).is_active  # type: ignore[union-attr]
    assert db.get(User, colead.id).is_active  # type: ignore[union-attr]
    gone = client.post(
        f"{url}/members/{colead.id}/remove", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert gone.status_code == 303
    alone = client.post(f"{url}/members/{lead.id}/remove", data={"csrf_token": csrf})
    assert alone.status_code == 409 and "at least one active lead" in alone.text


def test_changing_ones_password_ends_the_other_sessions(
    client: Any, app: Any, make_user: Any
) -> None:
    user, token = make_user("annotator", password=PASSWORD)
    csrf = login(client, user.email, PASSWORD)
    with TestClient(app, base_url="http://testserver") as other:
        login(other, user.email, PASSWORD)
        wrong = client.post(
            "/me/password",
            data={"csrf_token": csrf, "current": "nope", "password": "new password 1",
                  "confirm": "new password 1"},
        )  # fmt: skip
        assert wrong.status_code == 422 and "current password is wrong" in wrong.text
        done = client.post(
            "/me/password",
            data={"csrf_token": csrf, "current": PASSWORD, "password": "new password 1",
                  "confirm": "new password 1"},
        )  # fmt: skip
        assert done.status_code == 200 and "Password changed" in done.text
        assert client.get("/me/tokens").status_code == 200  # this session goes on
        assert other.get("/me/tokens", follow_redirects=False).status_code == 303  # not that one
    # By API: the current password is needed, whatever the token.
    h = bearer(token)
    body = {"current_password": PASSWORD, "new_password": "another one 2"}
    assert client.post("/api/v1/me/password", json=body, headers=h).status_code == 422
    body["current_password"] = "new password 1"
    assert client.post("/api/v1/me/password", json=body, headers=h).status_code == 204


def test_admins_reset_passwords_and_deactivate_accounts(
    client: Any, db: Session, make_user: Any
) -> None:
    admin, admin_token = make_user("admin", password=PASSWORD)
    lead, lead_token = make_user("lead", password=PASSWORD)
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    a = bearer(admin_token)
    url = f"/api/v1/users/{lead.id}/password-reset"
    assert client.post(url, headers=bearer(lead_token)).status_code == 403
    link = client.post(url, headers=a)
    assert link.status_code == 201
    path = re.search(r"(/invite/[^\s\"]+)", link.json()["url"])
    assert path
    with TestClient(client.app, base_url="http://testserver") as guest:
        done = guest.post(
            path.group(1), data={"password": "reset password 1", "confirm": "reset password 1"},
            follow_redirects=False,
        )  # fmt: skip
        assert done.status_code == 303
        assert guest.get(path.group(1)).status_code == 400  # one time only
    db.refresh(lead)
    assert users.authenticate(db, lead.email, "reset password 1") is not None

    listed = {u["email"]: u for u in client.get("/api/v1/users", headers=a).json()}
    assert listed[lead.email]["memberships"] == [
        {"project_id": project.id, "role": "lead", "active": True}
    ]
    assert listed[lead.email]["last_login_at"] is not None  # the reset link logged them in
    off = client.patch(f"/api/v1/users/{lead.id}", json={"is_active": False}, headers=a)
    assert off.status_code == 200 and off.json()["is_active"] is False
    assert client.get("/api/v1/projects", headers=bearer(lead_token)).status_code == 401
    self_off = client.patch(f"/api/v1/users/{admin.id}", json={"is_active": False}, headers=a)
    assert self_off.status_code == 409
    boss = client.patch(f"/api/v1/users/{lead.id}", json={"role": "boss"}, headers=a)
    assert boss.status_code == 422

    csrf = login(client, admin.email, PASSWORD)
    page = client.get("/admin/users")
    assert page.status_code == 200 and lead.email in page.text and "deactivated" in page.text
    assert 'href="/admin/users"' in page.text and 'href="/admin/audit"' in page.text
    on = client.post(
        f"/admin/users/{lead.id}", data={"csrf_token": csrf, "active": "true"},
        follow_redirects=False,
    )  # fmt: skip
    assert on.status_code == 303
    shown = client.post(f"/admin/users/{lead.id}/reset", data={"csrf_token": csrf})
    assert re.search(r'id="reset-link">[^<]*/invite/', shown.text)


def test_cli_password_and_deactivate(pg_url: str) -> None:
    from app.core.db import session_scope

    runner = CliRunner()
    email = f"cli-{uuid.uuid4().hex[:6]}@example.com"
    assert runner.invoke(main, ["user", "add", email, "--role", "annotator"]).exit_code == 0
    link = runner.invoke(main, ["user", "password", email])
    assert link.exit_code == 0 and "/invite/" in link.output
    typed = runner.invoke(main, ["user", "password", email, "--set"],
                          input="cli password 1\ncli password 1\n")  # fmt: skip
    assert typed.exit_code == 0, typed.output
    with session_scope() as session:
        assert users.authenticate(session, email, "cli password 1") is not None
    off = runner.invoke(main, ["user", "deactivate", email])
    assert off.exit_code == 0 and "deactivated" in off.output
    with session_scope() as session:
        assert users.authenticate(session, email, "cli password 1") is None
    on = runner.invoke(main, ["user", "deactivate", email, "--reactivate"])
    assert on.exit_code == 0
    with session_scope() as session:
        assert users.authenticate(session, email, "cli password 1") is not None
    missing = runner.invoke(main, ["user", "deactivate", "nobody@example.com"])
    assert missing.exit_code == 1 and "no user" in missing.output


def test_membership_is_per_project(client: Any, db: Session, make_user: Any) -> None:
    """Off in one project, on in the other: the same token votes where it is a member."""
    lead, lead_token = make_user("lead")
    annotator, token = make_user("annotator")
    one = create_project(db, data=ProjectCreate(name="one"), creator=lead)
    two = create_project(db, data=ProjectCreate(name="two"), creator=lead)
    for project in (one, two):
        add_member(db, project=project, user=annotator, role="annotator")
    db.commit()
    client.patch(
        f"/api/v1/projects/{one.id}/members/{annotator.id}",
        json={"active": False},
        headers=bearer(lead_token),
    )
    h = bearer(token)
    assert client.get(f"/api/v1/projects/{one.id}/pairs/next", headers=h).status_code == 403
    assert client.get(f"/api/v1/projects/{two.id}/pairs/next", headers=h).status_code == 204
