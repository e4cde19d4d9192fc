"""Hostile input: oversized uploads, non-images, truncated and bomb images, wrong encodings,
path traversal on media URLs, out-of-range ids, and HTML/JS in every name shown on a page.

Every refusal is a clear 4xx and stores nothing: rows of every table and files of the media
store are counted before and after.
"""

from __future__ import annotations

import html
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import get_settings
from app.core.storage import get_media_store
from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.models import Job
from app.pairs.models import Pair
from app.projects.models import Membership, Project, Prompt
from app.ratings.models import Rating, RatingFit
from app.users.models import User
from app.votes.models import Vote
from tests.route_matrix import World, build_world
from tests.support import bearer

TABLES = (Project, Prompt, Image, Pair, Vote, ModelVersion, User, Membership, RatingFit, Rating)


def png(width: int = 16, height: int = 16, seed: int = 0) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), (seed % 256, 40, 90)).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared_png(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header declares width × height pixels (a bomb when huge)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


GOOD = png()
BAD_IMAGES = {
    "not an image": b"GIF? no: just some text bytes",
    "truncated png": GOOD[: len(GOOD) // 2],
    "png without its end": GOOD[:-12],
    "bomb 100000x100000": declared_png(100_000, 100_000),
    "bomb past MAX_IMAGE_PIXELS": declared_png(10_000, 10_000),
    "empty": b"",
}


def counts(db: Session) -> dict[str, int]:
    db.expire_all()
    return {t.__tablename__: int(db.scalar(select(func.count()).select_from(t))) for t in TABLES}


def media_files() -> set[Path]:
    root = get_media_store().root
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture()
def world(db: Session, make_user: Any) -> World:
    return build_world(db, make_user)


def lead_headers(world: World) -> dict[str, str]:
    return bearer(world.tokens["lead"] or "")


# --------------------------------------------------------------------------------------------
# Uploads over the size limit
# --------------------------------------------------------------------------------------------


def test_every_upload_over_the_limit_is_413_and_stores_nothing(
    client: Any, db: Session, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 4096)
    pid = world.params["project_id"]
    big_text = b"a prompt that repeats\n" * 400
    big_parquet = pickapic_file([row(k) for k in range(8)])
    assert len(big_text) > 4096 and len(big_parquet) > 4096
    uploads = [
        (f"/api/v1/projects/{pid}/prompts/upload", {}, big_text),
        (f"/projects/{pid}/prompts", {"Accept": "text/html"}, big_text),
        (f"/api/v1/projects/{pid}/import?format=pickapic", {}, big_parquet),
        (f"/api/v1/projects/{pid}/import?format=fastchat", {}, b"[" + b" " * 5000 + b"]"),
    ]
    before, files = counts(db), media_files()
    for url, headers, data in uploads:
        response = client.post(
            url, files={"file": ("f", data)}, headers={**lead_headers(world), **headers}
        )
        assert response.status_code == 413, (url, response.status_code, response.text[:300])
        assert "4096" in response.text, url
    assert counts(db) == before and media_files() == files


# --------------------------------------------------------------------------------------------
# Prompt files: images, bombs and wrong encodings are refused by both upload paths
# --------------------------------------------------------------------------------------------

NOT_PROMPT_TEXT = {
    # (The "not an image" bytes are plain text, so they are a valid prompt file.)
    **{f"image: {n}": data for n, data in BAD_IMAGES.items() if data and n != "not an image"},
    "a real png": GOOD,
    "latin-1 text": "café crème\n".encode("latin-1"),
    "utf-16 text": "a red square\n".encode("utf-16"),
    "nul bytes": b"a prompt\x00with a nul\n",
    "lone surrogate as json": b'{"text": "\\ud800 broken"}\n',
}


@pytest.mark.parametrize("name", sorted(NOT_PROMPT_TEXT))
def test_prompt_uploads_refuse_files_that_are_not_prompt_text(
    client: Any, db: Session, world: World, name: str
) -> None:
    pid = world.params["project_id"]
    data = NOT_PROMPT_TEXT[name]
    filename = "prompts.jsonl" if name.endswith("json") else "prompts.txt"
    before, files = counts(db), media_files()
    api = client.post(
        f"/api/v1/projects/{pid}/prompts/upload",
        files={"file": (filename, data, "application/octet-stream")},
        headers=lead_headers(world),
    )
    assert api.status_code == 422, (api.status_code, api.text[:300])
    errors = api.json()["detail"]["errors"]
    assert errors and all(isinstance(e, str) and e for e in errors)
    page = client.post(
        f"/projects/{pid}/prompts",
        files={"file": (filename, data, "application/octet-stream")},
        headers={**lead_headers(world), "Accept": "text/html"},
    )
    assert page.status_code == 422, (page.status_code, page.text[:300])
    assert html.escape(errors[0]) in page.text
    assert counts(db) == before and media_files() == files


# --------------------------------------------------------------------------------------------
# Pick-a-Pic parquet with hostile image bytes
# --------------------------------------------------------------------------------------------


def row(k: int, **change: Any) -> dict[str, Any]:
    base = {
        "caption": f"hostile prompt {k}",
        "jpg_0": png(seed=2 * k),
        "jpg_1": png(seed=2 * k + 1),
        "label_0": 1.0,
        "label_1": 0.0,
        "model_0": "m0",
        "model_1": "m1",
        "image_0_uid": f"h{2 * k}",
        "image_1_uid": f"h{2 * k + 1}",
        "user_id": 3,
        "ranking_id": 500 + k,
    }
    return {**base, **change}


def pickapic_file(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def import_pickapic(client: Any, world: World, data: bytes) -> Any:
    return client.post(
        f"/api/v1/projects/{world.params['project_id']}/import?format=pickapic",
        files={"file": ("votes.parquet", data)},
        headers=lead_headers(world),
    )


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_pickapic_image_cells_that_are_not_complete_images_store_nothing(
    client: Any, db: Session, world: World, name: str
) -> None:
    """Rows 0-2 are good; row 3's second image is bad: no rows and NO media files are added."""
    rows = [row(k) for k in range(3)] + [row(3, jpg_1=BAD_IMAGES[name])]
    before, files = counts(db), media_files()
    response = import_pickapic(client, world, pickapic_file(rows))
    assert response.status_code == 422, (response.status_code, response.text[:300])
    errors = response.json()["detail"]["errors"]
    assert errors[0].startswith("row 3: jpg_1 "), errors
    assert counts(db) == before
    assert media_files() == files, "a refused import left image files behind"


def test_pickapic_image_cells_of_the_wrong_type_are_refused(
    client: Any, db: Session, world: World
) -> None:
    before, files = counts(db), media_files()
    # Base64 text where the bytes belong: the column is a string column, not binary.
    rows = [row(0, jpg_0="iVBORw0KGgo="), row(1, jpg_0="iVBORw0KGgoAAAA=")]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    response = import_pickapic(client, world, sink.getvalue())
    assert response.status_code == 422, response.text[:300]
    assert "jpg_0 must hold the image file's bytes" in response.json()["detail"]["errors"][0]
    assert counts(db) == before and media_files() == files


def test_a_good_pickapic_file_still_imports_and_stores_each_image_once(
    client: Any, db: Session, world: World
) -> None:
    before, files = counts(db), media_files()
    rows = [row(k) for k in range(3)] + [row(3, image_1_uid="h1", jpg_1=None)]
    response = import_pickapic(client, world, pickapic_file(rows))
    assert response.status_code == 201, response.text[:500]
    assert response.json()["images"] == 7  # h1 is reused by row 3, without bytes of its own
    assert counts(db)["images"] == before["images"] + 7
    assert len(media_files() - files) == 7


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    bad_row=st.integers(0, 3),
    column=st.sampled_from(["jpg_0", "jpg_1"]),
    how=st.sampled_from(["truncate", "flip", "insert"]),
    position=st.integers(0, 10_000),
)
def test_property_a_corrupted_image_anywhere_leaves_no_rows_and_no_files(
    client: Any, db: Session, world: World, bad_row: int, column: str, how: str, position: int
) -> None:
    rows = [row(k) for k in range(4)]
    data = rows[bad_row][column]
    at = position % len(data)
    if how == "truncate":
        data = data[:at]
    elif how == "flip":
        data = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
    else:
        data = data[:at] + b"\x00junk" + data[at:]
    rows[bad_row][column] = data
    before, files = counts(db), media_files()
    response = import_pickapic(client, world, pickapic_file(rows))
    assert response.status_code in (201, 422), response.text[:300]
    if response.status_code == 422:
        assert response.json()["detail"]["errors"][0].startswith(f"row {bad_row}: {column} ")
        assert counts(db) == before and media_files() == files
    else:
        # Accepted bytes are a complete image (a flip in an ignored byte can leave it valid).
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()


# --------------------------------------------------------------------------------------------
# FastChat battles in the wrong encoding or shape
# --------------------------------------------------------------------------------------------

BAD_BATTLES = {
    "latin-1": json.dumps([{"model_a": "é", "model_b": "b", "winner": "tie"}])
    .encode()
    .decode()
    .replace("\\u00e9", "é")
    .encode("latin-1"),
    "utf-16": json.dumps([{"model_a": "a", "model_b": "b", "winner": "tie"}]).encode("utf-16"),
    "a png": GOOD,
    "a bomb png": declared_png(100_000, 100_000),
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "a number as a name": b'[{"model_a": 1e999999, "model_b": "b", "winner": "tie"}]',
    "nul in a name": json.dumps([{"model_a": "a\x00", "model_b": "b", "winner": "tie"}]).encode(),
    "html in an unknown winner": b'[{"model_a": "a", "model_b": "b", "winner": "<script>"}]',
}


@pytest.mark.parametrize("name", sorted(BAD_BATTLES))
def test_fastchat_import_refuses_bad_encodings_and_shapes(
    client: Any, db: Session, world: World, name: str
) -> None:
    before = counts(db)
    response = client.post(
        f"/api/v1/projects/{world.params['project_id']}/import?format=fastchat",
        files={"file": ("battles.json", BAD_BATTLES[name])},
        headers=lead_headers(world),
    )
    assert response.status_code == 422, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]["errors"]
    assert counts(db) == before


# --------------------------------------------------------------------------------------------
# Media URLs: traversal, odd ids, other projects' images
# --------------------------------------------------------------------------------------------

TRAVERSALS = [
    "..",
    "%2e%2e",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fpyproject.toml",
    "%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "....%2f%2f....%2f%2fetc%2fpasswd",
    "C:%5cWindows%5cwin.ini",
    "a" * 33,
    "0" * 10_000,
    "%00",
    "abc%00.png",
    "*",
    "' OR '1'='1",
]


@pytest.mark.parametrize("image_id", TRAVERSALS)
def test_image_urls_never_reach_outside_the_store(client: Any, world: World, image_id: str) -> None:
    response = client.get(f"/api/v1/images/{image_id}", headers=lead_headers(world))
    assert response.status_code == 404, (response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json")
    assert "root:" not in response.text and "[project]" not in response.text


def test_a_tampered_storage_key_is_not_followed(
    client: Any, db: Session, world: World, tmp_path: Path
) -> None:
    """Even a row pointing outside the store (a bad migration, a tampered row) serves nothing."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(GOOD)
    image = db.get(Image, world.params["image_id"])
    assert image is not None
    for key in (str(secret), "../../../../" + str(secret).lstrip("/"), "aa/bb/../../x.png"):
        image.storage_key = key
        db.commit()
        response = client.get(f"/api/v1/images/{image.id}", headers=lead_headers(world))
        assert response.status_code == 404, (key, response.status_code)
        assert response.content != GOOD


@pytest.mark.parametrize(
    "path",
    [
        "/static/..%2f..%2fpyproject.toml",
        "/static/%2e%2e/%2e%2e/pyproject.toml",
        "/static/..%5c..%5cpyproject.toml",
        "/static//etc/passwd",
    ],
)
def test_static_files_stay_in_their_folder(client: Any, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert "[project]" not in response.text and "root:" not in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/projects/{big}",
        "/api/v1/projects/{big}/models",
        "/api/v1/jobs/{big}",
        "/api/v1/reward-models/{big}",
        "/projects/{big}",
        "/projects/{big}/vote",
        "/jobs/{big}",
    ],
)
@pytest.mark.parametrize("big", [2**31, 2**63, 10**30, -(2**31) - 1])
def test_ids_past_the_database_range_are_refused_not_retried(
    client: Any, world: World, path: str, big: int
) -> None:
    """An out-of-range id is the request's fault: a 4xx, never a 503 asking to retry."""
    response = client.get(path.format(big=big), headers=lead_headers(world))
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])
    assert "retry-after" not in response.headers


