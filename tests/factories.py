"""Builders shared by tests: images, projects with pairs and votes, jobs run in-process, and the
simulated annotator of the end-to-end tests. Fixtures live in conftest.py; this module holds the
plain functions they and the tests call, so no test imports another test module."""

from __future__ import annotations

import io
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from app.core.db import session_scope, utcnow
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.jobs.models import Job
from app.jobs.service import create_job
from app.pairs.models import Pair
from app.projects.models import Prompt
from app.projects.schemas import ProjectCreate, ProjectSettings
from app.projects.service import add_member, create_project
from app.users import service as users
from app.users.models import User
from app.votes.models import Vote
from tests.support import Stack, bearer, login, wait_job

LEAD_PASSWORD = "lead-password-1"

# --- images ------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tiny_png(seed: int, size: int = 16) -> bytes:
    """A small PNG whose bytes (and so its content address) differ by seed."""
    rng = random.Random(seed)
    img = PILImage.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(8):
        img.putpixel((rng.randrange(size), rng.randrange(size)), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- a project with prompts, models, images and pairs (rolled-back `db` session) ----------------


@dataclass
class World:
    project: Any
    prompts: list[Prompt]
    models: list[ModelVersion]
    lead: User
    lead_token: str
    annotators: list[tuple[User, str]]
    images: dict[tuple[int, int, int], Image] = field(default_factory=dict)

    def add_image(self, db: Session, prompt: int, model: int, seed: int) -> Image:
        image = store_image(
            db,
            get_media_store(),
            project_id=self.project.id,
            prompt_id=self.prompts[prompt].id,
            png=tiny_png(hash((prompt, model, seed, self.project.id)) % 10_000),
            model_version_id=self.models[model].id,
            seed=seed,
            provenance={"model": self.models[model].name, "seed": seed},
        )
        self.images[(prompt, model, seed)] = image
        return image


def user_maker(db: Session) -> Any:
    """`make_user` on a given session (the SQLite backend has its own): role -> (user, token)."""

    def make(role: str) -> tuple[User, str]:
        user = users.create_user(db, email=f"{role}-{uuid.uuid4().hex[:8]}@example.com", role=role)
        return user, users.issue_token(db, user)

    return make


def build_world(
    db: Session,
    make_user: Any,
    *,
    n_prompts: int = 1,
    n_models: int = 2,
    seeds: tuple[int, ...] = (0,),
    n_annotators: int = 2,
    pairs: bool = True,
    **settings: Any,
) -> World:
    """A project with prompts, model versions, images of every (prompt, model, seed), pairs."""
    from app.pairs import service

    lead, lead_token = make_user("lead")
    project = create_project(
        db,
        data=ProjectCreate(name=f"p-{uuid.uuid4().hex[:6]}", settings=ProjectSettings(**settings)),
        creator=lead,
    )
    prompts = [
        Prompt(project_id=project.id, text=f"a red shape number {i}") for i in range(n_prompts)
    ]
    models = [
        ModelVersion(project_id=project.id, name=f"secret-model-{i}", base="toy")
        for i in range(n_models)
    ]
    db.add_all([*prompts, *models])
    db.flush()
    annotators = []
    for _ in range(n_annotators):
        user, token = make_user("annotator")
        add_member(db, project=project, user=user, role="annotator")
        annotators.append((user, token))
    world = World(project, prompts, models, lead, lead_token, annotators)
    for p in range(n_prompts):
        for m in range(n_models):
            for s in seeds:
                world.add_image(db, p, m, s)
    if pairs:
        service.make_pairs(db, project=project, images=list(world.images.values()))
    db.commit()
    return world


def add_arena(
    session: Session,
    store: Any,
    project_id: int,
    prompts: list[str],
    models: list[str],
    *,
    image_size: int = 16,
    seed: int = 0,
) -> list[Pair]:
    """Prompts and toy-based model versions with one image per (prompt, model), paired."""
    from app.pairs.service import make_pairs
    from app.projects.models import Project

    rows = [Prompt(project_id=project_id, text=text) for text in prompts]
    versions = [ModelVersion(project_id=project_id, name=name, base="toy") for name in models]
    session.add_all([*rows, *versions])
    session.flush()
    images = [
        store_image(
            session,
            store,
            project_id=project_id,
            prompt_id=prompt.id,
            png=tiny_png(prompt.id * 100 + model.id, size=image_size),
            model_version_id=model.id,
            seed=seed,
        )
        for prompt in rows
        for model in versions
    ]
    return make_pairs(session, project=session.get_one(Project, project_id), images=images)


def lead_client(client: Any, make_user: Any) -> tuple[Any, User, str]:
    """The test client logged in as a new lead: (client, lead, CSRF token)."""
    lead, _ = make_user("lead", password=LEAD_PASSWORD)
    csrf = login(client, lead.email, LEAD_PASSWORD)
    return client, lead, csrf


def user_factory(db: Session) -> Any:
    """make(role, email=None, password=None) -> (user, token) on this session, committed."""

    def make(role: str, email: str | None = None, password: str | None = None) -> Any:
        user = users.create_user(
            db, email=email or f"{role}-{uuid.uuid4().hex[:8]}@example.com", role=role,
            password=password,
        )  # fmt: skip
        token = users.issue_token(db, user)
        db.commit()
        return user, token

    return make


@dataclass
class Backend:
    """What the `backend` fixture gives: one database's session and a client on it."""

    name: str
    db: Session
    client: Any


# --- committed data for the worker's jobs ------------------------------------------------------


def add_voted_pair(
    s: Session,
    project_id: int,
    annotator_id: int,
    left: Image,
    right: Image,
    choice: str,
    *,
    votes_wanted: int = 1,
) -> Pair:
    """A train pair of two images of one prompt with one vote, `left` shown on the left."""
    a, b = sorted([left.id, right.id])
    pair = Pair(
        project_id=project_id,
        prompt_id=left.prompt_id,
        image_a_id=a,
        image_b_id=b,
        purpose="train",
        votes_wanted=votes_wanted,
        vote_count=1,
    )
    s.add(pair)
    s.flush()
    s.add(
        Vote(
            pair_id=pair.id,
            project_id=project_id,
            annotator_id=annotator_id,
            left_image_id=left.id,
            choice=choice,
            created_at=utcnow(),
        )
    )
    return pair


def run_job(project_id: int, kind: str, params: dict[str, Any], max_attempts: int = 2) -> Job:
    """Create a project job and run it in this process through the real runner; it must succeed."""
    from worker import runner

    with session_scope() as s:
        job_id = create_job(
            s,
            kind=kind,
            params=params,
            project_id=project_id,
            created_by_id=None,
            max_attempts=max_attempts,
        ).id
    status = runner.execute(job_id)
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None and status == "succeeded", job.error if job else status
        return job


# --- end to end: a running stack -------------------------------------------------------------


def create_toy_project(
    stack: Stack, name: str, prompts: list[dict[str, Any]], model_params: dict[str, Any]
) -> tuple[int, int]:
    """A project (one vote per pair) with these prompts and one toy model: (project, model)."""
    pid = stack.post(
        "/api/v1/projects",
        {"name": name, "settings": {"votes_per_pair": 1, "votes_per_second": 100}},
    ).json()["id"]
    assert stack.post(f"/api/v1/projects/{pid}/prompts", {"prompts": prompts}).status_code == 201
    mid = stack.post(
        f"/api/v1/projects/{pid}/models", {"name": "toy", "base": "toy", "params": model_params}
    ).json()["id"]
    return pid, mid


def run_stack_job(
    stack: Stack, pid: int, kind: str, params: dict[str, Any], timeout: float = 300
) -> dict[str, Any]:
    """Submit a project job through the API and wait for it to finish."""
    assert stack.client is not None
    created = stack.post(f"/api/v1/projects/{pid}/jobs", {"kind": kind, "params": params})
    assert created.status_code == 202, created.text
    return wait_job(stack.client, created.json()["id"], {}, timeout)


def vote_for_larger_shape(stack: Stack, pid: int, token: str, limit: int) -> int:
    """Simulated annotator through the API: the image with the larger shape wins."""
    from worker.toy.world import extract_area_fraction

    client = stack.client
    assert client is not None
    votes = 0
    while votes < limit:
        served = client.get(f"/api/v1/projects/{pid}/pairs/next", headers=bearer(token))
        if served.status_code == 204:
            break
        pair = served.json()
        areas = []
        for side in ("left", "right"):
            png = client.get(pair[side]["url"], headers=bearer(token)).content
            areas.append(
                extract_area_fraction(np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")))
            )
        response = client.post(
            f"/api/v1/pairs/{pair['pair_id']}/votes",
            json={
                "choice": "left" if areas[0] >= areas[1] else "right",
                "left_image_id": pair["left"]["image_id"],
            },
            headers=bearer(token),
        )
        assert response.status_code == 201, response.text
        votes += 1
    return votes


# --- reward models trained on one simulated preference --------------------------------------

_preference_models: dict[str, Any] = {}


def preference_reward_model(name: str) -> Any:
    """`worker.toy.reward_data.train_on_preference(name)`, cached per process (a test file may
    check one model several ways)."""
    from worker.toy.reward_data import train_on_preference

    if name not in _preference_models:
        _preference_models[name] = train_on_preference(name)
    return _preference_models[name]
