"""Signed image URLs: a served pair's images without a database lookup, still blind and scoped."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from sqlalchemy import event

from app.images import signing
from tests.factories import build_world
from tests.support import bearer


def _served(client: Any, project_id: int, token: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/projects/{project_id}/pairs/next", headers=bearer(token))
    assert response.status_code == 200, response.text
    return response.json()


def _with(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return f"{parts.path}?{urlencode(query)}"


def test_signed_url_serves_the_png_without_credentials_or_sql(
    client: Any, db: Any, make_user: Any, engine: Any
) -> None:
    w = build_world(db, make_user, n_models=2, seeds=(0,))
    user, token = w.annotators[0]
    body = _served(client, w.project.id, token)
    url = body["left"]["url"]
    query = parse_qs(urlsplit(url).query)
    assert query["u"] == [str(user.id)]
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        image = client.get(url)  # no Authorization header, no cookie
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert statements == []
    # Blind: the content hash is the only validator, no file times.
    assert image.headers["etag"] == f'"{query["h"][0]}"'
    assert "last-modified" not in image.headers
    assert image.headers["cache-control"] == "private, max-age=86400"
    assert image.headers["x-content-type-options"] == "nosniff"
    # The member URL gives the same bytes and headers.
    member = client.get(f"/api/v1/images/{body['left']['image_id']}", headers=bearer(token))
    assert member.status_code == 200 and member.content == image.content
    assert member.headers["etag"] == image.headers["etag"]
    again = client.get(url, headers={"If-None-Match": image.headers["etag"]})
    assert again.status_code == 304


def test_a_changed_or_expired_url_is_no_key(client: Any, db: Any, make_user: Any) -> None:
    w = build_world(db, make_user, n_models=2, seeds=(0,))
    _, token = w.annotators[0]
    body = _served(client, w.project.id, token)
    url = body["left"]["url"]
    other_image = body["right"]["image_id"]
    forged = [
        _with(url, u="999999"),  # someone else's name on it
        _with(url, s="0" * 32),
        _with(url, e=str(int(time.time()) + 10**6)),  # a longer life
        url.replace(body["left"]["image_id"], other_image),  # another image, same signature
        _with(url, e=str(int(time.time()) - 1)),  # expired (and the signature no longer fits)
    ]
    for bad in forged:
        # No valid signature: the member check applies, and without credentials that is 401.
        assert client.get(bad).status_code == 401, bad
    # With credentials of a member the unsigned fallback still serves it.
    assert client.get(forged[1], headers=bearer(token)).status_code == 200


def test_signatures_expire_and_stay_stable_within_a_window() -> None:
    sha = "ab" * 32
    now = 1_700_000_000.0
    url = signing.signed_image_url("img1", sha, 7, now=now)
    # The same URL for a while (browser caches and the page's preloads hit), then a new one.
    assert signing.signed_image_url("img1", sha, 7, now=now + 1) == url
    q = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert signing.verified_sha256("img1", **q, now=now) == sha  # type: ignore[arg-type]
    expires = int(q["e"])
    assert signing.BUCKET_SECONDS < expires - now <= 2 * signing.BUCKET_SECONDS
    assert signing.verified_sha256("img1", **q, now=expires) is None  # type: ignore[arg-type]
    assert signing.verified_sha256("img2", **q, now=now) is None  # type: ignore[arg-type]
    assert signing.verified_sha256("img1", **{**q, "u": "8"}, now=now) is None  # type: ignore[arg-type]
    assert signing.verified_sha256("img1", **{**q, "u": "²"}, now=now) is None  # type: ignore[arg-type]
