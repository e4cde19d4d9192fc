"""`prefloop serve --demo`: a ready-to-vote project with the two shipped toy models."""

from __future__ import annotations

from sqlalchemy import select

from app.core.db import session_scope
from app.core.security import new_password
from app.generators.models import ModelVersion
from app.jobs.service import create_job
from app.projects.models import Membership, Project, Prompt
from app.projects.schemas import ProjectSettings
from app.projects.settings import dump_settings
from app.users import service as users

DEMO_PROJECT = "Demo: toy shapes"
DEMO_ANNOTATOR = "demo@prefloop.local"
# Toy-world prompts (what the shipped toy models know; a test parses each in worker.toy.world),
# written out so the web side needs nothing from the worker. Few enough that the first pairs
# are ready seconds after start on a 2-core CPU.
DEMO_TRAIN_PROMPTS: tuple[str, ...] = (
    "a dark yellow circle at the top left on a white background",
    "a small light purple circle",
    "a large yellow square at the top",
    "a medium blue square",
    "a small light purple square",
    "a large light green square at the bottom right on a gray background",
    "a medium cyan triangle",
    "a small green square at the bottom left on a white background",
    "a small green circle on a black background",
    "a medium blue cross on a white background",
    "a medium yellow square at the bottom left",
    "a medium dark cyan circle on a gray background",
    "a large yellow triangle at the bottom",
    "a yellow triangle at the bottom right",
    "a small yellow square at the top left on a gray background",
    "a small dark purple square at the bottom left",
    "a large dark red cross at the top right",
    "a blue cross on a gray background",
    "a small purple square",
    "a green triangle at the top",
    "a medium purple square at the top right on a black background",
    "a purple cross on a gray background",
    "a square at the bottom on a black background",
    "a large light red circle on a gray background",
)
DEMO_TEST_PROMPTS: tuple[str, ...] = (
    "a circle in the center",
    "a large light yellow triangle",
    "a small yellow triangle",
    "a dark yellow square on a white background",
    "a medium yellow cross",
    "a large circle on the right",
    "a large green triangle on a white background",
    "a medium dark red triangle in the center on a white background",
)
DEMO_IMAGES_PER_PROMPT = 2


def create_demo(base_url: str) -> list[str]:
    """Create the demo project once (idempotent); returns lines to print."""
    with session_scope() as session:
        project = session.scalar(select(Project).where(Project.name == DEMO_PROJECT))
        if project is not None:
            return [
                f"demo: project {project.id} exists; vote at {base_url}/projects/{project.id}/vote",
                f"demo: annotator login {DEMO_ANNOTATOR} (password shown on the first demo run)",
            ]
        settings = ProjectSettings(votes_per_pair=3, train_pairs_per_prompt=1, gold_rate=0.1)
        project = Project(
            name=DEMO_PROJECT,
            description="Two toy text-to-image models (toy-v1 and the less trained toy-v0) on "
            "prompts like 'a large red circle'. Vote for the image that matches the prompt best.",
            settings=dump_settings(settings),
        )
        session.add(project)
        session.flush()
        texts = [*DEMO_TRAIN_PROMPTS, *DEMO_TEST_PROMPTS]
        prompts = [
            Prompt(project_id=project.id, text=text, split=split, tags=["demo"])
            for split, group in (("train", DEMO_TRAIN_PROMPTS), ("test", DEMO_TEST_PROMPTS))
            for text in group
        ]
        session.add_all(prompts)
        params = {"scheduler": "ddim", "steps": 20, "guidance_scale": 3.0}
        models = [
            ModelVersion(project_id=project.id, name=name, base=base, params=params, evaluation={})
            for name, base in (("toy-v1", "toy"), ("toy-v0", "toy-v0"))
        ]
        session.add_all(models)
        password = new_password(12)
        annotator = users.get_by_email(session, DEMO_ANNOTATOR) or users.create_user(
            session, email=DEMO_ANNOTATOR, role="annotator", password=password
        )
        session.add(Membership(project_id=project.id, user_id=annotator.id, role="annotator"))
        session.flush()
        # The job pairs each round of prompts as it goes: the first pairs come within seconds.
        job = create_job(
            session,
            kind="generate",
            params={
                "model_ids": [m.id for m in models],
                "images_per_prompt": DEMO_IMAGES_PER_PROMPT,
                "split": "train",
                "make_pairs": True,
            },
            project_id=project.id,
            created_by_id=None,
            max_attempts=3,
        )
        return [
            f"demo: project {project.id} with {len(texts)} toy prompts and models toy-v1, toy-v0",
            f"demo: generating images (job {job.id}: {base_url}/jobs/{job.id})",
            f"demo: annotator login {DEMO_ANNOTATOR} / password {password} (shown only once)",
            f"demo: vote at {base_url}/projects/{project.id}/vote",
        ]
