"""Lead and admin actions land in the audit log; only admins can read it; no secrets in it."""

from __future__ import annotations

from tests.support import bearer


def test_actions_are_audited_and_visible_to_admins(client, make_user) -> None:  # type: ignore[no-untyped-def]
    lead, lead_token = make_user("lead")
    _, admin_token = make_user("admin")
    h = bearer(lead_token)
    pid = client.post("/api/v1/projects", json={"name": "audited"}, headers=h).json()["id"]
    client.post(
        f"/api/v1/projects/{pid}/annotators", json={"email": "ann-audit@example.com"}, headers=h
    )
    job = client.post(
        f"/api/v1/projects/{pid}/jobs", json={"kind": "fit_ratings"}, headers=h
    ).json()
    client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=h)
    client.post(f"/api/v1/jobs/{job['id']}/retry", headers=h)

    assert client.get("/api/v1/audit", headers=h).status_code == 403
    events = client.get("/api/v1/audit", headers=bearer(admin_token)).json()
    mine = [e for e in events if e["actor"] == lead.email]
    actions = [e["action"] for e in reversed(mine)]
    assert actions == ["project.create", "member.add", "job.launch", "job.cancel", "job.retry"]
    assert all("token" not in str(e["details"]) for e in events)
    page = client.get("/admin/audit", headers=bearer(admin_token))
    assert page.status_code == 200 and "job.cancel" in page.text
    assert client.get("/admin/audit", headers=h).status_code == 403


def test_secrets_are_never_stored(db, make_user) -> None:  # type: ignore[no-untyped-def]
    from app.audit.service import record

    user, _ = make_user("admin")
    event = record(
        db,
        actor=user,
        action="user.add",
        details={"password": "hunter2", "token": "x", "role": "lead"},
    )
    assert event.details == {"role": "lead"}
