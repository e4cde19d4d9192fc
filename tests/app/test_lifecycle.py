"""A model, prompt or project after it was made: checked, renamed, archived, deleted.

API and page paths on Postgres: new models are `pending` with a check job queued, failed and
archived models cannot be picked, archiving leaves things out of jobs and pairs but keeps their
history, deleting is refused (409, naming what refers) while anything refers, and every change
leaves exactly one audit row.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.models import AuditEvent
from app.core.db import utcnow
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.generators.schemas import ModelUpdate
from app.generators.service import update_model
from app.images.service import store_image
from app.jobs.models import STATUSES, TERMINAL, Job
from app.pairs.models import Pair, Reservation
from app.pairs.service import make_pairs, next_pair, pairs_left
from app.projects.lifecycle import update_prompt
from app.projects.models import Project, Prompt
from app.projects.schemas import ProjectCreate, PromptUpdate
from app.projects.service import add_member, create_project
from tests.factories import lead_client as _lead_client
from tests.factories import tiny_png
from tests.support import bearer


def _audit(db: Session, action: str) -> list[AuditEvent]:
    return list(db.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def _setup(client: Any, make_user: Any) -> tuple[dict[str, str], int, Any]:
    lead, token = make_user("lead")
    h = bearer(token)
    pid = client.post("/api/v1/projects", json={"name": "life"}, headers=h).json()["id"]
    prompts = [{"text": "a red circle", "tags": ["shape"]}, {"text": "a blue square"}]
    assert client.post(f"/api/v1/projects/{pid}/prompts", json={"prompts": prompts}, headers=h)
    return h, pid, lead


def _model(client: Any, h: dict[str, str], pid: int, name: str, base: str = "toy") -> int:
    made = client.post(f"/api/v1/projects/{pid}/models", json={"name": name, "base": base},
                       headers=h)  # fmt: skip
    assert made.status_code == 201, made.text
    return int(made.json()["id"])


def _image(db: Session, project_id: int, prompt_id: int, model_id: int, seed: int) -> Any:
    return store_image(
        db, get_media_store(), project_id=project_id, prompt_id=prompt_id,
        png=tiny_png(seed + 10 * model_id), model_version_id=model_id, seed=seed,
    )  # fmt: skip


def test_partial_is_a_terminal_job_state() -> None:
    assert "partial" in STATUSES and "partial" in TERMINAL


def test_a_new_model_is_pending_with_a_check_job_queued(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    h, pid, lead = _setup(client, make_user)
    made = client.post(f"/api/v1/projects/{pid}/models", json={"name": "m", "base": "toy"},
                       headers=h)  # fmt: skip
    body = made.json()
    assert made.status_code == 201
    assert body["check_status"] == "pending" and body["check_error"] is None
    assert body["archived"] is False
    check = db.scalar(select(Job).where(Job.project_id == pid, Job.kind == "check_model"))
    assert check is not None and check.params["model_id"] == body["id"]
    assert check.queue == "gpu" and check.created_by_id == lead.id
    assert (check.id, "gpu") in sent_jobs
    # One audit row for the registration; the check job it queued is part of it.
    assert [e.target for e in _audit(db, "model.create")] == [f"model:{body['id']}"]
    assert not _audit(db, "job.launch")
    listed = client.get(f"/api/v1/projects/{pid}/models", headers=h).json()
    assert [m["check_status"] for m in listed] == ["pending"]


def test_models_the_platform_makes_start_ready(db: Session, make_user: Any) -> None:
    lead, _ = make_user("lead")
    project = create_project(db, data=ProjectCreate(name="p"), creator=lead)
    # Training children, the demo's toy models and imported names are made without a check.
    child = ModelVersion(project_id=project.id, name="child", base="toy", params={})
    db.add(child)
    db.flush()
    assert child.check_status == "ready"


def test_failed_and_archived_models_cannot_be_picked_pending_ones_can(
    client: Any, db: Session, make_user: Any
) -> None:
    h, pid, _ = _setup(client, make_user)
    good, bad, old = (_model(client, h, pid, n) for n in ("good", "bad", "old"))
    broken = db.get(ModelVersion, bad)
    assert broken is not None
    broken.check_status, broken.check_error = "failed", "ModelLoadError: cannot load model 'x'"
    db.commit()
    assert client.patch(f"/api/v1/models/{old}", json={"archived": True}, headers=h).json()[
        "archived"
    ]

    def launch(ids: list[int]) -> Any:
        body = {"kind": "generate", "params": {"model_ids": ids}}
        return client.post(f"/api/v1/projects/{pid}/jobs", json=body, headers=h)

    refused = launch([good, bad])
    assert refused.status_code == 409
    assert "failed its check" in refused.json()["detail"] and "cannot load model" in refused.text
    archived = launch([good, old])
    assert archived.status_code == 409 and "archived" in archived.json()["detail"]
    dpo = client.post(f"/api/v1/projects/{pid}/jobs", headers=h,
                      json={"kind": "train_dpo", "params": {"model_id": bad}})  # fmt: skip
    assert dpo.status_code == 409
    # A pending model may be picked: a generate job isolates a model that will not load.
    assert launch([good]).status_code == 202
    # And the failed one can be checked again.
    again = client.post(f"/api/v1/projects/{pid}/jobs", headers=h,
                        json={"kind": "check_model", "params": {"model_id": bad}})  # fmt: skip
    assert again.status_code == 202


def test_the_job_form_offers_only_usable_models(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = _lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    ok = ModelVersion(project_id=project.id, name="fine-model", base="toy", params={})
    bad = ModelVersion(project_id=project.id, name="broken-model", base="toy", params={},
                       check_status="failed", check_error="no weights")  # fmt: skip
    old = ModelVersion(project_id=project.id, name="old-model", base="toy", params={},
                       archived_at=utcnow())  # fmt: skip
    new = ModelVersion(project_id=project.id, name="new-model", base="toy", params={},
                       check_status="pending")  # fmt: skip
    db.add_all([ok, bad, old, new])
    db.commit()
    form = client.get(f"/projects/{project.id}/jobs/new", params={"kind": "generate"}).text
    assert re.search(rf'name="model_ids" value="{ok.id}" checked', form)
    assert "new-model (check pending)" in form
    assert "broken-model" not in form and "old-model" not in form
    post = {"csrf_token": csrf, "kind": "generate", "images_per_prompt": "2", "split": "train",
            "make_pairs": "1", "model_ids": str(bad.id)}  # fmt: skip
    refused = client.post(f"/projects/{project.id}/jobs/new", data=post)
    assert refused.status_code == 409 and "failed its check" in refused.text
    # The models page shows the verdict and the reason.
    page = client.get(f"/projects/{project.id}/models").text
    assert re.search(rf'id="model-{bad.id}"[^>]*data-check="failed"', page)
    assert "no weights" in page
    # "Check again" opens the check's form with the failed model chosen.
    recheck = f"/projects/{project.id}/jobs/new?kind=check_model&amp;model_id={bad.id}"
    assert recheck in page
    form = client.get(recheck.replace("&amp;", "&")).text
    assert re.search(rf'<option value="{bad.id}" selected', form)
    assert 'id="archived-models"' in page


def test_models_are_renamed_archived_and_deleted_only_when_unreferenced(
    client: Any, db: Session, make_user: Any
) -> None:
    h, pid, _ = _setup(client, make_user)
    first, second = _model(client, h, pid, "first"), _model(client, h, pid, "second")
    renamed = client.patch(f"/api/v1/models/{first}", json={"name": "first-v2"}, headers=h)
    assert renamed.status_code == 200 and renamed.json()["name"] == "first-v2"
    taken = client.patch(f"/api/v1/models/{first}", json={"name": "second"}, headers=h)
    assert taken.status_code == 409 and "already exists" in taken.json()["detail"]
    blank = client.patch(f"/api/v1/models/{first}", json={"name": "  "}, headers=h)
    assert blank.status_code == 422
    assert client.patch("/api/v1/models/999999", json={}, headers=h).status_code == 404
    [update] = _audit(db, "model.update")
    assert update.details == {"name": ["first", "first-v2"]} and update.project_id == pid

    prompt_id = db.scalar(select(Prompt.id).where(Prompt.project_id == pid).limit(1))
    assert prompt_id is not None
    _image(db, pid, prompt_id, first, seed=1)
    db.commit()
    refused = client.delete(f"/api/v1/models/{first}", headers=h)
    assert refused.status_code == 409
    assert "1 images" in refused.json()["detail"] and "archive it instead" in refused.text
    assert db.get(ModelVersion, first) is not None
    archived = client.patch(f"/api/v1/models/{first}", json={"archived": True}, headers=h)
    assert archived.json()["archived"] is True
    restored = client.patch(f"/api/v1/models/{first}", json={"archived": False}, headers=h)
    assert restored.json()["archived"] is False
    # A job naming a model refers to it too.
    job = client.post(f"/api/v1/projects/{pid}/jobs", headers=h,
                      json={"kind": "generate", "params": {"model_ids": [second]}})  # fmt: skip
    named = client.delete(f"/api/v1/models/{second}", headers=h)
    assert named.status_code == 409 and f"jobs {job.json()['id']}" in named.json()["detail"]
    db.execute(Job.__table__.delete().where(Job.id == job.json()["id"]))
    db.commit()
    before = len(_audit(db, "model.delete"))
    assert client.delete(f"/api/v1/models/{second}", headers=h).status_code == 204
    db.expire_all()
    assert db.get(ModelVersion, second) is None
    assert len(_audit(db, "model.delete")) == before + 1


def test_prompts_are_edited_archived_searched_and_deleted(
    client: Any, db: Session, make_user: Any
) -> None:
    h, pid, _ = _setup(client, make_user)
    found = client.get(f"/api/v1/projects/{pid}/prompts", params={"q": "SHAPE"}, headers=h).json()
    assert [p["text"] for p in found] == ["a red circle"]  # matched by its tag
    red, blue = found[0]["id"], next(
        p["id"] for p in client.get(f"/api/v1/projects/{pid}/prompts", headers=h).json()
        if p["text"] == "a blue square"
    )
    edited = client.patch(f"/api/v1/prompts/{blue}", headers=h,
                          json={"text": "a blue big square", "split": "test",
                                "tags": ["colour", " colour", ""]})  # fmt: skip
    assert edited.status_code == 200
    assert edited.json() | {"id": 0} == {
        "id": 0, "project_id": pid, "text": "a blue big square", "split": "test",
        "tags": ["colour"], "archived": False,
    }  # fmt: skip
    bad_split = client.patch(f"/api/v1/prompts/{blue}", json={"split": "dev"}, headers=h)
    assert bad_split.status_code == 422
    [update] = _audit(db, "prompt.update")
    assert update.details["split"] == ["train", "test"] and update.project_id == pid
    # Once images were made from a prompt, its words are fixed (split and tags are not).
    model = _model(client, h, pid, "m")
    _image(db, pid, red, model, seed=3)
    db.commit()
    reworded = client.patch(f"/api/v1/prompts/{red}", json={"text": "a red disc"}, headers=h)
    assert reworded.status_code == 409 and "1 images" in reworded.json()["detail"]
    retagged = client.patch(f"/api/v1/prompts/{red}", json={"tags": ["round"]}, headers=h)
    assert retagged.status_code == 200 and retagged.json()["text"] == "a red circle"
    assert client.delete(f"/api/v1/prompts/{red}", headers=h).status_code == 409
    assert client.patch(f"/api/v1/prompts/{red}", json={"archived": True}, headers=h).json()[
        "archived"
    ]
    current = client.get(f"/api/v1/projects/{pid}/prompts", headers=h).json()
    assert [p["id"] for p in current] == [blue]
    shelved = client.get(f"/api/v1/projects/{pid}/prompts", params={"archived": "true"},
                         headers=h).json()  # fmt: skip
    assert [p["id"] for p in shelved] == [red]
    assert client.delete(f"/api/v1/prompts/{blue}", headers=h).status_code == 204
    assert len(_audit(db, "prompt.delete")) == 1
    assert client.delete(f"/api/v1/prompts/{blue}", headers=h).status_code == 404


def test_prompt_page_searches_edits_and_archives(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = _lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    red = Prompt(project_id=project.id, text="a red circle", split="train", tags=["warm"])
    blue = Prompt(project_id=project.id, text="a blue square", split="train", tags=[])
    db.add_all([red, blue])
    db.commit()
    url = f"/projects/{project.id}/prompts"
    page = client.get(url).text
    assert 'id="prompt-search"' in page and f'id="prompt-{red.id}"' in page
    searched = client.get(url, params={"q": "warm"}).text
    assert f'id="prompt-{red.id}"' in searched and f'id="prompt-{blue.id}"' not in searched
    nothing = client.get(url, params={"q": "zebra"}).text
    assert "No prompt matches" in nothing
    edit = client.post(f"{url}/{blue.id}/edit", follow_redirects=False,
                       data={"csrf_token": csrf, "text": "a blue square", "split": "val",
                             "tags": "cool, blue"})  # fmt: skip
    assert edit.status_code == 303
    db.refresh(blue)
    assert blue.split == "val" and blue.tags == ["cool", "blue"]
    bad = client.post(f"{url}/{blue.id}/edit", data={"csrf_token": csrf, "split": "dev"})
    assert bad.status_code == 422 and "not changed" in bad.text
    archive = client.post(f"{url}/{red.id}/edit", follow_redirects=False,
                          data={"csrf_token": csrf, "archived": "true"})  # fmt: skip
    assert archive.status_code == 303
    db.refresh(red)
    assert red.archived_at is not None
    assert f'id="prompt-{red.id}"' not in client.get(url).text
    assert f'id="prompt-{red.id}"' in client.get(url, params={"archived": "1"}).text
    gone = client.post(f"{url}/{blue.id}/delete", data={"csrf_token": csrf},
                       follow_redirects=False)  # fmt: skip
    assert gone.status_code == 303 and db.get(Prompt, blue.id) is None
    # Another project's prompt is not reachable through this project's pages.
    other = create_project(db, data=ProjectCreate(name="Q"), creator=lead)
    foreign = Prompt(project_id=other.id, text="elsewhere", split="train", tags=[])
    db.add(foreign)
    db.commit()
    assert client.post(f"{url}/{foreign.id}/delete", data={"csrf_token": csrf}).status_code == 404


def _serve_all(db: Session, project: Project, annotator: Any) -> set[int]:
    """Every pair the scheduler hands this annotator; the pairs are left as they were."""
    served: set[int] = set()
    while (pair := next_pair(db, project=project, annotator=annotator)) is not None:
        served.add(pair.pair_id)
        # As if voted to the full: the reservation goes, and so does the pair from the queue.
        db.execute(Pair.__table__.update().where(Pair.id == pair.pair_id).values(vote_count=3))
        db.execute(Reservation.__table__.delete().where(Reservation.pair_id == pair.pair_id))
        assert len(served) < 20
    db.execute(Pair.__table__.update().where(Pair.id.in_(served)).values(vote_count=0))
    return served


def test_archived_models_and_prompts_leave_new_pairs_and_serving(
    db: Session, make_user: Any
) -> None:
    lead, _ = make_user("lead")
    annotator, _ = make_user("annotator")
    project = create_project(db, data=ProjectCreate(name="pairs"), creator=lead)
    add_member(db, project=project, user=annotator, role="annotator")
    models = [ModelVersion(project_id=project.id, name=f"m{k}", base="toy", params={})
              for k in range(3)]  # fmt: skip
    prompts = [Prompt(project_id=project.id, text=f"p{k}", split="train", tags=[])
               for k in range(2)]  # fmt: skip
    db.add_all([*models, *prompts])
    db.flush()

    def archive(thing: Any, archived: bool = True) -> None:
        if isinstance(thing, Prompt):
            update_prompt(db, prompt=thing, data=PromptUpdate(archived=archived))
        else:
            update_model(db, model=thing, data=ModelUpdate(archived=archived))

    archive(models[2])
    images = [_image(db, project.id, p.id, m.id, seed=0) for p in prompts for m in models]
    made = make_pairs(db, project=project, images=images)
    # Only m0 vs m1, per prompt: the archived model's images are left out of new pairs.
    assert len(made) == 2 and all(p.purpose == "eval" for p in made)
    archived_images = {i.id for i in images if i.model_version_id == models[2].id}
    assert not any({p.image_a_id, p.image_b_id} & archived_images for p in made)
    assert _serve_all(db, project, annotator) == {p.id for p in made}
    # Back from the archive, the model's images take their pairs.
    archive(models[2], False)
    made += make_pairs(db, project=project, images=[i for i in images if i.id in archived_images])
    assert len(made) == 6
    by_prompt = {q.id: {p.id for p in made if p.prompt_id == q.id} for q in prompts}
    with_m2 = {p.id for p in made if {p.image_a_id, p.image_b_id} & archived_images}
    every = {p.id for p in made}
    # Pairs made before archiving are kept but no longer served, whichever archive hides them;
    # one archive lifted leaves hidden what the other still hides.
    archive(models[2])
    archive(prompts[1])
    assert _serve_all(db, project, annotator) == by_prompt[prompts[0].id] - with_m2
    archive(prompts[1], False)
    assert _serve_all(db, project, annotator) == every - with_m2
    archive(prompts[1])
    archive(models[2], False)
    assert _serve_all(db, project, annotator) == by_prompt[prompts[0].id]
    archive(prompts[1], False)
    assert _serve_all(db, project, annotator) == every
    assert pairs_left(db, project=project, annotator=annotator) == 6
    # An archived project serves nothing and has nothing left.
    project.archived_at = utcnow()
    assert _serve_all(db, project, annotator) == set()
    assert pairs_left(db, project=project, annotator=annotator) == 0
    kept = select(func.count()).select_from(Pair).where(Pair.project_id == project.id)
    assert db.scalar(kept) == 6


def test_projects_are_renamed_archived_and_deleted_only_when_empty(
    client: Any, db: Session, make_user: Any, sent_jobs: list[tuple[int, str]]
) -> None:
    h, pid, lead = _setup(client, make_user)
    renamed = client.patch(f"/api/v1/projects/{pid}", json={"name": "life, renamed"}, headers=h)
    assert renamed.status_code == 200 and renamed.json()["name"] == "life, renamed"
    archived = client.patch(f"/api/v1/projects/{pid}", json={"archived": True}, headers=h)
    assert archived.json()["archived"] is True
    assert [e.details for e in _audit(db, "project.update")] == [
        {"name": ["life", "life, renamed"]}, {"archived": True},
    ]  # fmt: skip
    refused = client.post(f"/api/v1/projects/{pid}/jobs", json={"kind": "fit_ratings"},
                          headers=h)  # fmt: skip
    assert refused.status_code == 409 and "archived" in refused.json()["detail"]
    project = db.get(Project, pid)
    assert project is not None
    annotator, _ = make_user("annotator")
    assert next_pair(db, project=project, annotator=annotator) is None
    client.patch(f"/api/v1/projects/{pid}", json={"archived": False}, headers=h)
    job = client.post(f"/api/v1/projects/{pid}/jobs", json={"kind": "fit_ratings"}, headers=h)
    assert job.status_code == 202
    held = client.delete(f"/api/v1/projects/{pid}", headers=h)
    assert held.status_code == 409 and "1 jobs" in held.json()["detail"]
    # A project with only its setup (prompts, a model and its check) can go.
    empty = client.post("/api/v1/projects", json={"name": "mistake"}, headers=h).json()["id"]
    client.post(f"/api/v1/projects/{empty}/prompts", json={"prompts": [{"text": "x"}]}, headers=h)
    _model(client, h, empty, "m")
    assert client.delete(f"/api/v1/projects/{empty}", headers=h).status_code == 204
    db.expire_all()
    assert db.get(Project, empty) is None
    left = select(func.count()).select_from(Prompt).where(Prompt.project_id == empty)
    assert db.scalar(left) == 0
    [deleted] = _audit(db, "project.delete")
    assert deleted.project_id == empty and deleted.details == {"name": "mistake"}


def test_project_page_renames_archives_and_deletes(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = _lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="Kept"), creator=lead)
    spare = create_project(db, data=ProjectCreate(name="Spare"), creator=lead)
    db.commit()
    settings = client.get(f"/projects/{project.id}/settings").text
    assert 'id="project"' in settings and 'data-action="archive"' in settings
    # The project section is drawn once, in the page; the title is text only.
    assert settings.count('id="project"') == 1
    assert "<title>Kept · settings · prefloop</title>" in settings
    edit = client.post(f"/projects/{project.id}/edit", follow_redirects=False,
                       data={"csrf_token": csrf, "name": "Kept, renamed"})  # fmt: skip
    assert edit.status_code == 303
    client.post(f"/projects/{project.id}/edit", data={"csrf_token": csrf, "archived": "true"})
    home = client.get("/").text
    archived_part = home.split('id="archived-projects"', 1)
    assert len(archived_part) == 2 and "Kept, renamed" in archived_part[1]
    assert "Kept, renamed" not in archived_part[0]
    gone = client.post(f"/projects/{spare.id}/delete", data={"csrf_token": csrf},
                       follow_redirects=False)  # fmt: skip
    assert gone.status_code == 303 and gone.headers["location"] == "/"
    db.expire_all()
    assert db.get(Project, spare.id) is None


def test_model_page_archives_renames_and_refuses_a_referenced_delete(
    client: Any, db: Session, make_user: Any
) -> None:
    client, lead, csrf = _lead_client(client, make_user)
    project = create_project(db, data=ProjectCreate(name="P"), creator=lead)
    model = ModelVersion(project_id=project.id, name="used", base="toy", params={})
    prompt = Prompt(project_id=project.id, text="p", split="train", tags=[])
    db.add_all([model, prompt])
    db.flush()
    _image(db, project.id, prompt.id, model.id, seed=0)
    db.commit()
    url = f"/projects/{project.id}/models/{model.id}"
    refused = client.post(f"{url}/delete", data={"csrf_token": csrf})
    assert refused.status_code == 409 and "archive it instead" in refused.text
    client.post(f"{url}/edit", data={"csrf_token": csrf, "name": "used-v1"})
    client.post(f"{url}/edit", data={"csrf_token": csrf, "archived": "true"})
    db.refresh(model)
    assert model.name == "used-v1" and model.archived_at is not None
    page = client.get(f"/projects/{project.id}/models").text
    assert re.search(r'id="archived-models".*used-v1', page, re.S)
