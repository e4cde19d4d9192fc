"""Who may call what: EVERY route of the application × every kind of caller.

The route list is read from `app.routes` (API routes, pages, the OpenAPI documents and the static
mount), and every route must be classified in ACCESS below: a new route fails
`test_every_route_is_classified` until someone decides who may call it. Path parameters are
filled with real ids of a fixture project, so an "allowed" answer is about the data and a
refusal is about access.

Callers: anonymous, an annotator of the project, the lead of another project, the lead of the
project, an admin. Expectations by class:
- anonymous → 401 JSON (API) or 303 to /login (pages), except on public routes;
- a caller outside the class → 403 or 404, showing nothing of the project;
- a caller inside the class → the route's own answer (200 for reads; 2xx, 303 or a
  conflict/validation answer for writes), never 401/403.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.route_matrix import (
    ACCESS,
    ALLOWED,
    ALLOWED_STATUS,
    DEFAULT_WRITE,
    ROLES,
    ROUTES,
    World,
    build_world,
    is_api,
    request_kwargs,
)
from tests.support import bearer


def test_every_route_is_classified() -> None:
    """A new route fails here until it is put in ACCESS (and stale entries are removed)."""
    unclassified = sorted(set(ROUTES) - set(ACCESS))
    stale = sorted(set(ACCESS) - set(ROUTES))
    assert not unclassified, f"classify these routes in ACCESS: {unclassified}"
    assert not stale, f"these ACCESS entries name no route: {stale}"
    # The walk sees pages, the JSON API, the documents and the static mount.
    assert len(ROUTES) > 50
    assert ("GET", "/projects/{project_id}/dash/{section}") in ROUTES
    assert ("PUT", "/api/v1/votes/{vote_id}") in ROUTES
    assert ("GET", "/openapi.json") in ROUTES


@pytest.fixture()
def world(db: Session, make_user: Any) -> World:
    return build_world(db, make_user)


def check_access(client: Any, world: World, method: str, path: str, role: str) -> None:
    """One call of the route as `role`; an AssertionError says what was wrong."""
    route_class = ACCESS[(method, path)]
    url = path.format(**world.params)
    token = world.tokens[role]
    headers = {} if is_api(path) else {"Accept": "text/html"}
    if token is not None:
        headers.update(bearer(token))
    response = client.request(
        method, url, headers=headers, follow_redirects=False, **request_kwargs(method, path, world)
    )
    status = response.status_code
    assert status < 500, (status, response.text[:500])
    if role in ALLOWED[route_class]:
        expected = ALLOWED_STATUS.get((method, path), {200} if method == "GET" else DEFAULT_WRITE)
        assert status in expected, (status, response.text[:500])
        return
    if role == "anonymous":
        if is_api(path):
            assert status == 401, status
            assert response.headers["content-type"].startswith("application/json")
            assert response.headers.get("www-authenticate") == "Bearer"
        else:
            assert status == 303, status
            assert response.headers["location"].startswith("/login?next="), response.headers
        return
    assert status in (403, 404), (status, response.text[:500])
    if route_class == "owner" and role in ALLOWED["member"]:
        return  # a member refused someone else's vote gets their own vote page back
    # A refusal shows nothing of the project: no model names, prompts, images or annotators.
    for secret in (
        *world.ids["models"],
        "a guarded prompt",
        "/api/v1/images/",
        world.emails["annotator"],
    ):
        assert secret not in response.text, secret


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_route_access_by_role(
    client: Any, db: Session, world: World, method: str, path: str
) -> None:
    assert (method, path) in ACCESS, "unclassified route (see test_every_route_is_classified)"
    connection = db.get_bind()
    failures = []
    for role in ROLES:
        # Each caller meets the same world: what one call wrote is rolled back for the next.
        db.commit()
        savepoint = connection.begin_nested()  # type: ignore[union-attr]
        try:
            check_access(client, world, method, path, role)
        except AssertionError as exc:
            failures.append(f"{role}: {exc}")
        finally:
            savepoint.rollback()
            db.expunge_all()
    assert not failures, "\n".join(failures)


def test_images_of_another_project_are_not_found(client: Any, world: World) -> None:
    """An image id of another project answers like an unknown id, for every member role."""
    foreign = f"/api/v1/images/{world.ids['foreign_image']}"
    for role in ("annotator", "lead"):
        response = client.get(foreign, headers=bearer(world.tokens[role] or ""))
        assert response.status_code == 404, (role, response.status_code)
        unknown = client.get("/api/v1/images/" + "0" * 32, headers=bearer(world.tokens[role] or ""))
        assert unknown.status_code == 404 and unknown.json() == response.json()


def test_other_leads_cannot_reach_project_data_through_ids(client: Any, world: World) -> None:
    """Ids of the project used from the other lead's side: every answer is a refusal."""
    token = world.tokens["other_lead"] or ""
    p = world.params
    probes = [
        ("GET", f"/api/v1/jobs/{p['job_id']}"),
        ("GET", f"/api/v1/reward-models/{p['reward_model_id']}"),
        ("PUT", f"/api/v1/votes/{p['vote_id']}"),
        ("POST", f"/api/v1/pairs/{p['pair_id']}/votes"),
        ("GET", f"/api/v1/projects/{p['project_id']}/images"),
    ]
    bodies = {"PUT": {"choice": "right"}, "POST": {"choice": "left", "left_image_id": "x" * 32}}
    for method, url in probes:
        response = client.request(method, url, headers=bearer(token), json=bodies.get(method))
        assert response.status_code in (403, 404), (url, response.status_code)
    # And the project's lead cannot reach the other project.
    elsewhere = world.ids["elsewhere"]
    lead = bearer(world.tokens["lead"] or "")
    assert client.get(f"/api/v1/projects/{elsewhere}", headers=lead).status_code == 403
    assert client.get(f"/projects/{elsewhere}/vote", headers=lead).status_code == 403
