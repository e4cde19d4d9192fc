"""Sessions, CSRF, login throttling, security headers, and secrets kept out of the logs."""

from __future__ import annotations

import logging
import re
import uuid
from http.cookies import SimpleCookie
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from app.cli import main
from app.core.config import get_settings
from app.core.deps import SESSION_COOKIE
from app.users import service as users
from app.users.invites import make_invite_token
from tests.route_matrix import (
    ACCESS,
    ALLOWED,
    ROUTES,
    World,
    build_world,
    request_kwargs,
)
from tests.support import bearer, login

PASSWORD = "correct horse battery staple"


def _cookie_attributes(set_cookie: str) -> dict[str, str | bool]:
    jar: SimpleCookie = SimpleCookie()
    jar.load(set_cookie)
    morsel = jar[SESSION_COOKIE]
    return {key: morsel[key] for key in ("httponly", "samesite", "secure", "path", "max-age")}


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:8000", "https://prefloop.example.org"])
def test_session_cookie_flags(
    client: Any, db: Session, make_user: Any, monkeypatch: pytest.MonkeyPatch, public_url: str
) -> None:
    monkeypatch.setattr(get_settings(), "public_base_url", public_url)
    https = public_url.startswith("https://")
    make_user("lead", email="flags@example.com", password=PASSWORD)
    invitee, _ = make_user("annotator")
    answers = {
        "login": client.post(
            "/login",
            data={"email": "flags@example.com", "password": PASSWORD},
            follow_redirects=False,
        ),
        "invite": client.post(
            f"/invite/{make_invite_token(invitee)}",
            data={"password": PASSWORD, "confirm": PASSWORD},
            follow_redirects=False,
        ),
    }
    for how, response in answers.items():
        assert response.status_code == 303, (how, response.text[:300])
        flags = _cookie_attributes(response.headers["set-cookie"])
        assert flags["httponly"] is True, how
        assert str(flags["samesite"]).lower() == "lax", how
        assert flags["path"] == "/", how
        assert int(flags["max-age"]) == get_settings().session_days * 86400, how
        # Secure exactly when the public address is https (a plain-http install must still log in).
        assert bool(flags["secure"]) is https, (how, flags)


def _signed_in(client: Any, cookie: str) -> bool:
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, cookie)
    response = client.get("/", follow_redirects=False)
    client.cookies.clear()
    return response.status_code == 200


def test_logout_ends_the_session_for_every_copy_of_the_cookie(client: Any, make_user: Any) -> None:
    make_user("lead", email="out@example.com", password=PASSWORD)
    csrf = login(client, "out@example.com", PASSWORD)
    cookie = client.cookies.get(SESSION_COOKIE)
    assert cookie and _signed_in(client, cookie)
    client.cookies.set(SESSION_COOKIE, cookie)
    out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert "Max-Age=0" in out.headers["set-cookie"] or "expires=" in out.headers["set-cookie"]
    # The stolen or kept copy of the cookie is worth nothing now: pages and the API refuse it.
    assert not _signed_in(client, cookie)
    client.cookies.set(SESSION_COOKIE, cookie)
    assert client.get("/api/v1/projects").status_code == 401


@pytest.mark.slow
def test_password_change_ends_every_session(client: Any, db: Session, make_user: Any) -> None:
    user, token = make_user("lead", email="change@example.com", password=PASSWORD)
    login(client, "change@example.com", PASSWORD)
    first = client.cookies.get(SESSION_COOKIE)
    client.cookies.clear()
    login(client, "change@example.com", PASSWORD)
    second = client.cookies.get(SESSION_COOKIE)
    assert first and second and first != second
    assert _signed_in(client, first) and _signed_in(client, second)
    users.set_password(db, user, "a brand new password")
    db.commit()
    assert not _signed_in(client, first) and not _signed_in(client, second)
    # The old password no longer logs in; the new one does.
    client.cookies.clear()
    old = client.post("/login", data={"email": "change@example.com", "password": PASSWORD})
    assert old.status_code == 400
    login(client, "change@example.com", "a brand new password")
    # API tokens are separate credentials, revoked on their own.
    assert client.get("/api/v1/projects", headers=bearer(token)).status_code == 200


