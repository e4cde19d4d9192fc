"""Reward amplification, best-of-N and iterative rounds as jobs, on the toy model (slow).

One committed project: toy-world images (a shape of random size per seed) on train prompts,
every within-prompt pair voted once by an annotator who prefers the larger shape, and a small
reward model trained on those votes. The jobs run through the real runner on Postgres.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.jobs.models import Job
from app.jobs.service import create_job
from app.projects.models import Project, Prompt
from app.ratings.models import RewardModel, Snapshot
from app.users.models import User
from tests.factories import add_voted_pair, png_bytes, run_job
from worker import runner
from worker.best_of import candidate_seeds as best_of_seeds
from worker.tasks.reward import decode_png, load_cached, score_arrays
from worker.toy import world

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SEEDS = (0, 1, 2)
N_TRAIN = 12
N_VAL = 4
# A few denoising steps: the tests check plumbing, not image quality.
MODEL_PARAMS = {"steps": 4, "scheduler": "ddim", "guidance_scale": 4.0}
TINY_DPO = {
    "steps": 2,
    "batch_size": 4,
    "lora_rank": 2,
    "beta": 500.0,
    "learning_rate": 1e-3,
    "checkpoint_every": 50,
    "reward_candidates": 4,
    # The tiny reward model is unsure of toy samples: keep every pair with any margin.
    "reward_threshold": 0.5,
}


@pytest.fixture(scope="module")
def project(pg_url: str) -> Iterator[dict[str, Any]]:
    rng = random.Random(0)
    prompts = list(dict.fromkeys(world.sample_prompts(4 * (N_TRAIN + N_VAL), seed=5)))
    prompts = prompts[: N_TRAIN + N_VAL]
    with session_scope() as s:
        project = Project(name=f"amplify-{uuid.uuid4().hex[:6]}", description="", settings={})
        s.add(project)
        s.flush()
        model = ModelVersion(project_id=project.id, name="toy", base="toy", params=MODEL_PARAMS)
        annotator = User(email=f"a-{uuid.uuid4().hex[:6]}@x.org", role="annotator", groups=[])
        s.add_all([model, annotator])
        s.flush()
        store = get_media_store()
        human_pairs = 0
        for index, text in enumerate(prompts):
            split = "train" if index < N_TRAIN else "val"
            prompt = Prompt(project_id=project.id, text=text, split=split, tags=[])
            s.add(prompt)
            s.flush()
            images = []
            for seed in SEEDS:
                pixels = world.render(text, rng=np.random.default_rng([seed, index]))
                row = store_image(
                    s,
                    store,
                    project_id=project.id,
                    prompt_id=prompt.id,
                    png=png_bytes(pixels),
                    model_version_id=model.id,
                    seed=seed,
                )
                images.append((row, world.extract_area_fraction(pixels)))
            for i in range(len(images)):
                for j in range(i + 1, len(images)):
                    (x, area_x), (y, area_y) = images[i], images[j]
                    if rng.random() < 0.5:
                        (x, area_x), (y, area_y) = (y, area_y), (x, area_x)
                    if area_x == area_y:
                        continue
                    choice = "left" if area_x > area_y else "right"
                    add_voted_pair(s, project.id, annotator.id, x, y, choice)
                    human_pairs += split == "train"
        ids = {
            "project_id": project.id,
            "model_id": model.id,
            "annotator_id": annotator.id,
            "human_train_pairs": human_pairs,
        }
    job = run_job(ids["project_id"], "train_reward", {"steps": 40, "batch_size": 32, "seed": 0})
    ids["reward_model_id"] = job.result["reward_model_id"]  # type: ignore[index]
    yield ids


def _snapshot_sources(job: Job) -> dict[str, Any]:
    with session_scope() as s:
        snapshot = s.scalar(select(Snapshot).where(Snapshot.job_id == job.id))
        assert snapshot is not None
        return dict(snapshot.params["sources"])


def test_train_dpo_mixes_votes_with_reward_labelled_on_policy_pairs(
    project: dict[str, Any],
) -> None:
    pid, rm_id = project["project_id"], project["reward_model_id"]
    job = run_job(
        pid,
        "train_dpo",
        {**TINY_DPO, "model_id": project["model_id"], "data": "votes+reward", "closed_loop": False},
    )
    sources = _snapshot_sources(job)
    assert sources["data"] == "votes+reward"
    assert sources["votes"]["pairs"] == project["human_train_pairs"]
    reward = sources["reward"]
    assert reward["reward_model_id"] == rm_id and reward["threshold"] == 0.5
    assert reward["candidates_per_prompt"] == 4 and reward["prompts"] == N_TRAIN
    # One best-vs-worst pair per train prompt, unless its four samples score exactly alike.
    assert 0 < reward["pairs"] <= reward["pairs_considered"] == N_TRAIN
    assert job.result["pairs"] == sources["pairs"] == project["human_train_pairs"] + reward["pairs"]  # type: ignore[index]
    assert job.result["sources"] == sources  # type: ignore[index]

    # Reward pairs only, at a threshold no pair of this unsure reward model reaches: a clear
    # error naming the threshold, nothing trained.
    with session_scope() as s:
        job_id = create_job(
            s,
            kind="train_dpo",
            params={
                **TINY_DPO,
                "model_id": project["model_id"],
                "data": "reward",
                "reward_threshold": 0.999999,
                "closed_loop": False,
            },
            project_id=pid,
            created_by_id=None,
            max_attempts=1,
        ).id
    assert runner.execute(job_id) == "failed"
    with session_scope() as s:
        failed = s.get(Job, job_id)
        assert failed is not None and "reward_threshold" in str(failed.error)
        assert (
            s.scalar(select(ModelVersion).where(ModelVersion.produced_by_job_id == job_id)) is None
        )

    only = run_job(
        pid,
        "train_dpo",
        {**TINY_DPO, "model_id": project["model_id"], "data": "reward", "closed_loop": False},
    )
    only_sources = _snapshot_sources(only)
    assert "votes" not in only_sources
    assert only.result["pairs"] == only_sources["reward"]["pairs"] > 0  # type: ignore[index]


def test_generate_best_of_keeps_the_reward_models_favourite(project: dict[str, Any]) -> None:
    pid, rm_id = project["project_id"], project["reward_model_id"]
    with session_scope() as s:
        base = s.get(ModelVersion, project["model_id"])
        assert base is not None
        policy = ModelVersion(
            project_id=pid,
            name=f"toy+best-of-3-{uuid.uuid4().hex[:4]}",
            base="toy",
            params={**MODEL_PARAMS, "best_of": 3, "reward_model_id": rm_id},
            parent_id=base.id,
        )
        s.add(policy)
        s.flush()
        policy_id = policy.id
        prompt_ids = list(
            s.scalars(
                select(Prompt.id).where(Prompt.project_id == pid, Prompt.split == "val").limit(2)
            )
        )
    job = run_job(
        pid,
        "generate",
        {
            "model_ids": [policy_id],
            "prompt_ids": prompt_ids,
            "seeds": [100, 101],
            "images_per_prompt": 2,
            "make_pairs": False,
        },
    )
    assert job.result["images"] == 4  # type: ignore[index]
    with session_scope() as s:
        images = list(s.scalars(select(Image).where(Image.model_version_id == policy_id)))
        texts = dict(
            s.execute(select(Prompt.id, Prompt.text).where(Prompt.project_id == pid)).all()
        )
        row = s.get(RewardModel, rm_id)
        assert row is not None
        model = load_cached(get_media_store(), row)
    assert len(images) == 4
    for image in images:
        choice = image.provenance["best_of"]
        assert choice["n"] == 3 and choice["reward_model_id"] == rm_id
        assert choice["seeds"] == best_of_seeds(image.seed, 3)
        assert choice["chosen"] == int(np.argmax(choice["scores"]))
        # The stored image is the winner: its own reward is the best candidate's.
        own = score_arrays(
            model,
            [texts[image.prompt_id]],
            [decode_png(get_media_store().read(image.storage_key))],
        )[0]
        assert own == pytest.approx(max(choice["scores"]), abs=2e-2)

    # The job's own best_of applies to a plain model; best_of 1 is the plain sample.
    plain = run_job(
        pid,
        "generate",
        {
            "model_ids": [project["model_id"]],
            "prompt_ids": prompt_ids[:1],
            "seeds": [200],
            "images_per_prompt": 1,
            "best_of": 2,
            "make_pairs": False,
        },
    )
    assert plain.result["images"] == 1  # type: ignore[index]
    with session_scope() as s:
        made = s.scalar(
            select(Image).where(Image.model_version_id == project["model_id"], Image.seed == 200)
        )
        assert made is not None and made.provenance["best_of"]["n"] == 2
        # No reward model named: the latest one chose.
        assert made.provenance["best_of"]["reward_model_id"] == rm_id


@pytest.mark.long(65)
def test_train_loop_rounds_form_a_lineage_of_arena_models(project: dict[str, Any]) -> None:
    pid = project["project_id"]
    # A vote cast after the reward model was trained: round 1 retrains it first.
    with session_scope() as s:
        images = list(
            s.scalars(
                select(Image)
                .where(Image.model_version_id == project["model_id"], Image.seed.in_([0, 2]))
                .order_by(Image.prompt_id, Image.seed)
                .limit(2)
            )
        )
        add_voted_pair(s, pid, project["annotator_id"], images[0], images[1], "left")
    job = run_job(
        pid,
        "train_loop",
        {
            **TINY_DPO,
            "model_id": project["model_id"],
            "rounds": 2,
            # Plumbing, not quality: two rounds whatever the held-out reward does.
            "min_reward_gain": -1e9,
            "max_fidelity_drop": 1.0,
            "eval_images_per_prompt": 1,
        },
    )
    result = job.result
    assert result is not None and len(result["rounds"]) == 2, result
    first, second = result["rounds"]
    assert first["reference_id"] == project["model_id"]
    assert second["reference_id"] == first["model_id"]
    assert first["reward_model_id"] != project["reward_model_id"]  # retrained on the new vote
    assert second["reward_model_id"] == first["reward_model_id"]  # no vote since: reused
    for record in (first, second):
        assert record["sources"]["votes"]["pairs"] > 0 and record["sources"]["reward"]["pairs"] > 0
        assert record["heldout_split"] == "val"
        assert np.isfinite(record["reward_child"]) and 0 <= record["fidelity_child"] <= 1
    assert result["best_model_id"] == second["model_id"]
    with session_scope() as s:
        children = [s.get(ModelVersion, r["model_id"]) for r in (first, second)]
        assert all(c is not None and c.status == "arena" for c in children)
        assert children[0].parent_id == project["model_id"]  # type: ignore[union-attr]
        assert children[1].parent_id == children[0].id  # type: ignore[union-attr]
        # The second round built on an adapter model: its child is a merged pipeline.
        assert children[1].adapter is None and children[1].base.endswith("model")  # type: ignore[union-attr]
        assert "loop" in children[1].evaluation  # type: ignore[union-attr]
        # Every child was sent to the arena against its reference.
        for record in (first, second):
            arena = s.get(Job, record["arena_job_id"])
            assert arena is not None and arena.kind == "generate"
            assert arena.params["model_ids"] == [record["reference_id"], record["model_id"]]
    # The merged child generates (its pipeline directory loads).
    gen = run_job(
        pid,
        "generate",
        {
            "model_ids": [second["model_id"]],
            "split": "val",
            "images_per_prompt": 1,
            "make_pairs": False,
        },
    )
    assert gen.result["images"] == N_VAL  # type: ignore[index]
