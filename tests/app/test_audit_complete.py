"""Every state-changing route leaves exactly one audit row, with actor, project and address.

The write routes are read from the app (a new one is walked without anyone listing it); each
is called once by a caller allowed to use it, on a state where it succeeds, and the rows it
added are counted. Routes left out say why.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.jobs.models import Job
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project
from app.users import service as users
from app.users.models import User
from tests.route_matrix import (
    ACCESS,
    ALLOWED,
    ROUTES,
    World,
    build_world,
    is_api,
    request_kwargs,
)
from tests.support import bearer

# Reads that hand data out of the platform count as actions too.
AUDITED_READS = {("GET", "/api/v1/projects/{project_id}/export")}

NOT_AUDITED = {
    # An annotator's vote is stored with its author and time; it is data, not an action of a
    # lead or admin.
    ("POST", "/api/v1/pairs/{pair_id}/votes"): "annotator data",
    ("PUT", "/api/v1/votes/{vote_id}"): "annotator data",
    ("POST", "/projects/{project_id}/vote"): "annotator data",
    ("POST", "/projects/{project_id}/vote/change/{vote_id}"): "annotator data",
    # Without a browser session there is nothing to end (with one it records "logout").
    ("POST", "/logout"): "no state for a bearer caller",
}

# Deleting a project needs one that holds no work: the fixture's holds images, votes and jobs.
ON_EMPTY_PROJECT = {
    ("DELETE", "/api/v1/projects/{project_id}"),
    ("POST", "/projects/{project_id}/delete"),
}

LEAD_PASSWORD = "the lead's password"
SUCCESS = set(range(200, 300)) | {303}


def _caller(route_class: str) -> str:
    """Who calls a route of this class in the test: the least powerful caller allowed."""
    for role in ("anonymous", "lead", "annotator", "admin"):
        if role in ALLOWED[route_class]:
            return role
    raise AssertionError(route_class)


def _kwargs(method: str, path: str, world: World) -> dict[str, Any]:
    if path == "/login":
        return {"data": {"email": world.emails["lead"], "password": LEAD_PASSWORD}}
    if path in ("/api/v1/me/password", "/me/password"):
        new = "a brand new password"
        if is_api(path):
            return {"json": {"current_password": LEAD_PASSWORD, "new_password": new}}
        return {"data": {"current": LEAD_PASSWORD, "password": new, "confirm": new}}
    return request_kwargs(method, path, world)


def _count(db: Session) -> int:
    return int(db.scalar(select(func.count()).select_from(AuditEvent)) or 0)


WRITES = sorted(
    r for r in ROUTES if (r[0] != "GET" or r in AUDITED_READS) and r not in NOT_AUDITED
)


def test_not_audited_routes_exist() -> None:
    assert set(NOT_AUDITED) <= set(ROUTES)
    assert len(WRITES) > 30


@pytest.mark.slow
def test_every_write_route_leaves_exactly_one_audit_row(
    client: Any, db: Session, make_user: Any
) -> None:
    world = build_world(db, make_user, name="audited")
    lead: User = world.ids["lead_user"]
    users.set_password(db, lead, LEAD_PASSWORD)
    lead_id = lead.id
    db.commit()
    connection = db.get_bind()
    failures = []
    for method, path in WRITES:
        role = _caller(ACCESS[(method, path)])
        db.commit()
        savepoint = connection.begin_nested()  # type: ignore[union-attr]
        try:
            if path.endswith("/retry"):
                job = db.get(Job, world.params["job_id"])
                assert job is not None
                job.status = "failed"
                db.flush()
            params = dict(world.params)
            if (method, path) in ON_EMPTY_PROJECT:
                creator = db.get(User, lead_id)
                assert creator is not None
                empty = create_project(db, data=ProjectCreate(name="empty"), creator=creator)
                db.flush()
                params["project_id"] = empty.id
            before = _count(db)
            token = world.tokens[role]
            headers = bearer(token) if token else {}
            if not is_api(path):
                headers["Accept"] = "text/html"
            response = client.request(
                method,
                path.format(**params),
                headers=headers,
                follow_redirects=False,
                **_kwargs(method, path, world),
            )
            if response.status_code not in SUCCESS:
                failures.append(f"{method} {path} as {role}: {response.status_code}")
                continue
            rows = list(
                db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(5))
            )
            added = _count(db) - before
            if added != 1:
                failures.append(f"{method} {path}: {added} audit rows")
                continue
            event = rows[0]
            if not event.address:
                failures.append(f"{method} {path}: no address")
            if role != "anonymous" and event.actor_id is None:
                failures.append(f"{method} {path}: no actor")
            if "{project_id}" in path and event.project_id != params["project_id"]:
                failures.append(f"{method} {path}: project {event.project_id}")
        finally:
            db.rollback()
            if savepoint.is_active:
                savepoint.rollback()
            db.expunge_all()
    assert not failures, "\n".join(failures)


def test_the_audit_page_filters_and_pages(client: Any, db: Session, make_user: Any) -> None:
    from app.audit.service import record

    admin, admin_token = make_user("admin")
    lead, _ = make_user("lead")
    for n in range(130):
        record(db, actor=lead, action="model.create", target=f"model:{n}", project_id=7)
    record(db, actor=admin, action="project.create", target="project:8", project_id=8)
    db.commit()
    h = bearer(admin_token)
    page = client.get("/admin/audit", params={"project_id": "7"}, headers=h)
    assert page.status_code == 200
    assert page.text.count("data-event=") == 100 and 'rel="next"' in page.text
    second = client.get("/admin/audit", params={"project_id": "7", "page": 2}, headers=h)
    assert second.text.count("data-event=") == 30 and 'rel="next"' not in second.text
    assert 'rel="prev"' in second.text
    by_actor = client.get("/api/v1/audit", params={"actor": admin.email}, headers=h).json()
    assert [e["action"] for e in by_actor] == ["project.create"]
    by_action = client.get(
        "/api/v1/audit", params={"action": "model.create", "limit": 5, "offset": 125}, headers=h
    ).json()
    assert len(by_action) == 5 and all(e["project_id"] == 7 for e in by_action)