@pytest.mark.slow
def test_login_spraying_many_accounts_from_one_address_is_throttled(
    client: Any, make_user: Any
) -> None:
    """The per-address limit stops guessing across accounts (the per-email one is tested apart)."""
    make_user("lead", email="victim@example.com", password=PASSWORD)
    limit = get_settings().login_attempts_per_minute
    statuses = [
        client.post(
            "/login", data={"email": f"user{k}@example.com", "password": "guess"}
        ).status_code
        for k in range(limit + 1)
    ]
    assert statuses[:limit] == [400] * limit and statuses[limit] == 429, statuses
    # Another account, with its right password, from the same address: still refused.
    right = client.post("/login", data={"email": "victim@example.com", "password": PASSWORD})
    assert right.status_code == 429 and "Too many failed attempts" in right.text


UNSAFE = [(m, p) for m, p in ROUTES if m not in ("GET", "HEAD", "OPTIONS")]
# Routes that never read the session, so there is nothing for a forged request to ride on.
NO_SESSION = {("POST", "/login"), ("POST", "/invite/{token}")}
WITH_SESSION = [route for route in UNSAFE if route not in NO_SESSION]


def test_every_unsafe_route_is_considered() -> None:
    assert len(UNSAFE) >= 25
    assert set(UNSAFE) >= NO_SESSION


@pytest.fixture()
def admin_session(client: Any, db: Session, make_user: Any) -> tuple[World, str]:
    world = build_world(db, make_user)
    make_user("admin", email="csrf-admin@example.com", password=PASSWORD)
    return world, login(client, "csrf-admin@example.com", PASSWORD)


@pytest.mark.parametrize(
    ("method", "path"), WITH_SESSION, ids=[f"{m} {p}" for m, p in WITH_SESSION]
)
def test_csrf_on_every_cookie_authenticated_write(
    client: Any, db: Session, admin_session: tuple[World, str], method: str, path: str
) -> None:
    world, csrf = admin_session
    url = path.format(**world.params)
    kwargs = request_kwargs(method, path, world)
    headers = {"Accept": "text/html"}
    forged = [
        ({}, "no token"),
        ({"X-CSRF-Token": "x" * 43}, "a wrong token"),
        ({"X-CSRF-Token": csrf, "Origin": "https://evil.example"}, "another origin"),
        ({"X-CSRF-Token": csrf, "Origin": "null"}, "an opaque origin"),
    ]
    connection = db.get_bind()
    for extra, what in forged:
        db.commit()
        savepoint = connection.begin_nested()  # type: ignore[union-attr]
        try:
            response = client.request(
                method, url, headers={**headers, **extra}, follow_redirects=False, **kwargs
            )
        finally:
            savepoint.rollback()
            db.expunge_all()
        assert response.status_code == 403, (what, response.status_code, response.text[:300])
        assert "CSRF" in response.text, what
    if "admin" in ALLOWED[ACCESS[(method, path)]]:
        # The same request with the session's token, from the same origin, is let through.
        sent = client.request(
            method,
            url,
            headers={**headers, "X-CSRF-Token": csrf, "Origin": "http://testserver"},
            follow_redirects=False,
            **kwargs,
        )
        assert sent.status_code not in (401, 403), (sent.status_code, sent.text[:300])


