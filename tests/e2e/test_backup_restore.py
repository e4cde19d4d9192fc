"""`prefloop backup` and `prefloop restore`: a running Postgres stack backed up and restored into a
fresh database and media dir, served again with every vote and image intact; the SQLite path."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from tests.conftest import create_database, drop_database
from tests.support import REPO, Proc, Stack, base_env, bearer, free_port, login, wait_for


def tiny_png(seed: int, size: int = 8) -> bytes:
    rng = random.Random(seed)
    img = PILImage.new("RGB", (size, size))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def prefloop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def pickapic_file(rows: int, seed: int) -> bytes:
    table = [
        {
            "caption": f"a shape number {k % 3}",
            "jpg_0": tiny_png(seed + 2 * k),
            "jpg_1": tiny_png(seed + 2 * k + 1),
            "label_0": 1.0 if k % 2 else 0.0,
            "label_1": 0.0 if k % 2 else 1.0,
            "model_0": "a",
            "model_1": "b",
            "image_0_uid": f"u{2 * k}",
            "image_1_uid": f"u{2 * k + 1}",
            "user_id": k % 2,
            "ranking_id": 1000 + k,
        }
        for k in range(rows)
    ]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table), sink)
    return sink.getvalue()


def pair_imported_images(db_url: str, project_id: int) -> int:
    """Open pairs between a project's images, as a generate job makes them; how many."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.core.db import make_engine
    from app.images.models import Image
    from app.pairs.service import make_pairs
    from app.projects.models import Project

    engine = make_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session(engine) as session:
            project = session.get(Project, project_id)
            assert project is not None
            images = session.scalars(select(Image).where(Image.project_id == project_id)).all()
            created = len(make_pairs(session, project=project, images=images))
            session.commit()
    finally:
        engine.dispose()
    return created


def snapshot(client: httpx.Client, project_id: int) -> dict[str, Any]:
    """What a lead sees: vote records (export) and images with the sha256 of their served bytes."""
    export = client.get(f"/api/v1/projects/{project_id}/export", params={"format": "jsonl"})
    assert export.status_code == 200, export.text
    votes = {
        row["vote_id"]: (row["pair_id"], row["annotator_id"], row["left_image_id"], row["choice"])
        for row in map(json.loads, export.text.splitlines())
    }
    images = {}
    for image in client.get(f"/api/v1/projects/{project_id}/images").json():
        served = client.get(image["url"])
        assert served.status_code == 200, (image, served.status_code)
        images[image["id"]] = (image["sha256"], hashlib.sha256(served.content).hexdigest())
    return {"votes": votes, "images": images}


@pytest.mark.slow
def test_backup_of_a_running_stack_restores_every_vote_and_image(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    with Stack(tmp_path / "source") as stack:
        assert stack.client is not None
        pid = stack.post("/api/v1/projects", {"name": "backed up"}).json()["id"]
        imported = stack.client.post(
            f"/api/v1/projects/{pid}/import",
            params={"format": "pickapic"},
            files={"file": ("votes.parquet", pickapic_file(8, seed=1), "application/octet-stream")},
            headers={"X-CSRF-Token": stack.csrf},
        )
        assert imported.status_code == 201, imported.text
        # Imported pairs are closed (they carry their votes); open new ones on those images.
        assert pair_imported_images(stack.db_url, pid) >= 3
        for n in range(2):
            member = stack.post(f"/api/v1/projects/{pid}/annotators", {"email": f"a{n}@b.test"})
            auth = bearer(member.json()["token"])
            for _ in range(3):
                pair = stack.client.get(f"/api/v1/projects/{pid}/pairs/next", headers=auth)
                assert pair.status_code == 200, pair.text
                vote = stack.client.post(
                    f"/api/v1/pairs/{pair.json()['pair_id']}/votes",
                    json={
                        "choice": "left",
                        "left_image_id": pair.json()["left"]["image_id"],
                        "idempotency_key": uuid.uuid4().hex,
                    },
                    headers=auth,
                )
                assert vote.status_code == 201, vote.text
        before = snapshot(stack.client, pid)
        assert len(before["votes"]) == 8 + 6 and len(before["images"]) == 16
        assert all(stored == served for stored, served in before["images"].values())

        backup_dir = tmp_path / "backup"
        made = prefloop(stack.env, "backup", "--out", str(backup_dir))
        assert made.returncode == 0, made.stderr
        assert "backed up 14 votes, 16 images" in made.stdout
        manifest = json.loads((backup_dir / "manifest.json").read_text())
        assert manifest["database"] == "postgresql" and manifest["alembic_revision"]
        assert manifest["counts"]["votes"] == 14 and manifest["counts"]["images"] == 16
        # Votes after the backup are not in it.
        late = stack.client.post(
            f"/api/v1/projects/{pid}/import",
            params={"format": "pickapic"},
            files={"file": ("more.parquet", pickapic_file(2, seed=99), "application/octet-stream")},
            headers={"X-CSRF-Token": stack.csrf},
        )
        assert late.status_code == 201, late.text
        again = prefloop(stack.env, "backup", "--out", str(backup_dir))
        assert again.returncode == 1 and "not empty" in again.stderr
        admin = stack.admin

    # A new, empty database and media dir: the source stack and its database are gone.
    name = f"prefloop_restore_{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **stack.env,
        "PREFLOOP_DATABASE_URL": create_database(name),
        "PREFLOOP_MEDIA_DIR": str(tmp_path / "restored-media"),
        "PREFLOOP_DATA_DIR": str(tmp_path / "restored-data"),
    }
    serve: Proc | None = None
    try:
        restored = prefloop(env, "restore", str(backup_dir))
        assert restored.returncode == 0, restored.stderr
        assert "restored 14 votes, 16 images and 16 media files" in restored.stdout
        twice = prefloop(env, "restore", str(backup_dir))
        assert twice.returncode == 1 and "restore into an empty database" in twice.stderr
        forced = prefloop(env, "restore", "--force", str(backup_dir))
        assert forced.returncode == 0, forced.stderr
        assert "restored 14 votes, 16 images" in forced.stdout

        serve = Proc(["serve", "--no-worker", "--port", str(port)], env, tmp_path / "restored.log")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, 60)
        with httpx.Client(base_url=base, timeout=15) as client:
            login(client, *admin)  # the admin's password came back with the users table
            after = snapshot(client, pid)
        assert after == before
    finally:
        if serve is not None:
            serve.stop()
        drop_database(name)


