"""The route-access matrix: every route of the application, who may call it, and a world to
call it in (a project with data of every kind, its people, and another project next to it).

Every route must be classified in ACCESS: tests/app/test_authz_matrix.py fails until a new route
is. Path parameters are filled with real ids of the world's project, and `request_kwargs` gives
each write a body that passes input validation, so an answer is about access, not about input.
The security, audit, hostile-input and schema tests walk the same routes in the same world."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.routing import Mount, Route

from app.core.security import hash_token
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.service import store_image
from app.jobs.service import create_job
from app.main import create_app
from app.pairs.models import Pair
from app.projects.models import Prompt
from app.projects.schemas import ProjectCreate
from app.projects.service import add_member, create_project
from app.ratings.models import RewardModel
from app.users.invites import make_invite_token
from app.users.models import ApiToken
from app.votes.models import Vote
from tests.factories import tiny_png

ROLES = ("anonymous", "annotator", "other_lead", "lead", "admin")

# Who is let in, per class of route.
ALLOWED: dict[str, set[str]] = {
    "public": set(ROLES),
    "user": {"annotator", "other_lead", "lead", "admin"},
    "any_lead": {"other_lead", "lead", "admin"},
    "lead": {"lead", "admin"},
    "member": {"annotator", "lead", "admin"},
    # The annotator's own vote: nobody else may see or change it, not even the project's lead.
    "owner": {"annotator"},
    "admin": {"admin"},
}

R = tuple[str, str]

ACCESS: dict[R, str] = {
    # Public: ops probes, login, invite links, the API description and static files.
    ("GET", "/healthz"): "public",
    ("GET", "/metrics"): "public",
    ("GET", "/login"): "public",
    ("POST", "/login"): "public",
    ("POST", "/logout"): "public",
    ("GET", "/invite/{token}"): "public",
    ("POST", "/invite/{token}"): "public",
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/redoc"): "public",
    ("GET", "/static/{path}"): "public",
    # Every signed-in user, on their own account.
    ("GET", "/"): "user",
    ("GET", "/api/v1/me/tokens"): "user",
    ("POST", "/api/v1/me/tokens"): "user",
    ("GET", "/me/tokens"): "user",
    ("POST", "/me/tokens"): "user",
    ("POST", "/api/v1/me/password"): "user",
    ("GET", "/me/password"): "user",
    ("POST", "/me/password"): "user",
    # A token is revoked by its owner only (the fixture's token is the annotator's).
    ("DELETE", "/api/v1/me/tokens/{token_id}"): "owner",
    ("POST", "/me/tokens/{token_id}/revoke"): "owner",
    # Leads anywhere: new projects.
    ("GET", "/api/v1/projects"): "any_lead",
    ("POST", "/api/v1/projects"): "any_lead",
    ("GET", "/projects/new"): "any_lead",
    ("POST", "/projects/new"): "any_lead",
    # Admins: the audit log and system jobs.
    ("GET", "/api/v1/audit"): "admin",
    ("GET", "/admin/audit"): "admin",
    ("POST", "/api/v1/jobs"): "admin",
    ("POST", "/api/v1/users/{user_id}/tokens"): "admin",
    ("GET", "/api/v1/users"): "admin",
    ("PATCH", "/api/v1/users/{user_id}"): "admin",
    ("POST", "/api/v1/users/{user_id}/password-reset"): "admin",
    ("GET", "/admin/users"): "admin",
    ("POST", "/admin/users/{user_id}"): "admin",
    ("POST", "/admin/users/{user_id}/reset"): "admin",
    # Members of the project: voting and the annotator's own figures.
    ("GET", "/api/v1/images/{image_id}"): "member",
    ("GET", "/api/v1/projects/{project_id}/pairs/next"): "member",
    ("POST", "/api/v1/pairs/{pair_id}/votes"): "member",
    ("GET", "/api/v1/projects/{project_id}/me"): "member",
    ("GET", "/projects/{project_id}/vote"): "member",
    ("POST", "/projects/{project_id}/vote"): "member",
    ("GET", "/projects/{project_id}/me"): "member",
    # The annotator's own last vote.
    ("PUT", "/api/v1/votes/{vote_id}"): "owner",
    ("GET", "/projects/{project_id}/vote/change/{vote_id}"): "owner",
    ("POST", "/projects/{project_id}/vote/change/{vote_id}"): "owner",
    # The project's lead (and admins): everything else.
    ("GET", "/api/v1/projects/{project_id}"): "lead",
    ("GET", "/api/v1/projects/{project_id}/annotator-quality"): "lead",
    ("POST", "/api/v1/projects/{project_id}/annotators"): "lead",
    ("GET", "/api/v1/projects/{project_id}/export"): "lead",
    ("GET", "/api/v1/projects/{project_id}/images"): "lead",
    ("POST", "/api/v1/projects/{project_id}/import"): "lead",
    ("POST", "/api/v1/projects/{project_id}/jobs"): "lead",
    ("GET", "/api/v1/projects/{project_id}/leaderboard"): "lead",
    ("GET", "/api/v1/projects/{project_id}/models"): "lead",
    ("POST", "/api/v1/projects/{project_id}/models"): "lead",
    ("POST", "/api/v1/projects/{project_id}/prompts"): "lead",
    ("POST", "/api/v1/projects/{project_id}/gold"): "lead",
    ("POST", "/api/v1/projects/{project_id}/prompts/upload"): "lead",
    ("GET", "/api/v1/projects/{project_id}/reward-models"): "lead",
    ("GET", "/api/v1/reward-models/{reward_model_id}"): "lead",
    ("GET", "/api/v1/jobs/{job_id}"): "lead",
    ("POST", "/api/v1/jobs/{job_id}/cancel"): "lead",
    ("POST", "/api/v1/jobs/{job_id}/retry"): "lead",
    ("GET", "/jobs/{job_id}"): "lead",
    ("POST", "/jobs/{job_id}/cancel"): "lead",
    ("POST", "/jobs/{job_id}/retry"): "lead",
    ("GET", "/projects/{project_id}"): "lead",
    ("GET", "/projects/{project_id}/dash/{section}"): "lead",
    ("GET", "/projects/{project_id}/annotators"): "lead",
    ("POST", "/projects/{project_id}/annotators"): "lead",
    ("POST", "/projects/{project_id}/annotators/{user_id}/active"): "lead",
    ("POST", "/projects/{project_id}/annotators/{user_id}/invite"): "lead",
    ("POST", "/projects/{project_id}/annotators/{user_id}/votes-used"): "lead",
    ("GET", "/api/v1/projects/{project_id}/members"): "lead",
    ("POST", "/api/v1/projects/{project_id}/members"): "lead",
    ("PATCH", "/api/v1/projects/{project_id}/members/{user_id}"): "lead",
    ("DELETE", "/api/v1/projects/{project_id}/members/{user_id}"): "lead",
    ("POST", "/projects/{project_id}/members"): "lead",
    ("POST", "/projects/{project_id}/members/{user_id}/role"): "lead",
    ("POST", "/projects/{project_id}/members/{user_id}/active"): "lead",
    ("POST", "/projects/{project_id}/members/{user_id}/remove"): "lead",
    ("GET", "/projects/{project_id}/jobs"): "lead",
    ("GET", "/projects/{project_id}/jobs/new"): "lead",
    ("POST", "/projects/{project_id}/jobs/new"): "lead",
    ("GET", "/projects/{project_id}/models"): "lead",
    ("POST", "/projects/{project_id}/models"): "lead",
    ("GET", "/projects/{project_id}/prompts"): "lead",
    ("POST", "/projects/{project_id}/prompts"): "lead",
    ("GET", "/projects/{project_id}/settings"): "lead",
    ("POST", "/projects/{project_id}/settings"): "lead",
    ("POST", "/projects/{project_id}/settings/gold"): "lead",
    # Renaming, archiving and deleting what a project holds, and the project itself.
    ("PATCH", "/api/v1/projects/{project_id}"): "lead",
    ("DELETE", "/api/v1/projects/{project_id}"): "lead",
    ("GET", "/api/v1/projects/{project_id}/prompts"): "lead",
    ("PATCH", "/api/v1/prompts/{prompt_id}"): "lead",
    ("DELETE", "/api/v1/prompts/{prompt_id}"): "lead",
    ("PATCH", "/api/v1/models/{model_id}"): "lead",
    ("DELETE", "/api/v1/models/{model_id}"): "lead",
    ("POST", "/projects/{project_id}/edit"): "lead",
    ("POST", "/projects/{project_id}/delete"): "lead",
    ("POST", "/projects/{project_id}/prompts/{prompt_id}/edit"): "lead",
    ("POST", "/projects/{project_id}/prompts/{prompt_id}/delete"): "lead",
    ("POST", "/projects/{project_id}/models/{model_id}/edit"): "lead",
    ("POST", "/projects/{project_id}/models/{model_id}/delete"): "lead",
}

# What an allowed caller gets, where it is not the default (200 for reads; for writes 200, 201,
# 202, 303, or 409 when the state forbids it, e.g. retrying a queued job).
ALLOWED_STATUS: dict[R, set[int]] = {
    ("GET", "/api/v1/projects/{project_id}/pairs/next"): {200, 204},
    ("POST", "/login"): {400},  # wrong password: refused as a login, not as an access
    ("POST", "/logout"): {303},
    ("GET", "/login"): {200, 303},  # signed-in callers are sent on
    ("DELETE", "/api/v1/me/tokens/{token_id}"): {204},
    ("POST", "/me/tokens"): {201},
    # A wrong current password: refused as input, not as an access.
    ("POST", "/api/v1/me/password"): {422},
    ("POST", "/me/password"): {422},
    ("DELETE", "/api/v1/projects/{project_id}/members/{user_id}"): {204},
    # The fixture project holds images, votes and jobs: refused, naming them.
    ("DELETE", "/api/v1/projects/{project_id}"): {409},
    ("DELETE", "/api/v1/prompts/{prompt_id}"): {204},
    ("DELETE", "/api/v1/models/{model_id}"): {204},
}
DEFAULT_WRITE = {200, 201, 202, 303, 409}


def walk_routes(routes: Any, prefix: str = "") -> Iterator[R]:
    """(method, path) of every route and mount, through included routers."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            context = getattr(route, "include_context", None)
            yield from walk_routes(original.routes, prefix + (getattr(context, "prefix", "") or ""))
        elif isinstance(route, Mount):
            yield "GET", prefix + route.path + "/{path}"
        elif isinstance(route, APIRoute | Route):
            for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                yield method, prefix + route.path


