"""fit_ratings through the job runner (in-process) on committed Postgres data."""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Iterator

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from app.core.db import session_scope, utcnow
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.service import store_image
from app.jobs.models import Job
from app.jobs.service import create_job
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.ratings import service as ratings
from app.users.models import User
from app.votes.models import Vote
from worker import runner


def _png(seed: int) -> bytes:
    img = PILImage.new("RGB", (8, 8), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def arena(pg_url: str, sent_jobs) -> Iterator[dict]:  # type: ignore[no-untyped-def,type-arg]
    """Three models with true strengths strong > mid > weak and simulated votes, committed."""
    rng = random.Random(0)
    strength = {"strong": 1.5, "mid": 0.5, "weak": -1.0}
    with session_scope() as s:
        project = Project(name=f"arena-{uuid.uuid4().hex[:6]}", description="", settings={})
        s.add(project)
        s.flush()
        models = {
            name: ModelVersion(
                project_id=project.id, name=name, base="toy", params={}, evaluation={}
            )
            for name in strength
        }
        s.add_all(models.values())
        users = [
            User(email=f"u{i}-{uuid.uuid4().hex[:6]}@x.org", role="annotator", groups=[])
            for i in range(4)
        ]
        s.add_all(users)
        s.flush()
        store = get_media_store()
        seed = rng.randrange(10**9)
        names = list(strength)
        for p in range(12):
            prompt = Prompt(project_id=project.id, text=f"prompt {p}", split="train", tags=[])
            s.add(prompt)
            s.flush()
            images = {}
            for name in names:
                seed += 1
                images[name] = store_image(
                    s,
                    store,
                    project_id=project.id,
                    prompt_id=prompt.id,
                    png=_png(seed),
                    model_version_id=models[name].id,
                    seed=0,
                )
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    pair = Pair(
                        project_id=project.id,
                        prompt_id=prompt.id,
                        image_a_id=images[a].id,
                        image_b_id=images[b].id,
                        purpose="eval",
                        votes_wanted=4,
                    )
                    s.add(pair)
                    s.flush()
                    for user in users:
                        import math

                        p_a = 1 / (1 + math.exp(-(strength[a] - strength[b])))
                        left_is_a = rng.random() < 0.5
                        a_wins = rng.random() < p_a
                        choice = "left" if a_wins == left_is_a else "right"
                        if rng.random() < 0.1:
                            choice = rng.choice(["tie", "both_bad", "skip"])
                        s.add(
                            Vote(
                                pair_id=pair.id,
                                project_id=project.id,
                                annotator_id=user.id,
                                left_image_id=images[a].id if left_is_a else images[b].id,
                                choice=choice,
                                latency_ms=rng.randint(500, 3000),
                                created_at=utcnow(),
                            )
                        )
        ids = {name: m.id for name, m in models.items()}
        project_id = project.id
    yield {"project_id": project_id, "models": ids}


def _run(project_id: int, params: dict) -> Job:  # type: ignore[type-arg]
    with session_scope() as s:
        job = create_job(
            s,
            kind="fit_ratings",
            params=params,
            project_id=project_id,
            created_by_id=None,
            max_attempts=3,
        )
        job_id = job.id
    assert runner.execute(job_id) == "succeeded"
    with session_scope() as s:
        return s.get(Job, job_id)  # type: ignore[return-value]


def test_fit_ratings_orders_models_and_stores_the_fit(arena) -> None:  # type: ignore[no-untyped-def]
    job = _run(arena["project_id"], {"bootstrap": 200})
    board = job.result["leaderboard"]
    assert [row["name"] for row in board] == ["strong", "mid", "weak"]
    for row in board:
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]
    assert board[0]["rank"] == 1
    # 12 prompts × 3 pairs × 4 annotators, minus skips.
    assert 120 < job.result["votes"] <= 144
    assert len(job.result["annotators"]) == 4
    with session_scope() as s:
        served = ratings.leaderboard(s, arena["project_id"])
    assert [row["model_id"] for row in served] == [
        arena["models"][n] for n in ("strong", "mid", "weak")
    ]


def test_davidson_ties_and_no_bootstrap(arena) -> None:  # type: ignore[no-untyped-def]
    job = _run(arena["project_id"], {"ties": "davidson", "bootstrap": 0})
    assert job.result["method"]["tie_param"] is not None and job.result["method"]["tie_param"] > 0
    assert [row["name"] for row in job.result["leaderboard"]][0] == "strong"


def test_refresh_is_scheduled_only_when_votes_are_newer(arena) -> None:  # type: ignore[no-untyped-def]
    pid = arena["project_id"]
    with session_scope() as s:
        assert pid in ratings.projects_needing_refresh(s)
    _run(pid, {"bootstrap": 0})
    with session_scope() as s:
        assert pid not in ratings.projects_needing_refresh(s)
        vote = s.scalars(select(Vote).where(Vote.project_id == pid)).first()
        vote.created_at = utcnow()  # a newer vote
    with session_scope() as s:
        assert pid in ratings.projects_needing_refresh(s, min_age_seconds=0)
        assert pid not in ratings.projects_needing_refresh(s, min_age_seconds=3600)
        scheduled = ratings.schedule_rating_refresh(s, min_age_seconds=0)
        assert pid in scheduled
    with session_scope() as s:
        # A queued fit blocks another one.
        assert pid not in ratings.projects_needing_refresh(s, min_age_seconds=0)


def test_leaderboard_endpoint(client, make_user, db) -> None:  # type: ignore[no-untyped-def]
    from tests.support import bearer

    _, token = make_user("lead")
    pid = client.post("/api/v1/projects", json={"name": "empty"}, headers=bearer(token)).json()[
        "id"
    ]
    assert client.get(f"/api/v1/projects/{pid}/leaderboard", headers=bearer(token)).json() == []
    _, annotator = make_user("annotator")
    assert (
        client.get(f"/api/v1/projects/{pid}/leaderboard", headers=bearer(annotator)).status_code
        == 403
    )


def test_fit_ratings_leaves_out_excluded_annotators_and_records_it(arena) -> None:  # type: ignore[no-untyped-def]
    from app.projects.schemas import ProjectSettings
    from app.projects.settings import dump_settings

    pid = arena["project_id"]
    full = _run(pid, {"bootstrap": 0})
    with session_scope() as s:
        annotators = sorted(set(s.scalars(select(Vote.annotator_id).where(Vote.project_id == pid))))
        left_out = annotators[0]
        s.get(Project, pid).settings = dump_settings(  # type: ignore[union-attr]
            ProjectSettings(excluded_annotators=[left_out])
        )
    job = _run(pid, {"bootstrap": 0})
    record = job.result["method"]["reliability"]
    assert record["rule"] == "exclude_flagged"
    assert record["excluded"] == {str(left_out): ["lead"]}
    used = {int(a): n for a, n in record["votes_by_annotator"].items()}
    assert set(used) == set(annotators) - {left_out}
    assert job.result["votes"] == sum(used.values())
    full_used = full.result["method"]["reliability"]["votes_by_annotator"]
    assert job.result["votes"] == full.result["votes"] - full_used[str(left_out)]
    table = {row["annotator_id"]: row for row in job.result["annotators"]}
    assert table[left_out]["excluded"] == ["lead"] and table[annotators[1]]["excluded"] == []