def test_out_of_range_numbers_in_bodies_are_refused(client: Any, world: World) -> None:
    response = client.post(
        f"/api/v1/pairs/{2**40}/votes",
        json={"choice": "left", "left_image_id": world.params["image_id"]},
        headers=lead_headers(world),
    )
    assert 400 <= response.status_code < 500, response.text[:200]


@pytest.mark.parametrize(
    "query",
    ["offset=%C2%B2", "model_id=%C2%B3", "prompt_id=%D9%A3", "offset=99999999999999999999"],
)
def test_dashboard_gallery_odd_numbers_are_not_errors(
    client: Any, world: World, query: str
) -> None:
    """Unicode digits ('²', '٣') and huge offsets in the gallery's query are not server errors."""
    response = client.get(
        f"/projects/{world.params['project_id']}/dash/gallery?{query}",
        headers={**lead_headers(world), "Accept": "text/html"},
    )
    assert response.status_code < 500, (response.status_code, response.text[:200])


@pytest.mark.parametrize("latency", ["²", "١٢", "9" * 12, "-1", " 12 "])
def test_vote_form_odd_latency_is_not_an_error(client: Any, world: World, latency: str) -> None:
    response = client.post(
        f"/projects/{world.params['project_id']}/vote",
        data={
            "pair_id": str(world.params["pair_id"]),
            "left_image_id": world.ids["images"][2],
            "choice": "left",
            "latency_ms": latency,
        },
        headers={**bearer(world.tokens["annotator"] or ""), "Accept": "text/html"},
    )
    if latency == " 12 ":
        # Read as 12 ms: refused with its reason (the project's minimum viewing time).
        assert response.status_code == 422 and "minimum viewing time" in response.text
    else:
        assert response.status_code == 200, (response.status_code, response.text[:200])


