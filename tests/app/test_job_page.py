"""The job page: an ETA from the measured rate, links to what a job made, a confirmed cancel."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.generators.models import ModelVersion
from app.jobs.models import Job
from app.jobs.pages import eta_seconds, eta_text
from app.jobs.service import create_job
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project
from tests.factories import lead_client


def test_eta_from_the_rate_so_far() -> None:
    # 40 % in 120 s: 60 % left at 1/3 % per second is 180 s.
    assert eta_seconds(0.4, 120) == pytest.approx(180)
    assert eta_seconds(0.9, 90) == pytest.approx(10)
    assert eta_seconds(0.0, 50) is None and eta_seconds(1.0, 50) is None
    assert eta_seconds(0.5, 0) is None
    assert eta_text(0.2) == "about 1 s left"
    assert eta_text(45) == "about 45 s left"
    assert eta_text(180) == "about 3 min left"
    assert eta_text(2 * 3600 + 5 * 60) == "about 2 h 05 min left"


def test_running_job_shows_eta_and_a_confirmed_cancel(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    client, lead, _csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    job = create_job(db, kind="fit_ratings", params={}, project_id=project.id,
                     created_by_id=lead.id, max_attempts=3)  # fmt: skip
    job.status, job.progress = "running", 0.4
    job.started_at = utcnow() - dt.timedelta(seconds=120)
    db.commit()
    html = client.get(f"/jobs/{job.id}").text
    assert "about 3 min left" in html
    assert f'data-confirm="Cancel job {job.id} (fit_ratings)?' in html
    job.status = "queued"
    db.commit()
    assert "data-eta" not in client.get(f"/jobs/{job.id}").text  # nothing measured yet


def test_dpo_job_links_to_its_model_and_follow_up_jobs(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    client, lead, _csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    parent = ModelVersion(project_id=project.id, name="base-m", base="toy", params={})
    db.add(parent)
    db.flush()
    # Rows as the worker leaves them (the kinds' params are not the point here).
    dpo = Job(project_id=project.id, kind="train_dpo", queue="gpu", params={})
    db.add(dpo)
    db.flush()
    child = ModelVersion(project_id=project.id, name="base-m+dpo", base="toy", params={},
                         parent_id=parent.id, produced_by_job_id=dpo.id)  # fmt: skip
    db.add(child)
    db.flush()
    follow = [Job(project_id=project.id, kind=k, queue="gpu", params={})
              for k in ("evaluate", "generate")]  # fmt: skip
    db.add_all(follow)
    db.flush()
    dpo.status = "succeeded"
    dpo.result = {"model_id": child.id, "parent_id": parent.id,
                  "evaluate_job_id": follow[0].id, "arena_job_id": follow[1].id}  # fmt: skip
    db.commit()
    html = client.get(f"/jobs/{dpo.id}").text
    models = f"/projects/{project.id}/models"
    assert f'<a href="{models}#model-{child.id}">Trained model: base-m+dpo</a>' in html
    assert f'<a href="{models}#model-{parent.id}">Parent model: base-m</a>' in html
    assert f'<a href="/jobs/{follow[0].id}">Evaluate job {follow[0].id}</a>' in html
    assert f'<a href="/jobs/{follow[1].id}">Arena job {follow[1].id}</a>' in html
    assert f'id="model-{child.id}"' in client.get(models).text


def test_automatic_rating_refreshes_are_hidden_until_asked(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    client, lead, _csrf = lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    mine = Job(project_id=project.id, kind="fit_ratings", queue="cpu", params={},
               created_by_id=lead.id, status="succeeded")  # fmt: skip
    auto = [Job(project_id=project.id, kind="fit_ratings", queue="cpu", params={},
                status="succeeded") for _ in range(3)]  # fmt: skip
    follow_up = Job(project_id=project.id, kind="generate", queue="gpu", params={})
    db.add_all([mine, *auto, follow_up])
    db.commit()
    url = f"/projects/{project.id}/jobs"
    listed = client.get(url).text
    assert f'data-job="{mine.id}"' in listed and f'data-job="{follow_up.id}"' in listed
    assert not any(f'data-job="{job.id}"' in listed for job in auto)
    assert "3 automatic rating refreshes hidden" in listed and f"{url}?automatic=1" in listed
    everything = client.get(url, params={"automatic": "1"})
    assert all(f'data-job="{job.id}"' in everything.text for job in [mine, *auto, follow_up])
    # Polling keeps the choice.
    assert f'hx-get="{url}?automatic=1"' in everything.text


def test_results_show_names_and_emails_beside_ids(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    from app.jobs.pages import readable_result

    client, lead, _csrf = lead_client(client, make_user)
    annotator, _ = make_user("annotator", email="ann-result@example.org")
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    a = ModelVersion(project_id=project.id, name="model-a", base="toy", params={})
    b = ModelVersion(project_id=project.id, name="model-b", base="toy", params={})
    db.add_all([a, b])
    db.flush()
    result = {
        "fit_id": 3,
        "leaderboard": [{"model_id": a.id, "rank": 1}, {"model_id": b.id, "rank": 2}],
        "annotators": [{"annotator_id": annotator.id, "votes": 5}],
        "model_ids": [a.id, b.id, 999_999],
        "method": {"reliability": {"excluded": {str(annotator.id): ["lead"]},
                                   "votes_by_annotator": {str(annotator.id): 5, "77777": 1}}},
    }  # fmt: skip
    assert readable_result(db, result) == {
        "fit_id": 3,
        "leaderboard": [
            {"model_id": a.id, "model_name": "model-a", "rank": 1},
            {"model_id": b.id, "model_name": "model-b", "rank": 2},
        ],
        "annotators": [
            {"annotator_id": annotator.id, "annotator_email": "ann-result@example.org", "votes": 5}
        ],
        "model_ids": [a.id, b.id, 999_999],
        "model_names": ["model-a", "model-b", "#999999"],
        "method": {
            "reliability": {
                "excluded": {f"{annotator.id} ann-result@example.org": ["lead"]},
                "votes_by_annotator": {f"{annotator.id} ann-result@example.org": 5, "77777": 1},
            }
        },
    }
    job = Job(project_id=project.id, kind="fit_ratings", queue="cpu", status="succeeded",
              params={"model_ids": [b.id]}, result=result)  # fmt: skip
    db.add(job)
    # A partial generate job names the model that failed.
    failed = [{"model_id": b.id, "reason": "no weights"}]
    partial = Job(project_id=project.id, kind="generate", queue="gpu", status="partial",
                  params={"model_ids": [a.id, b.id]}, error="1 of 2 models failed",
                  result={"images": 2, "pairs": 0, "failed_models": failed})  # fmt: skip
    db.add(partial)
    db.commit()
    html = client.get(f"/jobs/{job.id}").text
    assert "model-a" in html and "ann-result@example.org" in html
    # The parameters name their models too.
    params = html.split("<h3>Parameters</h3>", 1)[1]
    assert "model-b" in params
    page = client.get(f"/jobs/{partial.id}").text
    assert 'data-status="partial"' in page and "data-partial" in page
    assert "&#34;model_name&#34;: &#34;model-b&#34;" in page and "no weights" in page
    assert "Retry" in page  # a partial job may be retried: it does what is missing
