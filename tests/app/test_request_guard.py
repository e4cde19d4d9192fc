"""The smaller holes: oversized and anonymous bodies, NUL characters, huge ids, prompt limits,
job parameters the worker would reject, the login throttle and its client address, login CSRF,
blind image headers, the selftest."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import make_engine
from app.core.guard import RequestGuard, client_address, parse_proxies
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.service import store_image
from app.projects.models import Prompt
from app.projects.schemas import PROMPT_TEXT_MAX, ProjectCreate
from app.projects.service import create_project
from app.users import service as users
from app.users.models import LoginAttempt
from tests.factories import Backend, tiny_png, user_factory
from tests.support import bearer

LIMIT = 4096


def _asgi(guard: RequestGuard, method: str, path: str, headers: dict[str, str],
          chunks: list[bytes]) -> tuple[int, int, bool]:  # fmt: skip
    """Run one request through the guard: (status, chunks read, whether the app ran)."""
    read = 0
    ran = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        body = chunks[read - 1] if read <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, rcv: Any, snd: Any) -> None:
        nonlocal ran
        ran = True
        from fastapi import HTTPException

        try:
            while True:
                message = await rcv()
                if not message.get("more_body"):
                    break
        except HTTPException as exc:
            await snd({"type": "http.response.start", "status": exc.status_code, "headers": []})
            await snd({"type": "http.response.body", "body": b""})
            return
        await snd({"type": "http.response.start", "status": 200, "headers": []})
        await snd({"type": "http.response.body", "body": b""})

    guard.app = app
    scope = {
        "type": "http", "method": method, "path": path, "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("10.0.0.9", 1234),
    }  # fmt: skip
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], read, ran


def test_bodies_are_refused_before_they_are_read() -> None:
    guard = RequestGuard(lambda *a: None, max_body=LIMIT, proxies=[])  # type: ignore[arg-type]
    big = str(LIMIT * 1000)
    # Anonymous: refused from the headers, whatever the size, without reading a byte.
    assert _asgi(guard, "POST", "/api/v1/projects", {"content-length": big}, [b"x"]) == (
        401, 0, False,
    )  # fmt: skip
    assert _asgi(guard, "POST", "/projects/new", {}, [b"x"])[:2] == (303, 0)
    # Signed in but too big by Content-Length: refused unread.
    auth = {"authorization": "Bearer pfl_x"}
    assert _asgi(guard, "POST", "/api/v1/projects", {**auth, "content-length": big}, [b"x"]) == (
        413, 0, False,
    )  # fmt: skip
    # No Content-Length (chunked): cut off as soon as the count passes the limit.
    chunks = [b"x" * 32 * 1024] * 100
    status, read, ran = _asgi(guard, "POST", "/api/v1/projects", auth, chunks)
    assert status == 413 and ran and read < 10
    # Within the limit it goes through.
    assert _asgi(guard, "POST", "/api/v1/projects", auth, [b"{}"])[0] == 200
    # Logging in needs no credentials.
    assert _asgi(guard, "POST", "/login", {}, [b"email=a"])[0] == 200


def test_an_oversized_body_gets_413_from_the_app(client: Any, make_user: Any) -> None:
    from app.core.config import get_settings

    _, token = make_user("lead")
    limit = get_settings().max_upload_bytes

    def stream() -> Any:
        for _ in range(limit // (1 << 20) + 2):
            yield b" " * (1 << 20)

    answer = client.post(
        "/api/v1/projects", content=stream(),
        headers={**bearer(token), "content-type": "application/json"},
    )  # fmt: skip
    assert answer.status_code == 413 and "over the limit" in answer.json()["detail"]
    anonymous = client.post("/api/v1/projects", content=b"{" + b" " * 1000 + b"}")
    assert anonymous.status_code == 401


def test_nul_characters_and_huge_ids_are_refused_on_both_databases(backend: Backend) -> None:  # noqa: F811
    db, client = backend.db, backend.client
    make = user_factory(db)
    lead, token = make("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    h = bearer(token)
    for body in ({"name": "a\u0000b"}, {"name": "ok", "description": "x\u0000"}):
        answer = client.post("/api/v1/projects", json=body, headers=h)
        assert answer.status_code == 422 and "NUL" in answer.json()["detail"]
    prompts = client.post(
        f"/api/v1/projects/{project.id}/prompts", json={"prompts": [{"text": "a\u0000"}]}, headers=h
    )
    assert prompts.status_code == 422
    assert client.get("/api/v1/projects?x=%00", headers=h).status_code == 422
    uploaded = client.post(
        f"/api/v1/projects/{project.id}/prompts/upload",
        files={"file": ("p.txt", b"a red\x00 square\n", "text/plain")},
        headers=h,
    )
    assert uploaded.status_code == 422
    stored = select(func.count()).select_from(Prompt).where(Prompt.project_id == project.id)
    assert db.scalar(stored) == 0
    for huge in (2**63, 2**64 + 5, 10**30):
        for path in ("projects/{}", "jobs/{}", "reward-models/{}", "projects/{}/leaderboard"):
            url = "/api/v1/" + path.format(huge)
            answer = client.get(url, headers=h)
            assert answer.status_code in (404, 422), (backend.name, url, answer.status_code)


def test_prompt_texts_and_tags_have_length_limits(client: Any, db: Session, make_user: Any) -> None:
    lead, token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    url = f"/api/v1/projects/{project.id}/prompts"
    h = bearer(token)
    long_text = {"prompts": [{"text": "x" * (PROMPT_TEXT_MAX + 1)}]}
    assert client.post(url, json=long_text, headers=h).status_code == 422
    long_tag = {"prompts": [{"text": "ok", "tags": ["t" * 101]}]}
    assert client.post(url, json=long_tag, headers=h).status_code == 422
    ok = {"prompts": [{"text": "ok", "tags": ["t" * 100]}]}
    assert client.post(url, json=ok, headers=h).status_code == 201


def test_imported_captions_have_the_same_limit() -> None:
    from app.exports.importers import _row_meta

    row = {"caption": "x" * (PROMPT_TEXT_MAX + 1), "image_0_uid": "a", "image_1_uid": "b"}
    with pytest.raises(ValueError, match="longer than"):
        _row_meta(row)


def test_job_params_the_worker_would_reject_are_422(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    model = ModelVersion(project_id=project.id, name="m", base="toy", params={})
    db.add(model)
    db.commit()
    url = f"/api/v1/projects/{project.id}/jobs"
    h = bearer(token)
    bad = [
        ("generate", {"model_ids": [model.id], "images_per_prompt": 1, "seeds": [-1]}, "seeds"),
        ("generate", {"model_ids": [model.id], "images_per_prompt": 1, "seeds": [2**31]}, "seeds"),
        ("generate", {"model_ids": [model.id, model.id]}, "model_ids"),
        ("fit_ratings", {"prior": 1e-300}, "prior"),
        ("fit_ratings", {"seed": 2**31}, "seed"),
        ("evaluate", {"model_ids": [model.id, model.id]}, "model_ids"),
        ("train_dpo", {"model_id": model.id, "seed": -5}, "seed"),
    ]
    for kind, params, field in bad:
        answer = client.post(url, json={"kind": kind, "params": params}, headers=h)
        assert answer.status_code == 422, (kind, params, answer.text)
        assert field in str(answer.json()["detail"]), (kind, answer.text)
    ok = {"model_ids": [model.id], "images_per_prompt": 1, "seeds": [2**31 - 1]}
    assert client.post(url, json={"kind": "generate", "params": ok}, headers=h).status_code == 202


def test_selftest_is_for_admins_and_bounded(client: Any, db: Session, make_user: Any) -> None:
    lead, lead_token = make_user("lead")
    _, admin_token = make_user("admin")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    db.commit()
    as_project = client.post(
        f"/api/v1/projects/{project.id}/jobs", json={"kind": "selftest"}, headers=bearer(lead_token)
    )
    assert as_project.status_code == 422 and "system job" in as_project.text
    assert client.post("/api/v1/jobs", json={"kind": "selftest"},
                       headers=bearer(lead_token)).status_code == 403  # fmt: skip
    a = bearer(admin_token)
    long = {"kind": "selftest", "params": {"steps": 1000, "sleep": 10}}
    assert client.post("/api/v1/jobs", json=long, headers=a).status_code == 422
    assert client.post("/api/v1/jobs", json={"kind": "selftest"}, headers=a).status_code == 202


def test_client_address_believes_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = parse_proxies("10.0.0.0/8, 192.168.1.5")
    assert client_address("203.0.113.7", "1.2.3.4", proxies) == "203.0.113.7"
    assert client_address("10.1.2.3", "1.2.3.4", proxies) == "1.2.3.4"
    # The client may write its own X-Forwarded-For; the last untrusted hop is the client.
    assert client_address("10.1.2.3", "6.6.6.6, 1.2.3.4, 192.168.1.5", proxies) == "1.2.3.4"
    assert client_address("10.1.2.3", "1.2.3.4", []) == "10.1.2.3"
    assert client_address("127.0.0.1", "1.2.3.4", []) == "127.0.0.1"


@pytest.mark.slow
def test_spoofed_forwarded_for_does_not_escape_the_login_throttle(
    client: Any, make_user: Any
) -> None:
    from app.core.config import get_settings

    limit = get_settings().login_attempts_per_minute
    statuses = []
    for n in range(limit + 2):
        email = f"nobody-{n}-{uuid.uuid4().hex[:4]}@example.com"
        answer = client.post(
            "/login", data={"email": email, "password": "wrong-password"},
            headers={"X-Forwarded-For": f"198.51.100.{n}"},
        )  # fmt: skip
        statuses.append(answer.status_code)
    # Per address: the forged header is ignored, so the test client's address hits the limit.
    assert statuses[:limit] == [400] * limit and statuses[limit] == 429, statuses


def test_the_login_form_checks_origin(client: Any, make_user: Any) -> None:
    user, _ = make_user("lead", password="a long enough password")
    form = {"email": user.email, "password": "a long enough password"}
    foreign = client.post(
        "/login", data=form, headers={"Origin": "https://evil.example"}, follow_redirects=False
    )
    assert foreign.status_code == 403 and "prefloop_session" not in foreign.headers.get(
        "set-cookie", ""
    )
    same = client.post(
        "/login", data=form, headers={"Origin": "http://testserver"}, follow_redirects=False
    )
    assert same.status_code == 303


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_the_login_throttle_counts_parallel_guesses_atomically(
    database: str, pg_url: str, tmp_path: Path
) -> None:
    """Thirty guesses at once, a limit of ten: exactly ten are checked."""
    from sqlalchemy.orm import sessionmaker

    from app.core.migrate import upgrade_head

    if database == "postgres":
        engine = make_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    else:
        url = f"sqlite:///{tmp_path / 'throttle.db'}"
        upgrade_head(url)
        engine = make_engine(url)
    factory = sessionmaker(bind=engine)
    key = f"email:race-{uuid.uuid4().hex}@example.com"
    start = threading.Barrier(30)
    passed: list[bool] = []
    lock = threading.Lock()

    def guess() -> None:
        start.wait()
        with factory() as session:
            try:
                users.claim_login_attempt(session, [key], limit=10)
                ok = True
            except users.TooManyAttempts:
                ok = False
            session.commit()
        with lock:
            passed.append(ok)

    threads = [threading.Thread(target=guess) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(passed) == 30 and passed.count(True) == 10, passed.count(True)
    with factory() as session:
        count = session.scalar(
            select(func.count()).select_from(LoginAttempt).where(LoginAttempt.key == key)
        )
        assert count == 30
    engine.dispose()


def test_image_responses_carry_only_the_content_hash(
    client: Any, db: Session, make_user: Any
) -> None:
    lead, token = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    prompt = Prompt(project_id=project.id, text="a red square", split="train", tags=[])
    db.add(prompt)
    db.flush()
    image = store_image(
        db, get_media_store(), project_id=project.id, prompt_id=prompt.id, png=tiny_png(3)
    )
    db.commit()
    url = f"/api/v1/images/{image.id}"
    answer = client.get(url, headers=bearer(token))
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    assert "last-modified" not in answer.headers
    assert answer.headers["etag"] == f'"{image.sha256}"'
    again = client.get(url, headers={**bearer(token), "If-None-Match": f'"{image.sha256}"'})
    assert again.status_code == 304 and again.content == b""