# --------------------------------------------------------------------------------------------
# HTML and script in every name a page shows
# --------------------------------------------------------------------------------------------

PAYLOADS = {
    "project": '<script>window.__xss=1</script>P"roj',
    "description": '<img src=x onerror="window.__xss=1">desc',
    "prompt": '<svg onload="window.__xss=1"></svg>a "prompt" & <b>bold</b>',
    "model": "<iframe src=javascript:window.__xss=1>model",
    "email": "<script>alert(1)</script>@example.com",
    "tag": "<u>tag</u>",
    "job": "<script>job()</script>",
}


def _hostile_world(db: Session, world: World) -> None:
    project = db.get(Project, world.params["project_id"])
    assert project is not None
    project.name = PAYLOADS["project"]
    project.description = PAYLOADS["description"]
    prompt = db.scalar(select(Prompt).where(Prompt.project_id == project.id))
    assert prompt is not None
    prompt.text = PAYLOADS["prompt"]
    prompt.tags = [PAYLOADS["tag"]]
    models = list(db.scalars(select(ModelVersion).where(ModelVersion.project_id == project.id)))
    models[0].name = PAYLOADS["model"]
    annotator = db.get(User, world.params["user_id"])
    assert annotator is not None
    annotator.email = PAYLOADS["email"]
    job = db.get(Job, world.params["job_id"])
    assert job is not None
    job.params = {"note": PAYLOADS["job"]}
    job.log = [PAYLOADS["job"]]
    job.error = PAYLOADS["job"]
    job.metrics = {PAYLOADS["job"]: [[0, 1.0], [1, 2.0]]}
    fit = RatingFit(
        project_id=project.id,
        method={},
        annotators=[
            {
                "annotator_id": annotator.id,
                "votes": 1,
                "decisive": 1,
                "left_rate": 1.0,
                "position_bias_p": None,
                "skill": 0.5,
                "left_habit": 0.0,
                "agreement": None,
                "gold_accuracy": None,
                "gold_votes": 0,
                "median_latency_ms": 900.0,
                "flags": [PAYLOADS["tag"]],
            }
        ],
        vote_count=1,
    )
    db.add(fit)
    db.flush()
    for rank, model in enumerate(models):
        db.add(
            Rating(
                fit_id=fit.id,
                model_version_id=model.id,
                score=0.1 * rank,
                rating=1000.0 + rank,
                ci_low=990.0,
                ci_high=1010.0 + rank,
                rank=rank + 1,
                votes=1,
            )
        )
    admin = db.scalar(select(User).where(User.role == "admin").order_by(User.id.desc()))
    record(
        db,
        actor=admin,
        action="project.create",
        target=PAYLOADS["project"],
        details={"name": PAYLOADS["project"]},
    )
    db.commit()


