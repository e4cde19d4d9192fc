"""Per-prompt seeds: stable, distinct per prompt, training and evaluation ranges disjoint; the
generate and evaluate jobs use them and still never generate a (prompt, model, seed) twice."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select

from app.core.db import session_scope, utcnow
from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.service import JobParamsError, create_job
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.ratings.models import RewardModel
from tests.factories import run_job
from worker.seeds import DOMAIN_BITS, SEED_LIMIT, prompt_seeds, seed_domain, seeds_by_prompt
from worker.toy import world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prompt_seeds_are_stable_distinct_and_in_their_domain() -> None:
    first = prompt_seeds(17, 6)
    assert first == prompt_seeds(17, 6)  # stable across calls (and processes: a fixed hash)
    assert prompt_seeds(17, 3) == first[:3]  # more images extend, never reshuffle
    assert len(set(first)) == 6
    assert first != prompt_seeds(18, 6)
    assert all(0 <= s < 2**DOMAIN_BITS for s in first)
    evaluation = prompt_seeds(17, 6, "eval")
    assert all(2**DOMAIN_BITS <= s < 2 ** (DOMAIN_BITS + 1) for s in evaluation)
    assert SEED_LIMIT == 2**31  # fits the images.seed column (signed 32-bit)
    assert seed_domain(first[0]) == "train" and seed_domain(evaluation[0]) == "eval"
    assert seed_domain(-1) is None and seed_domain(SEED_LIMIT) is None
    with pytest.raises(ValueError, match="domain"):
        prompt_seeds(1, 2, "test")  # type: ignore[arg-type]


def test_seeds_differ_across_prompts_so_the_training_set_has_many_noises() -> None:
    seeds = seeds_by_prompt(range(200), 5)
    every = [s for row in seeds.values() for s in row]
    # 1 000 images, (nearly) 1 000 different starting noises — not 5 reused ones.
    assert len(set(every)) >= 999
    # Explicit seeds apply to every prompt.
    assert seeds_by_prompt([3, 4], 2, explicit=[7, 8]) == {3: [7, 8], 4: [7, 8]}


def test_training_and_evaluation_seeds_never_meet() -> None:
    train = {s for pid in range(300) for s in prompt_seeds(pid, 8, "train")}
    evaluation = {s for pid in range(300) for s in prompt_seeds(pid, 8, "eval")}
    assert not train & evaluation


# --- through the jobs -------------------------------------------------------------------------


def _run(project_id: int, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    return dict(run_job(project_id, kind, params, max_attempts=1).result or {})


@pytest.fixture()
def toy_project(pg_url: str) -> dict[str, Any]:
    texts = world.sample_prompts(4, seed=5)
    with session_scope() as s:
        project = Project(name=f"seeds-{uuid.uuid4().hex[:6]}", description="", settings={})
        s.add(project)
        s.flush()
        # Few sampler steps: the images' content does not matter here, only their seeds.
        model = ModelVersion(
            project_id=project.id, name="toy", base="toy", params={"steps": 2, "scheduler": "ddim"}
        )
        s.add(model)
        rows = [
            Prompt(project_id=project.id, text=t, split=split, tags=[])
            for t, split in zip(texts, ("train", "train", "train", "test"), strict=True)
        ]
        s.add_all(rows)
        s.flush()
        return {
            "project_id": project.id,
            "model_id": model.id,
            "train": [p.id for p in rows[:3]],
            "test": [p.id for p in rows[3:]],
        }


def _stored(model_id: int) -> dict[int, list[int]]:
    with session_scope() as s:
        rows = s.execute(
            select(Image.prompt_id, Image.seed).where(Image.model_version_id == model_id)
        ).all()
    out: dict[int, list[int]] = {}
    for pid, seed in rows:
        out.setdefault(pid, []).append(seed)
    return {pid: sorted(seeds) for pid, seeds in out.items()}


@pytest.mark.slow
def test_generate_draws_seeds_per_prompt_and_never_twice(toy_project: dict[str, Any]) -> None:
    pid, mid = toy_project["project_id"], toy_project["model_id"]
    first = _run(pid, "generate", {"model_ids": [mid], "images_per_prompt": 2})
    assert first["images"] == 6 and first["skipped"] == 0 and first["pairs"] == 3
    stored = _stored(mid)
    assert stored == {p: sorted(prompt_seeds(p, 2, "train")) for p in toy_project["train"]}
    # Asking again, with one more image per prompt, generates only the new seed of each prompt.
    again = _run(pid, "generate", {"model_ids": [mid], "images_per_prompt": 3})
    assert again["images"] == 3 and again["skipped"] == 6
    assert _stored(mid) == {p: sorted(prompt_seeds(p, 3, "train")) for p in toy_project["train"]}
    with session_scope() as s:
        pairs = s.scalars(select(Pair).where(Pair.project_id == pid)).all()
        assert {p.prompt_id for p in pairs} == set(toy_project["train"])
    # Explicit seeds still apply to every prompt.
    explicit = _run(pid, "generate", {"model_ids": [mid], "images_per_prompt": 1, "seeds": [5]})
    assert explicit["images"] == 3
    assert all(5 in seeds for seeds in _stored(mid).values())


@pytest.mark.slow
def test_evaluate_uses_per_prompt_evaluation_seeds(toy_project: dict[str, Any]) -> None:
    pid, mid = toy_project["project_id"], toy_project["model_id"]
    with session_scope() as s:
        child = ModelVersion(
            project_id=pid, name="child", base="toy", params={"steps": 2, "scheduler": "ddim"}
        )
        s.add(child)
        s.flush()
        child_id = child.id
    _run(pid, "generate", {"model_ids": [mid], "images_per_prompt": 2})
    # A barely trained reward model is enough to judge with: the seeds are the point here.
    _seed_reward_model(pid)
    result = _run(pid, "evaluate", {"model_ids": [mid, child_id], "images_per_prompt": 2})
    (test_prompt,) = toy_project["test"]
    expected = sorted(prompt_seeds(test_prompt, 2, "eval"))
    assert _stored(mid)[test_prompt] == expected and _stored(child_id)[test_prompt] == expected
    assert result["n"] == 2 and result["seeds"] is None and result["images_per_prompt"] == 2
    assert all(seed_domain(s) == "train" for p in toy_project["train"] for s in _stored(mid)[p])


def _seed_reward_model(project_id: int) -> None:
    """A reward model from a few votes, via train_reward on the project's train pairs."""
    from app.users.models import User
    from app.votes.models import Vote

    with session_scope() as s:
        annotator = User(email=f"a-{uuid.uuid4().hex[:6]}@x.org", role="annotator", groups=[])
        s.add(annotator)
        s.flush()
        for pair in s.scalars(select(Pair).where(Pair.project_id == project_id)):
            s.add(
                Vote(
                    pair_id=pair.id,
                    project_id=project_id,
                    annotator_id=annotator.id,
                    left_image_id=pair.image_a_id,
                    choice="left",
                    created_at=utcnow(),
                )
            )
    _run(project_id, "train_reward", {"backbone": "toyconv", "steps": 5})
    with session_scope() as s:
        assert s.scalar(select(RewardModel).where(RewardModel.project_id == project_id))


def test_seeds_outside_the_image_column_are_refused(toy_project: dict[str, Any]) -> None:
    with session_scope() as s, pytest.raises(JobParamsError) as refused:
        create_job(
            s,
            kind="generate",
            params={
                "model_ids": [toy_project["model_id"]],
                "images_per_prompt": 1,
                "seeds": [2**31],
            },
            project_id=toy_project["project_id"],
            created_by_id=None,
            max_attempts=1,
        )
    [error] = refused.value.errors
    assert error["loc"][:2] == ["params", "seeds"] and "2147483648" in error["msg"]