def app_routes() -> list[R]:
    return sorted(set(walk_routes(create_app().routes)))


ROUTES = app_routes()


@dataclass
class World:
    """A project with data of every kind, its people, and another project next to it."""

    params: dict[str, Any]
    tokens: dict[str, str | None]
    emails: dict[str, str]
    ids: dict[str, Any] = field(default_factory=dict)


def build_world(db: Session, make_user: Any, name: str = "guarded") -> World:
    lead, lead_token = make_user("lead")
    other_lead, other_token = make_user("lead")
    annotator, annotator_token = make_user("annotator")
    admin, admin_token = make_user("admin")
    project = create_project(db, data=ProjectCreate(name=name), creator=lead)
    elsewhere = create_project(db, data=ProjectCreate(name="elsewhere"), creator=other_lead)
    add_member(db, project=project, user=annotator, role="annotator")
    store = get_media_store()
    models = [
        ModelVersion(project_id=project.id, name=f"authz-model-{k}", base="toy", params={})
        for k in range(2)
    ]
    db.add_all(models)
    prompt = Prompt(project_id=project.id, text="a guarded prompt", split="train", tags=[])
    foreign_prompt = Prompt(project_id=elsewhere.id, text="elsewhere", split="train", tags=[])
    # Nothing refers to these two yet: renaming, archiving and deleting them succeed.
    spare_model = ModelVersion(
        project_id=project.id, name="authz-model-spare", base="toy", params={}
    )
    spare_prompt = Prompt(
        project_id=project.id, text="a guarded spare prompt", split="val", tags=[]
    )
    db.add_all([prompt, foreign_prompt, spare_model, spare_prompt])
    db.flush()
    images = [
        store_image(
            db,
            store,
            project_id=project.id,
            prompt_id=prompt.id,
            png=tiny_png(k),
            model_version_id=models[k % 2].id,
            seed=k,
        )
        for k in range(4)
    ]
    foreign = store_image(
        db, store, project_id=elsewhere.id, prompt_id=foreign_prompt.id, png=tiny_png(99)
    )
    voted = Pair(
        project_id=project.id,
        prompt_id=prompt.id,
        image_a_id=images[0].id,
        image_b_id=images[1].id,
        purpose="eval",
        votes_wanted=3,
        vote_count=1,
    )
    open_pair = Pair(
        project_id=project.id,
        prompt_id=prompt.id,
        image_a_id=images[2].id,
        image_b_id=images[3].id,
        purpose="eval",
        votes_wanted=3,
        vote_count=0,
    )
    db.add_all([voted, open_pair])
    db.flush()
    vote = Vote(
        pair_id=voted.id,
        project_id=project.id,
        annotator_id=annotator.id,
        left_image_id=images[0].id,
        choice="left",
        latency_ms=900,
    )
    db.add(vote)
    job = create_job(
        db,
        kind="fit_ratings",
        params={},
        project_id=project.id,
        created_by_id=lead.id,
        max_attempts=3,
    )
    reward = RewardModel(
        project_id=project.id, version=1, backbone="toy", path="rm/1", metrics={"accuracy": 0.5}
    )
    db.add(reward)
    db.flush()
    db.commit()
    return World(
        params={
            "project_id": project.id,
            "job_id": job.id,
            "user_id": annotator.id,
            "section": "overview",
            "image_id": images[0].id,
            "pair_id": open_pair.id,
            "vote_id": vote.id,
            "reward_model_id": reward.id,
            "token": make_invite_token(annotator),
            "token_id": db.scalar(
                select(ApiToken.id).where(ApiToken.token_hash == hash_token(annotator_token))
            ),
            "path": "app.js",
            "model_id": spare_model.id,
            "prompt_id": spare_prompt.id,
        },
        tokens={
            "anonymous": None,
            "annotator": annotator_token,
            "other_lead": other_token,
            "lead": lead_token,
            "admin": admin_token,
        },
        emails={"annotator": annotator.email, "lead": lead.email, "admin": admin.email},
        ids={
            "elsewhere": elsewhere.id,
            "foreign_image": foreign.id,
            "images": [i.id for i in images],
            "open_pair": open_pair.id,
            "models": [m.name for m in [*models, spare_model]],
            "lead_user": lead,
            "annotator_user": annotator,
        },
    )