def _escaped_forms(payload: str) -> set[str]:
    return {str(escape(payload)), html.escape(payload), html.escape(payload, quote=False)}


def _assert_escaped(text: str, where: str, expect: list[str]) -> None:
    for name, payload in PAYLOADS.items():
        assert payload not in text, f"{where}: the raw {name} payload is in the page"
    for tag in ("<script>window", "<script>alert", "<img src=x", "<svg onload", "<iframe", "<u>"):
        assert tag not in text, f"{where}: {tag!r} reached the page unescaped"
    for name in expect:
        shown = any(form in text for form in _escaped_forms(PAYLOADS[name]))
        assert shown, f"{where}: the {name} is not shown (escaped)"


def test_names_with_html_are_escaped_on_every_page(client: Any, db: Session, world: World) -> None:
    _hostile_world(db, world)
    pid, job_id = world.params["project_id"], world.params["job_id"]
    lead = {**lead_headers(world), "Accept": "text/html"}
    annotator = {**bearer(world.tokens["annotator"] or ""), "Accept": "text/html"}
    admin = {**bearer(world.tokens["admin"] or ""), "Accept": "text/html"}
    pages: list[tuple[str, dict[str, str], list[str]]] = [
        ("/", lead, ["project"]),
        ("/", annotator, ["project"]),
        (f"/projects/{pid}", lead, ["project", "model", "email"]),
        (f"/projects/{pid}/prompts", lead, ["project", "prompt"]),
        (f"/projects/{pid}/models", lead, ["project", "model"]),
        (f"/projects/{pid}/settings", lead, ["project"]),
        (f"/projects/{pid}/annotators", lead, ["project", "email"]),
        (f"/projects/{pid}/jobs", lead, ["project"]),
        (f"/projects/{pid}/jobs/new?kind=generate", lead, ["project", "model"]),
        (f"/jobs/{job_id}", lead, ["job"]),
        (f"/projects/{pid}/vote", annotator, ["project", "prompt"]),
        (f"/projects/{pid}/vote/change/{world.params['vote_id']}", annotator, ["prompt"]),
        (f"/projects/{pid}/me", annotator, ["project"]),
        ("/admin/audit", admin, ["project"]),
    ]
    pages += [
        (f"/projects/{pid}/dash/{s}", lead, [])
        for s in ("overview", "leaderboard", "quality", "lineage", "reward", "gallery")
    ]
    for url, headers, expect in pages:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, (url, response.status_code, response.text[:300])
        _assert_escaped(response.text, url, expect)


def test_vote_post_and_invite_answers_escape_names_too(
    client: Any, db: Session, world: World
) -> None:
    _hostile_world(db, world)
    pid = world.params["project_id"]
    vote = client.post(
        f"/projects/{pid}/vote",
        data={
            "pair_id": str(world.params["pair_id"]),
            "choice": "left",
            "left_image_id": world.ids["images"][2],
        },
        headers={**bearer(world.tokens["annotator"] or ""), "HX-Request": "true"},
    )
    assert vote.status_code == 200, vote.text[:300]
    _assert_escaped(vote.text, "vote partial", [])
    invited = client.post(
        f"/projects/{pid}/annotators",
        data={"email": '"<img src=x onerror=alert(1)>"@example.com'},
        headers={**lead_headers(world), "Accept": "text/html"},
    )
    assert invited.status_code == 200, invited.text[:300]
    assert "<img src=x onerror=alert(1)>" not in invited.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in invited.text
    invite = client.get(f"/invite/{world.params['token']}")
    assert invite.status_code == 200
    _assert_escaped(invite.text, "invite page", ["email"])