def _embedded_env(data_dir: Path) -> dict[str, str]:
    return base_env(PREFLOOP_DATA_DIR=str(data_dir))


def _populate_sqlite(data_dir: Path) -> dict[str, Any]:
    """A project, two stored images, a pair and a vote in an embedded data dir."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    import app.models  # noqa: F401 - every table known to the metadata
    from app.core.db import make_engine
    from app.core.migrate import upgrade_head
    from app.core.storage import MediaStore
    from app.images.service import store_image
    from app.pairs.models import Pair
    from app.projects.models import Project, Prompt
    from app.users.models import User
    from app.votes.models import Vote

    data_dir.mkdir(parents=True)
    url = f"sqlite:///{data_dir / 'prefloop.db'}"
    upgrade_head(url)
    engine = make_engine(url)
    store = MediaStore(data_dir / "media")
    with Session(engine) as session:
        project = Project(name="embedded", description="", settings={})
        user = User(email="a@b.test", role="annotator", is_active=True)
        session.add_all([project, user])
        session.flush()
        prompt = Prompt(project_id=project.id, text="a circle", split="train", tags=[])
        session.add(prompt)
        session.flush()
        images = [
            store_image(session, store, project_id=project.id, prompt_id=prompt.id, png=png)
            for png in (tiny_png(1), tiny_png(2))
        ]
        a, b = sorted(i.id for i in images)
        pair = Pair(
            project_id=project.id,
            prompt_id=prompt.id,
            image_a_id=a,
            image_b_id=b,
            purpose="eval",
            votes_wanted=3,
            vote_count=1,
        )
        session.add(pair)
        session.flush()
        session.add(
            Vote(
                pair_id=pair.id,
                project_id=project.id,
                annotator_id=user.id,
                left_image_id=a,
                choice="left",
                idempotency_key="k1",
            )
        )
        session.commit()
        facts = {
            "images": {i.id: (i.sha256, i.storage_key) for i in images},
            "votes": [(v.id, v.pair_id, v.choice) for v in session.scalars(select(Vote))],
        }
    engine.dispose()
    return facts


def _read_sqlite(data_dir: Path) -> dict[str, Any]:
    import sqlite3

    with sqlite3.connect(data_dir / "prefloop.db") as conn:
        images = {
            row[0]: (row[1], row[2])
            for row in conn.execute("SELECT id, sha256, storage_key FROM images")
        }
        votes = list(conn.execute("SELECT id, pair_id, choice FROM votes"))
    return {"images": images, "votes": [tuple(v) for v in votes]}


@pytest.mark.slow
def test_embedded_sqlite_backup_and_restore(tmp_path: Path) -> None:
    source = tmp_path / "source"
    facts = _populate_sqlite(source)
    (source / "secret_key").write_text("embedded-generated-key")
    made = prefloop(_embedded_env(source), "backup", "--out", str(tmp_path / "bk"))
    assert made.returncode == 0, made.stderr
    manifest = json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert manifest["database"] == "sqlite" and manifest["secret_key"] is True
    assert manifest["counts"]["votes"] == 1 and manifest["media"]["files"] == 2

    target = tmp_path / "target"
    restored = prefloop(_embedded_env(target), "restore", str(tmp_path / "bk"))
    assert restored.returncode == 0, restored.stderr
    assert _read_sqlite(target) == facts
    for sha, key in facts["images"].values():
        assert hashlib.sha256((target / "media" / key).read_bytes()).hexdigest() == sha
    assert (target / "secret_key").read_text() == "embedded-generated-key"

    refused = prefloop(_embedded_env(target), "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "restore into an empty database" in refused.stderr
    forced = prefloop(_embedded_env(target), "restore", "--force", str(tmp_path / "bk"))
    assert forced.returncode == 0, forced.stderr
    assert _read_sqlite(target) == facts


@pytest.mark.slow
def test_restore_refuses_a_damaged_media_file(tmp_path: Path) -> None:
    source = tmp_path / "source"
    facts = _populate_sqlite(source)
    assert prefloop(_embedded_env(source), "backup", "--out", str(tmp_path / "bk")).returncode == 0
    _, key = next(iter(facts["images"].values()))
    (tmp_path / "bk" / "media" / key).write_bytes(b"not the image")
    refused = prefloop(_embedded_env(tmp_path / "target"), "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "damaged" in refused.stderr
    assert not (tmp_path / "target" / "prefloop.db").exists()