def test_csrf_token_in_a_form_field_works_and_is_per_session(client: Any, make_user: Any) -> None:
    make_user("lead", email="form@example.com", password=PASSWORD)
    csrf = login(client, "form@example.com", PASSWORD)
    created = client.post(
        "/projects/new", data={"name": "by form", "csrf_token": csrf}, follow_redirects=False
    )
    assert created.status_code == 303, created.text[:300]
    # A second session of the same user has its own token; the first one's does not fit it.
    client.cookies.clear()
    other = login(client, "form@example.com", PASSWORD)
    assert other != csrf
    stale = client.post("/projects/new", data={"name": "stale", "csrf_token": csrf})
    assert stale.status_code == 403


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def test_security_headers_on_pages_api_errors_files_and_redirects(
    client: Any, db: Session, make_user: Any
) -> None:
    world = build_world(db, make_user)
    lead = bearer(world.tokens["lead"] or "")
    pid = world.params["project_id"]
    answers = {
        "login page": client.get("/login"),
        "dashboard": client.get(f"/projects/{pid}", headers={**lead, "Accept": "text/html"}),
        "vote page": client.get(f"/projects/{pid}/vote", headers=lead),
        "redirect to login": client.get("/", follow_redirects=False),
        "html 404": client.get("/projects/999999", headers={**lead, "Accept": "text/html"}),
        "api json": client.get("/api/v1/projects", headers=lead),
        "api 401": client.get("/api/v1/projects"),
        "api 422": client.post("/api/v1/projects", json={}, headers=lead),
        "image": client.get(f"/api/v1/images/{world.params['image_id']}", headers=lead),
        "static file": client.get("/static/app.js"),
        "healthz": client.get("/healthz"),
    }
    for name, response in answers.items():
        assert response.status_code < 500, (name, response.status_code)
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header, response.headers)
        csp = response.headers.get("content-security-policy", "")
        directives = {d.strip().split(" ", 1)[0]: d.strip() for d in csp.split(";") if d.strip()}
        assert directives.get("frame-ancestors") == "frame-ancestors 'none'", (name, csp)
        assert directives.get("script-src") == "script-src 'self'", (name, csp)
        assert directives.get("object-src") == "object-src 'none'", (name, csp)
        assert "unsafe-eval" not in csp and "'unsafe-inline'" not in directives["script-src"]
    assert answers["image"].headers["content-type"] == "image/png"
    assert answers["image"].headers["cache-control"].startswith("private")


def _secrets_absent(caplog: pytest.LogCaptureFixture, secrets: list[str]) -> None:
    text = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records
    )
    assert caplog.records, "nothing was logged: the capture is not working"
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}...) is in the logs"


def test_passwords_and_tokens_stay_out_of_the_logs(
    client: Any, db: Session, make_user: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("prefloop.secrets-test").debug("capture check")
    wrong = "Wrong-Password-" + uuid.uuid4().hex
    lead, lead_token = make_user("lead", email="quiet@example.com", password=PASSWORD)
    failed = client.post("/login", data={"email": "quiet@example.com", "password": wrong})
    assert failed.status_code == 400
    csrf = login(client, "quiet@example.com", PASSWORD)
    session_cookie = client.cookies.get(SESSION_COOKIE) or ""
    created = client.post("/api/v1/projects", json={"name": "quiet"}, headers=bearer(lead_token))
    assert created.status_code == 201
    added = client.post(
        f"/api/v1/projects/{created.json()['id']}/annotators",
        json={"email": "quiet-annotator@example.com"},
        headers=bearer(lead_token),
    )
    assert added.status_code == 201
    annotator_token = added.json()["token"]
    refused = client.get("/api/v1/projects", headers=bearer(lead_token + "x"))
    assert refused.status_code == 401
    client.post("/logout", data={"csrf_token": csrf})
    _secrets_absent(
        caplog, [PASSWORD, wrong, lead_token, annotator_token, session_cookie, lead_token + "x"]
    )


def test_cli_user_add_token_stays_out_of_the_logs(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("prefloop.secrets-test").debug("capture check")
    password = "Cli-Password-" + uuid.uuid4().hex
    email = f"cli-{uuid.uuid4().hex[:6]}@example.com"
    result = CliRunner().invoke(
        main, ["user", "add", email, "--role", "lead", "--token", "--password", password]
    )
    assert result.exit_code == 0, result.output
    token = re.search(r"token: (pfl_\S+)", result.output)
    assert token, result.output
    again = CliRunner().invoke(main, ["user", "token", email])
    assert again.exit_code == 0
    _secrets_absent(caplog, [password, token.group(1), again.output.strip()])