def request_kwargs(method: str, path: str, world: World) -> dict[str, Any]:
    """A body and query that pass input validation, so the answer is about access."""
    p = world.params
    prompt_file = {"file": ("prompts.txt", b"a red square\n", "text/plain")}
    table: dict[R, dict[str, Any]] = {
        ("POST", "/login"): {"data": {"email": world.emails["lead"], "password": "not-it-1"}},
        ("POST", "/invite/{token}"): {
            "data": {"password": "a-new-password", "confirm": "a-new-password"}
        },
        ("POST", "/api/v1/projects"): {"json": {"name": "authz"}},
        ("POST", "/api/v1/me/tokens"): {"json": {"name": "authz"}},
        ("POST", "/me/tokens"): {"data": {"name": "authz"}},
        ("POST", "/api/v1/users/{user_id}/tokens"): {"json": {"name": "authz"}},
        ("POST", "/api/v1/me/password"): {
            "json": {"current_password": "not-it", "new_password": "a-new-password"}
        },
        ("POST", "/me/password"): {
            "data": {"current": "not-it", "password": "a-new-password", "confirm": "a-new-password"}
        },
        ("PATCH", "/api/v1/users/{user_id}"): {"json": {"is_active": True}},
        ("POST", "/admin/users/{user_id}"): {"data": {"active": "true"}},
        ("POST", "/api/v1/projects/{project_id}/members"): {
            "json": {"email": f"member-{uuid.uuid4().hex[:6]}@example.com", "role": "annotator"}
        },
        ("PATCH", "/api/v1/projects/{project_id}/members/{user_id}"): {"json": {"active": True}},
        ("POST", "/projects/{project_id}/members"): {
            "data": {"email": "member@example.com", "role": "annotator"}
        },
        ("POST", "/projects/{project_id}/members/{user_id}/role"): {"data": {"role": "annotator"}},
        ("POST", "/projects/{project_id}/members/{user_id}/active"): {"data": {"active": "true"}},
        ("POST", "/projects/new"): {"data": {"name": "authz"}},
        ("POST", "/api/v1/jobs"): {"json": {"kind": "selftest"}},
        ("POST", "/api/v1/pairs/{pair_id}/votes"): {
            "json": {"choice": "left", "left_image_id": world.ids["images"][2]}
        },
        ("POST", "/projects/{project_id}/vote"): {
            "data": {
                "pair_id": str(p["pair_id"]),
                "left_image_id": world.ids["images"][2],
                "choice": "right",
            }
        },
        ("PUT", "/api/v1/votes/{vote_id}"): {"json": {"choice": "right"}},
        ("POST", "/projects/{project_id}/vote/change/{vote_id}"): {"data": {"choice": "tie"}},
        ("GET", "/api/v1/projects/{project_id}/export"): {"params": {"format": "jsonl"}},
        ("POST", "/api/v1/projects/{project_id}/import"): {
            "params": {"format": "fastchat"},
            "files": {"file": ("b.json", b'[{"model_a": "p", "model_b": "q", "winner": "tie"}]')},
        },
        ("POST", "/api/v1/projects/{project_id}/annotators"): {
            "json": {"email": f"new-{uuid.uuid4().hex[:6]}@example.com"}
        },
        ("POST", "/api/v1/projects/{project_id}/jobs"): {"json": {"kind": "fit_ratings"}},
        ("POST", "/api/v1/projects/{project_id}/models"): {
            "json": {"name": "authz-new", "base": "toy"}
        },
        ("POST", "/api/v1/projects/{project_id}/prompts"): {
            "json": {"prompts": [{"text": "a blue square"}]}
        },
        ("POST", "/api/v1/projects/{project_id}/prompts/upload"): {"files": prompt_file},
        ("POST", "/projects/{project_id}/annotators"): {"data": {"email": "invitee@example.com"}},
        ("POST", "/projects/{project_id}/annotators/{user_id}/active"): {
            "data": {"active": "true"}
        },
        ("POST", "/projects/{project_id}/annotators/{user_id}/votes-used"): {
            "data": {"use": "exclude"}
        },
        ("GET", "/projects/{project_id}/jobs/new"): {"params": {"kind": "generate"}},
        ("POST", "/projects/{project_id}/jobs/new"): {"data": {"kind": "fit_ratings"}},
        ("POST", "/projects/{project_id}/models"): {"data": {"name": "authz-new", "base": "toy"}},
        ("POST", "/projects/{project_id}/prompts"): {"files": prompt_file},
        ("POST", "/projects/{project_id}/settings"): {"data": {"votes_per_pair": "2"}},
        ("PATCH", "/api/v1/projects/{project_id}"): {"json": {"name": "renamed"}},
        ("PATCH", "/api/v1/prompts/{prompt_id}"): {"json": {"split": "test", "tags": ["x"]}},
        ("PATCH", "/api/v1/models/{model_id}"): {"json": {"archived": True}},
        ("POST", "/projects/{project_id}/edit"): {"data": {"name": "renamed"}},
        ("POST", "/projects/{project_id}/prompts/{prompt_id}/edit"): {
            "data": {"split": "test", "tags": "x, y"}
        },
        ("POST", "/projects/{project_id}/models/{model_id}/edit"): {"data": {"archived": "true"}},
    }
    return table.get((method, path), {})


def is_api(path: str) -> bool:
    return path.startswith("/api/") or path in ("/healthz", "/metrics", "/openapi.json")
