"""Who may open the lead's pages and the job routes: every route × every role.

The route list is read from the application itself, so a new dashboard, setup or job route is
tested here as soon as it exists (and fails until it has a request body below, if it takes one).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.generators.models import ModelVersion
from app.jobs.service import create_job
from app.projects.models import Prompt
from app.projects.schemas import ProjectCreate
from app.projects.service import add_member, create_project
from tests.route_matrix import ROLES
from tests.route_matrix import ROUTES as ALL_ROUTES
from tests.support import bearer

# The annotator's own pages: every member may open them (tested with the vote page).
ANNOTATOR_PAGES = re.compile(r"^/projects/\{project_id\}/(vote|me)(/|$)")
SCOPED = re.compile(
    r"^(/projects/\{project_id\}|/jobs/\{job_id\}|/api/v1/jobs/\{job_id\}"
    r"|/api/v1/projects/\{project_id\}/jobs)(/|$)"
)
# Pages outside any project that only leads and admins may open.
LEAD_ONLY = {"/projects/new"}

# What each writing route needs to get past input validation, so the answer is about access.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/projects/new"): {"data": {"name": "authz"}},
    ("POST", "/projects/{project_id}/annotators"): {"data": {"email": "invitee@example.com"}},
    ("POST", "/projects/{project_id}/annotators/{user_id}/active"): {"data": {"active": "true"}},
    ("POST", "/projects/{project_id}/annotators/{user_id}/invite"): {},
    ("POST", "/projects/{project_id}/members"): {
        "data": {"email": "member@example.com", "role": "annotator"}
    },
    ("POST", "/projects/{project_id}/members/{user_id}/active"): {"data": {"active": "true"}},
    ("POST", "/projects/{project_id}/members/{user_id}/role"): {"data": {"role": "annotator"}},
    ("POST", "/projects/{project_id}/jobs/new"): {"data": {"kind": "fit_ratings"}},
    ("POST", "/projects/{project_id}/models"): {"data": {"name": "authz-model", "base": "toy"}},
    ("POST", "/projects/{project_id}/prompts"): {
        "files": {"file": ("prompts.txt", b"a red square\n", "text/plain")}
    },
    ("POST", "/projects/{project_id}/settings"): {"data": {"votes_per_pair": "2"}},
    ("POST", "/projects/{project_id}/annotators/{user_id}/votes-used"): {"data": {"use": "auto"}},
    ("POST", "/jobs/{job_id}/cancel"): {},
    ("POST", "/jobs/{job_id}/retry"): {},
    ("POST", "/api/v1/jobs/{job_id}/cancel"): {},
    ("POST", "/api/v1/jobs/{job_id}/retry"): {},
    ("POST", "/api/v1/projects/{project_id}/jobs"): {"json": {"kind": "fit_ratings"}},
    ("POST", "/projects/{project_id}/edit"): {"data": {"name": "renamed"}},
    ("POST", "/projects/{project_id}/prompts/{prompt_id}/edit"): {"data": {"tags": "x"}},
    ("POST", "/projects/{project_id}/models/{model_id}/edit"): {"data": {"archived": "true"}},
}
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/projects/{project_id}/jobs/new"): {"kind": "generate"},
}


def guarded_routes() -> list[tuple[str, str]]:
    routes = set()
    # The matrix's route list, narrowed to what belongs to one project or job.
    for method, path in ALL_ROUTES:
        if path in LEAD_ONLY or (SCOPED.match(path) and not ANNOTATOR_PAGES.match(path)):
            routes.add((method, path))
    return sorted(routes)


ROUTES = guarded_routes()


def test_the_route_list_covers_the_pages_people_bookmark() -> None:
    assert {
        ("GET", "/projects/{project_id}"),
        ("GET", "/jobs/{job_id}"),
        ("GET", "/api/v1/jobs/{job_id}"),
        ("POST", "/jobs/{job_id}/cancel"),
        ("GET", "/projects/{project_id}/dash/{section}"),
        ("GET", "/projects/{project_id}/jobs"),
        ("GET", "/projects/{project_id}/settings"),
    } <= set(ROUTES)
    assert not any(ANNOTATOR_PAGES.match(path) for _, path in ROUTES)


@pytest.fixture()
def world(db: Session, make_user: Any) -> dict[str, Any]:
    lead, lead_token = make_user("lead")
    other_lead, other_token = make_user("lead")
    annotator, annotator_token = make_user("annotator")
    _, admin_token = make_user("admin")
    project = create_project(db, data=ProjectCreate(name="guarded"), creator=lead)
    create_project(db, data=ProjectCreate(name="elsewhere"), creator=other_lead)
    add_member(db, project=project, user=annotator, role="annotator")
    model = ModelVersion(project_id=project.id, name="authz-model", base="toy", params={})
    prompt = Prompt(project_id=project.id, text="a prompt", split="train", tags=[])
    db.add_all([model, prompt])
    db.flush()
    job = create_job(db, kind="fit_ratings", params={}, project_id=project.id,
                     created_by_id=lead.id, max_attempts=3)  # fmt: skip
    db.commit()
    return {
        "params": {
            "project_id": project.id,
            "job_id": job.id,
            "user_id": annotator.id,
            "section": "overview",
            "model_id": model.id,
            "prompt_id": prompt.id,
        },
        "tokens": {
            "anonymous": None,
            "annotator": annotator_token,
            "other_lead": other_token,
            "lead": lead_token,
            "admin": admin_token,
        },
    }


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_route_access_by_role(
    client: Any, world: dict[str, Any], method: str, path: str, role: str
) -> None:
    url = path.format(**world["params"])
    token = world["tokens"][role]
    headers = {"Accept": "text/html"} if not path.startswith("/api/") else {}
    if token is not None:
        headers.update(bearer(token))
    response = client.request(
        method,
        url,
        headers=headers,
        params=QUERIES.get((method, path)),
        follow_redirects=False,
        **BODIES.get((method, path), {}),
    )
    status = response.status_code
    is_page = not path.startswith("/api/")
    if role == "anonymous":
        if is_page:
            assert status == 303 and response.headers["location"].startswith("/login"), status
        else:
            assert status == 401, status
        return
    allowed = role in ("lead", "admin") or (role == "other_lead" and path in LEAD_ONLY)
    if not allowed:
        assert status in (403, 404), (status, response.text[:300])
        # A refusal shows nothing of the project: no model names, no annotators, no images.
        assert "authz-model" not in response.text and "/api/v1/images/" not in response.text
        return
    if method == "GET":
        assert status == 200, (status, response.text[:500])
    else:
        # Allowed writes succeed, or conflict with the job's state (cancel of a cancelled job).
        assert status in (200, 201, 202, 303, 409), (status, response.text[:500])
