"""Projects, models, jobs and the auth rules of the JSON API (Postgres, rolled back per test)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.jobs.models import Job
from tests.support import bearer, login


def test_healthz_metrics_and_openapi(client) -> None:  # type: ignore[no-untyped-def]
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["database"] == "ok"
    assert health.json()["broker"] == "ok"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "prefloop_http_requests_total" in metrics.text
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/v1/projects",
        "/api/v1/projects/{project_id}/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/projects/{project_id}/models",
        "/api/v1/projects/{project_id}/prompts",
        "/api/v1/projects/{project_id}/annotators",
    ):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200


def test_lead_sets_up_a_project(client, make_user, db, sent_jobs) -> None:  # type: ignore[no-untyped-def]
    _, token = make_user("lead")
    h = bearer(token)
    project = client.post("/api/v1/projects", json={"name": "Shapes"}, headers=h)
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    assert project.json()["settings"]["votes_per_pair"] == 3
    prompts = client.post(
        f"/api/v1/projects/{pid}/prompts",
        json={"prompts": [{"text": "a red circle"}, {"text": "a blue square", "split": "test"}]},
        headers=h,
    )
    assert prompts.status_code == 201 and prompts.json() == {"created": 2}
    model = client.post(
        f"/api/v1/projects/{pid}/models",
        json={"name": "toy", "base": "toy", "params": {"steps": 10, "scheduler": "euler"}},
        headers=h,
    )
    assert model.status_code == 201, model.text
    assert model.json()["params"]["scheduler"] == "euler"
    dup = client.post(
        f"/api/v1/projects/{pid}/models", json={"name": "toy", "base": "x"}, headers=h
    )
    assert dup.status_code == 409
    annotator = client.post(
        f"/api/v1/projects/{pid}/annotators", json={"email": "ann@example.com"}, headers=h
    )
    assert annotator.status_code == 201 and annotator.json()["token"].startswith("pfl_")
    job = client.post(
        f"/api/v1/projects/{pid}/jobs", json={"kind": "fit_ratings", "params": {}}, headers=h
    )
    assert job.status_code == 202 and job.json()["status"] == "queued"
    job_id = job.json()["id"]
    # The message went out only after the row was committed.
    assert sent_jobs[-1] == (job_id, "cpu")
    assert db.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
    status = client.get(f"/api/v1/jobs/{job_id}", headers=h).json()
    assert {"id", "kind", "status", "progress", "metrics", "result", "error"} <= set(status)
    cancel = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=h)
    assert cancel.status_code == 202
    assert client.get(f"/api/v1/jobs/{job_id}", headers=h).json()["status"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=h)
    assert again.status_code == 409


def test_invalid_input_gets_422_naming_the_field(client, make_user) -> None:  # type: ignore[no-untyped-def]
    _, token = make_user("lead")
    h = bearer(token)
    bad = client.post(
        "/api/v1/projects", json={"name": "x", "settings": {"votes_per_pair": 0}}, headers=h
    )
    assert bad.status_code == 422
    assert "votes_per_pair" in str(bad.json()["detail"])
    pid = client.post("/api/v1/projects", json={"name": "p"}, headers=h).json()["id"]
    job = client.post(f"/api/v1/projects/{pid}/jobs", json={"kind": "nope"}, headers=h)
    assert job.status_code == 422 and "unknown job kind" in str(job.json()["detail"])
    job = client.post(
        f"/api/v1/projects/{pid}/jobs",
        json={"kind": "fit_ratings", "params": {"bootstrap": -1}},
        headers=h,
    )
    assert job.status_code == 422 and "bootstrap" in str(job.json()["detail"])
    model = client.post(
        f"/api/v1/projects/{pid}/models",
        json={"name": "m", "base": "toy", "params": {"scheduler": "warp"}},
        headers=h,
    )
    assert model.status_code == 422 and "scheduler" in str(model.json()["detail"])
    prompts = client.post(
        f"/api/v1/projects/{pid}/prompts", json={"prompts": [{"text": "  "}]}, headers=h
    )
    assert prompts.status_code == 422
    assert client.get("/api/v1/projects/999999", headers=h).status_code == 404
    assert client.get("/api/v1/jobs/999999", headers=h).status_code == 404


def test_role_checks(client, make_user) -> None:  # type: ignore[no-untyped-def]
    _, lead_token = make_user("lead")
    _, other_lead_token = make_user("lead")
    _, annotator_token = make_user("annotator")
    pid = client.post("/api/v1/projects", json={"name": "p"}, headers=bearer(lead_token)).json()[
        "id"
    ]
    # No token: 401 with a challenge.
    anon = client.post("/api/v1/projects", json={"name": "p"})
    assert anon.status_code == 401 and anon.headers["www-authenticate"] == "Bearer"
    # A bad token is 401 too, never a silent anonymous request.
    assert client.get("/api/v1/projects", headers=bearer("pfl_nope")).status_code == 401
    # An annotator on a lead endpoint: 403.
    assert (
        client.post(
            "/api/v1/projects", json={"name": "p"}, headers=bearer(annotator_token)
        ).status_code
        == 403
    )
    # A lead of another project: 403.
    other = client.post(
        f"/api/v1/projects/{pid}/jobs",
        json={"kind": "fit_ratings"},
        headers=bearer(other_lead_token),
    )
    assert other.status_code == 403
    # System jobs are for admins.
    assert (
        client.post(
            "/api/v1/jobs", json={"kind": "selftest"}, headers=bearer(lead_token)
        ).status_code
        == 403
    )


def test_cookie_posts_need_csrf(client, make_user) -> None:  # type: ignore[no-untyped-def]
    make_user("lead", email="lead@example.com", password="correct horse battery")
    csrf = login(client, "lead@example.com", "correct horse battery")
    cookie = client.cookies.get("prefloop_session")
    assert cookie
    denied = client.post("/api/v1/projects", json={"name": "p"})
    assert denied.status_code == 403 and "CSRF" in denied.json()["detail"]
    wrong = client.post("/api/v1/projects", json={"name": "p"}, headers={"X-CSRF-Token": "x" * 40})
    assert wrong.status_code == 403
    cross = client.post(
        "/api/v1/projects",
        json={"name": "p"},
        headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    ok = client.post("/api/v1/projects", json={"name": "p"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201, ok.text


def test_login_logout_and_cookie_flags(client, make_user) -> None:  # type: ignore[no-untyped-def]
    make_user("annotator", email="a@example.com", password="pass-word-123")
    assert client.get("/", follow_redirects=False).headers["location"].startswith("/login")
    bad = client.post("/login", data={"email": "a@example.com", "password": "wrong"})
    assert bad.status_code == 400 and "Wrong email or password" in bad.text
    good = client.post(
        "/login",
        data={"email": "a@example.com", "password": "pass-word-123"},
        follow_redirects=False,
    )
    assert good.status_code == 303
    set_cookie = good.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=lax" in set_cookie
    home = client.get("/")
    assert home.status_code == 200 and "a@example.com" in home.text
    csrf = home.text.split('name="csrf-token" content="')[1].split('"')[0]
    out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


@pytest.mark.slow
def test_login_is_rate_limited(client, make_user) -> None:  # type: ignore[no-untyped-def]
    make_user("lead", email="target@example.com", password="the-real-password")
    statuses = [
        client.post(
            "/login", data={"email": "target@example.com", "password": f"guess{i}"}
        ).status_code
        for i in range(12)
    ]
    assert statuses[:10] == [400] * 10 and statuses[-1] == 429
    # Even the right password waits out the limit.
    right = client.post(
        "/login", data={"email": "target@example.com", "password": "the-real-password"}
    )
    assert right.status_code == 429


def test_security_headers(client) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/login")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["vary"] == "HX-Request"
