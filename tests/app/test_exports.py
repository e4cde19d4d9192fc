"""Exports (Pick-a-Pic parquet, FastChat, JSONL, CSV) and imports, over Postgres."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import random
import tracemalloc
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session

from app.cli import main
from app.core.db import session_scope
from app.core.storage import get_media_store
from app.exports import importers
from app.exports.routes import streaming_sessions
from app.exports.service import (
    PICKAPIC_SCHEMA,
    count_export_rows,
    export_jsonl,
    export_pickapic,
    export_stream,
    spreadsheet_safe,
)
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.pairs.models import Pair
from app.projects.models import Membership, Project, Prompt
from app.ratings.models import Rating, RatingFit
from app.users import service as users
from app.users.models import User
from app.votes.models import Vote
from tests.support import bearer

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def tiny_png(seed: int, size: int = 8) -> bytes:
    rng = random.Random(seed)
    img = PILImage.new("RGB", (size, size))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Built:
    project: Project
    models: dict[str, ModelVersion]
    annotators: list[User]
    votes: list[Vote]


def build_project(session: Session, lead: User | None = None, name: str = "arena") -> Built:
    """Two prompts, three model versions, eval/train/gold pairs and votes of every choice."""
    project = Project(name=name, settings={}, created_by_id=lead.id if lead else None)
    session.add(project)
    session.flush()
    if lead is not None:
        session.add(Membership(project_id=project.id, user_id=lead.id, role="lead"))
    models = {}
    for model_name in ("base", "dpo-1", "dpo-2"):
        models[model_name] = ModelVersion(
            project_id=project.id, name=model_name, base="toy", params={}, evaluation={}
        )
        session.add(models[model_name])
    prompts = [
        Prompt(project_id=project.id, text="a red circle", split="train", tags=[]),
        Prompt(project_id=project.id, text='=HYPERLINK("http://x")', split="test", tags=[]),
    ]
    session.add_all(prompts)
    session.flush()
    store = get_media_store()
    images: dict[tuple[int, str, int], Image] = {}
    for p_index, prompt in enumerate(prompts):
        for m_index, model_name in enumerate(models):
            for seed in (0, 1):
                images[(p_index, model_name, seed)] = store_image(
                    session,
                    store,
                    project_id=project.id,
                    prompt_id=prompt.id,
                    png=tiny_png(1000 * p_index + 10 * m_index + seed),
                    model_version_id=models[model_name].id,
                    seed=seed,
                )
    pairs = []
    for p_index, prompt in enumerate(prompts):
        specs = [
            ("eval", images[(p_index, "base", 0)], images[(p_index, "dpo-1", 0)], False),
            ("eval", images[(p_index, "dpo-1", 0)], images[(p_index, "dpo-2", 0)], False),
            ("train", images[(p_index, "base", 0)], images[(p_index, "base", 1)], False),
            ("eval", images[(p_index, "base", 1)], images[(p_index, "dpo-2", 1)], True),
        ]
        for purpose, a, b, gold in specs:
            pair = Pair(
                project_id=project.id,
                prompt_id=prompt.id,
                image_a_id=a.id,
                image_b_id=b.id,
                purpose=purpose,
                is_gold=gold,
                votes_wanted=3,
                vote_count=0,
            )
            session.add(pair)
            pairs.append(pair)
    annotators = []
    for k in range(3):
        user = users.create_user(
            session, email=f"ann{k}-{uuid.uuid4().hex[:6]}@example.com", role="annotator"
        )
        session.add(Membership(project_id=project.id, user_id=user.id, role="annotator"))
        annotators.append(user)
    session.flush()
    choices = ["left", "right", "tie", "both_bad", "skip"]
    votes = []
    for p_index, pair in enumerate(pairs):
        for a_index, annotator in enumerate(annotators):
            left = pair.image_a_id if (p_index + a_index) % 2 else pair.image_b_id
            vote = Vote(
                pair_id=pair.id,
                project_id=project.id,
                annotator_id=annotator.id,
                left_image_id=left,
                choice=choices[(p_index * 3 + a_index) % len(choices)],
                latency_ms=100 * (a_index + 1),
                created_at=T0 + dt.timedelta(minutes=p_index * 3 + a_index),
            )
            session.add(vote)
            votes.append(vote)
    session.flush()
    return Built(project=project, models=models, annotators=annotators, votes=votes)


def _collect(session: Session, project_id: int, fmt: str) -> bytes:
    return b"".join(export_stream(session, project_id, fmt))


def _table(data: bytes) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_rows(rows: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """What must survive a round trip: everything but the ids the target assigns anew."""
    return Counter(
        (
            r["caption"],
            _sha(r["jpg_0"]),
            _sha(r["jpg_1"]),
            r["label_0"],
            r["label_1"],
            r["model_0"],
            r["model_1"],
            r["has_label"],
            r["are_different"],
            r["num_example_per_prompt"],
            r["created_at"],
        )
        for r in rows
    )


def _project_counts(session: Session, project_id: int) -> dict[str, int]:
    counts = {}
    for name, model in (
        ("votes", Vote),
        ("pairs", Pair),
        ("images", Image),
        ("prompts", Prompt),
        ("models", ModelVersion),
        ("members", Membership),
        ("fits", RatingFit),
    ):
        counts[name] = session.scalar(
            select(func.count()).select_from(model).where(model.project_id == project_id)
        )
    return counts


# --------------------------------------------------------------------------------------------
# Export contents
# --------------------------------------------------------------------------------------------


def test_pickapic_export_rows_labels_and_bytes(db) -> None:  # type: ignore[no-untyped-def]
    built = build_project(db)
    data = _collect(db, built.project.id, "pickapic")
    table = pq.read_table(io.BytesIO(data))
    assert table.schema.names == PICKAPIC_SCHEMA.names
    rows = table.to_pylist()
    expected = [
        v
        for v in built.votes
        if v.choice != "skip" and not db.get(Pair, v.pair_id).is_gold  # type: ignore[union-attr]
    ]
    assert len(rows) == len(expected) == count_export_rows(db, built.project.id, "pickapic")
    store = get_media_store()
    by_vote = {row["ranking_id"]: row for row in rows}
    for vote in expected:
        row = by_vote[vote.id]
        left = db.get(Image, vote.left_image_id)
        assert row["image_0_uid"] == vote.left_image_id and row["user_id"] == vote.annotator_id
        assert row["jpg_0"] == store.read(left.storage_key)  # type: ignore[union-attr]
        assert _sha(row["jpg_0"]) == left.sha256  # type: ignore[union-attr]
        labels = (row["label_0"], row["label_1"], row["has_label"])
        assert (
            labels
            == {
                "left": (1.0, 0.0, True),
                "right": (0.0, 1.0, True),
                "tie": (0.5, 0.5, True),
                "both_bad": (0.5, 0.5, False),
            }[vote.choice]
        )
        winner = {"left": row["image_0_uid"], "right": row["image_1_uid"]}.get(vote.choice, "")
        assert row["best_image_uid"] == winner
        assert row["created_at"] == vote.created_at
        assert row["are_different"] is True
    per_caption = Counter(row["caption"] for row in rows)
    assert all(row["num_example_per_prompt"] == per_caption[row["caption"]] for row in rows)
    assert {row["model_0"] for row in rows} <= {"base", "dpo-1", "dpo-2"}


def test_pickapic_export_opens_with_datasets(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import datasets

    built = build_project(db)
    path = tmp_path / "votes.parquet"
    path.write_bytes(_collect(db, built.project.id, "pickapic"))
    dataset = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert dataset.num_rows == count_export_rows(db, built.project.id, "pickapic")
    assert set(PICKAPIC_SCHEMA.names) == set(dataset.column_names)
    first = dataset[0]
    assert isinstance(first["jpg_0"], bytes)
    assert PILImage.open(io.BytesIO(first["jpg_0"])).size == (8, 8)
    assert {(r["label_0"], r["label_1"]) for r in dataset} <= {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}


def test_fastchat_export_is_eval_battles_between_models(db) -> None:  # type: ignore[no-untyped-def]
    from app.ratings.battles import parse_battles_text

    built = build_project(db)
    text = _collect(db, built.project.id, "fastchat").decode()
    battles = json.loads(text)
    pairs = {p.id: p for p in db.scalars(select(Pair).where(Pair.project_id == built.project.id))}
    expected = [
        v
        for v in built.votes
        if v.choice != "skip"
        and pairs[v.pair_id].purpose == "eval"
        and not pairs[v.pair_id].is_gold
    ]
    assert len(battles) == len(expected) > 0
    names = {m.id: m.name for m in built.models.values()}
    for record, vote in zip(battles, sorted(expected, key=lambda v: v.id), strict=True):
        assert set(record) == {
            "model_a",
            "model_b",
            "winner",
            "judge",
            "tstamp",
            "question_id",
            "anony",
        }
        left = db.get(Image, vote.left_image_id)
        assert record["model_a"] == names[left.model_version_id]  # type: ignore[union-attr]
        assert record["model_a"] != record["model_b"]
        assert (
            record["winner"]
            == {
                "left": "model_a",
                "right": "model_b",
                "tie": "tie",
                "both_bad": "tie (bothbad)",
            }[vote.choice]
        )
        assert record["tstamp"] == vote.created_at.timestamp()
    # The battle reader behind `prefloop rate` accepts the export as it is.
    assert sorted(parse_battles_text(text).models) == ["base", "dpo-1", "dpo-2"]
    empty = Project(name="empty", settings={})
    db.add(empty)
    db.flush()
    assert json.loads(_collect(db, empty.id, "fastchat")) == []


def test_jsonl_and_csv_hold_every_vote_with_provenance(db) -> None:  # type: ignore[no-untyped-def]
    built = build_project(db)
    lines = _collect(db, built.project.id, "jsonl").decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["vote_id"] for r in records] == sorted(v.id for v in built.votes)
    by_id = {v.id: v for v in built.votes}
    for record in records:
        vote = by_id[record["vote_id"]]
        assert record["choice"] == vote.choice and record["left_image_id"] == vote.left_image_id
        assert record["left"]["image_id"] == vote.left_image_id
        assert record["annotator_id"] == vote.annotator_id
        assert record["latency_ms"] == vote.latency_ms
        left = db.get(Image, vote.left_image_id)
        assert record["left"]["sha256"] == left.sha256  # type: ignore[union-attr]
        assert record["left"]["seed"] == left.seed  # type: ignore[union-attr]
        assert dt.datetime.fromisoformat(record["created_at"]) == vote.created_at
    assert {r["is_gold"] for r in records} == {True, False}
    # JSON keeps strings exactly; only the CSV is escaped for spreadsheets.
    assert '=HYPERLINK("http://x")' in {r["prompt"] for r in records}

    text = _collect(db, built.project.id, "csv").decode()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == len(built.votes)
    assert {r["prompt"] for r in rows} == {"a red circle", '\'=HYPERLINK("http://x")'}
    assert {r["choice"] for r in rows} == {"left", "right", "tie", "both_bad", "skip"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("a=b", "a=b"),
        ("", ""),
        (-5, -5),
    ],
)
def test_spreadsheet_safe(value: object, expected: object) -> None:
    assert spreadsheet_safe(value) == expected


def test_csv_escapes_formula_cells_everywhere(db) -> None:  # type: ignore[no-untyped-def]
    built = build_project(db)
    hostile = ["=cmd|' /C calc'!A0", "+SUM(1)", "-2+3", "@x", "\tTAB", "\rCR"]
    prompt = db.scalar(select(Prompt).where(Prompt.project_id == built.project.id))
    for k, text in enumerate(hostile):
        prompt.text = text  # type: ignore[union-attr]
        built.models["base"].name = text + f"#{k}"
        db.flush()
        body = _collect(db, built.project.id, "csv").decode()
        for row in csv.reader(io.StringIO(body, newline="")):
            for cell in row:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (text, cell)
        assert "'" + text in body


# --------------------------------------------------------------------------------------------
# Streaming and bounded memory
# --------------------------------------------------------------------------------------------


def _bulk_project(session: Session, n_votes: int) -> int:
    """A project with n_votes votes on distinct pairs, inserted in bulk (one shared image)."""
    project = Project(name="bulk", settings={})
    session.add(project)
    session.flush()
    model = ModelVersion(project_id=project.id, name="m", base="toy", params={}, evaluation={})
    prompt = Prompt(project_id=project.id, text="bulk", split="train", tags=[])
    session.add_all([model, prompt])
    session.flush()
    annotator = users.create_user(
        session, email=f"bulk-{uuid.uuid4().hex[:6]}@example.com", role="annotator"
    )
    # 64 px of noise: ~12 KB per image, so holding every row would show in the peak.
    digest, key = get_media_store().put(tiny_png(7, size=64), ext="png")
    n_images = 2
    while n_images * (n_images - 1) // 2 < n_votes:
        n_images += 1
    image_ids = [uuid.uuid4().hex for _ in range(n_images)]
    session.execute(
        insert(Image),
        [
            dict(
                id=i,
                project_id=project.id,
                prompt_id=prompt.id,
                model_version_id=model.id,
                seed=s,
                sha256=digest,
                storage_key=key,
                width=8,
                height=8,
                provenance={},
            )
            for s, i in enumerate(image_ids)
        ],
    )
    combos = [(a, b) for k, a in enumerate(image_ids) for b in image_ids[k + 1 :]][:n_votes]
    pair_ids = session.scalars(
        insert(Pair).returning(Pair.id),
        [
            dict(
                project_id=project.id,
                prompt_id=prompt.id,
                image_a_id=a,
                image_b_id=b,
                purpose="train",
                is_gold=False,
                votes_wanted=1,
                vote_count=1,
            )
            for a, b in combos
        ],
    ).all()
    session.execute(
        insert(Vote),
        [
            dict(
                pair_id=pid,
                project_id=project.id,
                annotator_id=annotator.id,
                left_image_id=a,
                choice="left",
                created_at=T0,
            )
            for pid, (a, _) in zip(pair_ids, combos, strict=True)
        ],
    )
    return project.id


def test_export_yields_before_reading_every_vote(db) -> None:  # type: ignore[no-untyped-def]
    project_id = _bulk_project(db, 200)
    statements: list[str] = []
    connection = db.connection()

    def record(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if "FROM votes" in statement:
            statements.append(statement)

    event.listen(connection, "before_cursor_execute", record)
    try:
        stream = export_jsonl(db, project_id, batch_size=20)
        first = next(stream)
        assert len(first.splitlines()) == 20
        assert len(statements) == 2  # the streamed id query and one batch of rows
        rest = list(stream)
        assert len(statements) == 11  # the id query and 10 batches of rows
        assert sum(len(chunk.splitlines()) for chunk in [first, *rest]) == 200
    finally:
        event.remove(connection, "before_cursor_execute", record)


def _peak_export_bytes(session: Session, project_id: int) -> tuple[int, int]:
    tracemalloc.start()
    size = 0
    for chunk in export_pickapic(session, project_id, batch_size=200, row_group_rows=200):
        size += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, size


@pytest.mark.slow
def test_pickapic_export_memory_does_not_grow_with_votes(db) -> None:  # type: ignore[no-untyped-def]
    small = _bulk_project(db, 400)
    large = _bulk_project(db, 3000)
    _peak_export_bytes(db, small)  # warm caches (compiled statements, pyarrow)
    peak_small, size_small = _peak_export_bytes(db, small)
    peak_large, size_large = _peak_export_bytes(db, large)
    assert size_large > 5 * size_small
    # Holding every row would take > 70 MB for the large project; batches keep the peak flat
    # (the slack absorbs interpreter-wide tables that happen to resize during a run).
    assert peak_large < 2 * peak_small + 8 * 2**20, (peak_small, peak_large)


# --------------------------------------------------------------------------------------------
# Import, and the round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_into_a_second_project(db) -> None:  # type: ignore[no-untyped-def]
    source = build_project(db, name="source")
    exported = _collect(db, source.project.id, "pickapic")
    target = Project(name="target", settings={})
    db.add(target)
    db.flush()
    summary = importers.import_pickapic(
        db, project=target, source=io.BytesIO(exported), store=get_media_store()
    )
    n_rows = len(_table(exported))
    assert summary.rows == summary.votes == n_rows and summary.skipped == {}
    assert summary.model_versions == 3 and summary.prompts == 2
    versions = db.scalars(select(ModelVersion).where(ModelVersion.project_id == target.id)).all()
    assert {(v.name, v.base) for v in versions} == {
        ("base", "external:base"),
        ("dpo-1", "external:dpo-1"),
        ("dpo-2", "external:dpo-2"),
    }
    # Every vote, label and image byte survives: the target exports the same rows.
    again = _collect(db, target.id, "pickapic")
    assert _canonical_rows(_table(again)) == _canonical_rows(_table(exported))
    store = get_media_store()
    source_images = {
        i.sha256 for i in db.scalars(select(Image).where(Image.project_id == source.project.id))
    }
    for image in db.scalars(select(Image).where(Image.project_id == target.id)):
        assert _sha(store.read(image.storage_key)) == image.sha256 and image.sha256 in source_images
    target_votes = db.scalars(select(Vote).where(Vote.project_id == target.id)).all()
    exported_choices = Counter(
        v.choice
        for v in source.votes
        if v.choice != "skip" and not db.get(Pair, v.pair_id).is_gold  # type: ignore[union-attr]
    )
    assert Counter(v.choice for v in target_votes) == exported_choices
    # One import account per source annotator, each an annotator member of the target.
    accounts = {v.annotator_id for v in target_votes}
    assert len(accounts) == len(source.annotators)
    for user_id in accounts:
        user = db.get(User, user_id)
        assert user.role == "annotator" and user.email.startswith(f"import+p{target.id}-u")  # type: ignore[union-attr]
        assert db.get(Membership, (target.id, user_id)).role == "annotator"  # type: ignore[union-attr]
    # Pairs: eval between two models, train within one; all already have their votes.
    for pair in db.scalars(select(Pair).where(Pair.project_id == target.id)):
        a, b = db.get(Image, pair.image_a_id), db.get(Image, pair.image_b_id)
        different = a.model_version_id != b.model_version_id  # type: ignore[union-attr]
        assert pair.purpose == ("eval" if different else "train")
        assert pair.vote_count == pair.votes_wanted > 0

    # Importing the same file again adds nothing.
    before = _project_counts(db, target.id)
    repeat = importers.import_pickapic(
        db, project=target, source=io.BytesIO(exported), store=get_media_store()
    )
    assert repeat.votes == repeat.images == repeat.pairs == repeat.prompts == 0
    assert repeat.skipped == {"already imported": n_rows}
    assert _project_counts(db, target.id) == before


def test_import_reuses_existing_model_versions_and_images(db) -> None:  # type: ignore[no-untyped-def]
    source = build_project(db, name="source")
    exported = _collect(db, source.project.id, "pickapic")
    target = Project(name="target", settings={})
    db.add(target)
    db.flush()
    mine = ModelVersion(project_id=target.id, name="dpo-1", base="toy", params={}, evaluation={})
    db.add(mine)
    db.flush()
    importers.import_pickapic(
        db, project=target, source=io.BytesIO(exported), store=get_media_store()
    )
    images = db.scalars(select(Image).where(Image.project_id == target.id)).all()
    assert any(i.model_version_id == mine.id for i in images)
    # Images shared between pairs are stored once per uid.
    uids = [i.provenance["import_uid"] for i in images]
    assert len(uids) == len(set(uids))


def _pickapic_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def _valid_rows(n: int = 3) -> list[dict[str, Any]]:
    return [
        {
            "caption": f"prompt {k % 2}",
            "jpg_0": tiny_png(2 * k),
            "jpg_1": tiny_png(2 * k + 1),
            "label_0": 1.0,
            "label_1": 0.0,
            "model_0": "a",
            "model_1": "b",
            "image_0_uid": f"u{2 * k}",
            "image_1_uid": f"u{2 * k + 1}",
            "user_id": 7,
            "ranking_id": 100 + k,
        }
        for k in range(n)
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_0": 0.3}, "row 1: label_0/label_1 must be 1/0, 0/1 or 0.5/0.5, got 0.3/0"),
        ({"caption": "  "}, "row 1: caption is blank"),
        ({"image_1_uid": "u2"}, "row 1: image_0_uid and image_1_uid are the same"),
        ({"jpg_1": b"not an image"}, "row 1: jpg_1 is not a readable image"),
        ({"caption": "nul\x00"}, "row 1: caption contains a NUL character"),
        ({"model_0": "m" * 300}, "row 1: model_0 is longer than 200 characters"),
    ],
)
def test_bad_pickapic_rows_are_named_and_nothing_is_added(
    db, change: dict[str, Any], message: str
) -> None:  # type: ignore[no-untyped-def]
    project = Project(name="p", settings={})
    db.add(project)
    db.commit()
    rows = _valid_rows()
    rows[1].update(change)
    with pytest.raises(importers.ImportFormatError) as info:
        importers.import_pickapic(
            db, project=project, source=io.BytesIO(_pickapic_bytes(rows)), store=get_media_store()
        )
    assert any(e.startswith(message) for e in info.value.errors), info.value.errors
    db.rollback()
    assert _project_counts(db, project.id) == dict.fromkeys(_project_counts(db, project.id), 0)


def test_missing_columns_and_non_parquet_files(db) -> None:  # type: ignore[no-untyped-def]
    project = Project(name="p", settings={})
    db.add(project)
    db.flush()
    rows = [{k: v for k, v in r.items() if k != "label_1"} for r in _valid_rows()]
    with pytest.raises(importers.ImportFormatError, match="missing column.*label_1"):
        importers.import_pickapic(
            db, project=project, source=io.BytesIO(_pickapic_bytes(rows)), store=get_media_store()
        )
    with pytest.raises(importers.ImportFormatError, match="not a readable Parquet file"):
        importers.import_pickapic(
            db, project=project, source=io.BytesIO(b"PAR1 nope"), store=get_media_store()
        )


# --------------------------------------------------------------------------------------------
# HTTP: download, import, authorisation
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def streaming_in_test_session(app, db):  # type: ignore[no-untyped-def]
    """Streamed downloads read through the test's (rolled back) session."""
    app.dependency_overrides[streaming_sessions] = lambda: lambda: nullcontext(db)
    return app


def test_http_download_every_format(client, db, make_user, streaming_in_test_session) -> None:  # type: ignore[no-untyped-def]
    lead, token = make_user("lead")
    built = build_project(db, lead)
    db.commit()
    pid = built.project.id
    for fmt, ext in (
        ("pickapic", "parquet"),
        ("fastchat", "json"),
        ("jsonl", "jsonl"),
        ("csv", "csv"),
    ):
        response = client.get(f"/api/v1/projects/{pid}/export?format={fmt}", headers=bearer(token))
        assert response.status_code == 200, response.text
        disposition = response.headers["content-disposition"]
        assert disposition == f'attachment; filename="prefloop-project-{pid}-{fmt}.{ext}"'
        assert response.content == _collect(db, pid, fmt)
    bad = client.get(f"/api/v1/projects/{pid}/export?format=xml", headers=bearer(token))
    assert bad.status_code == 422


def test_http_import_pickapic_and_fastchat(client, db, make_user) -> None:  # type: ignore[no-untyped-def]
    lead, token = make_user("lead")
    project = Project(name="target", settings={})
    db.add(project)
    db.flush()
    db.add(Membership(project_id=project.id, user_id=lead.id, role="lead"))
    db.commit()
    url = f"/api/v1/projects/{project.id}/import"
    parquet = _pickapic_bytes(_valid_rows())
    done = client.post(
        url + "?format=pickapic", files={"file": ("v.parquet", parquet)}, headers=bearer(token)
    )
    assert done.status_code == 201, done.text
    assert done.json()["votes"] == 3 and done.json()["images"] == 6
    rows = _valid_rows()
    rows[2]["label_1"] = 7
    bad = client.post(
        url + "?format=pickapic",
        files={"file": ("v.parquet", _pickapic_bytes(rows))},
        headers=bearer(token),
    )
    assert bad.status_code == 422
    assert bad.json()["detail"]["errors"][0].startswith("row 2: label_0/label_1")

    battles = [
        {
            "model_a": "a",
            "model_b": "y",
            "winner": "model_a",
            "judge": "j",
            "tstamp": 1.0,
            "question_id": "q",
            "anony": True,
        }
    ] * 8 + [
        {"model_a": "a", "model_b": "y", "winner": "model_b"},
        {"model_a": "y", "model_b": "z", "winner": "tie"},
        {"model_a": "a", "model_b": "z", "winner": "tie (bothbad)"},
    ]
    fit = client.post(
        url + "?format=fastchat",
        files={"file": ("b.json", json.dumps(battles).encode())},
        headers=bearer(token),
    )
    assert fit.status_code == 201, fit.text
    body = fit.json()
    assert (
        body["battles"] == 11 and body["model_versions"] == 2
    )  # "a" exists (from the parquet): y, z new
    board = body["leaderboard"]
    assert board[0]["name"] == "a" and board[0]["rank"] == 1
    stored = db.get(RatingFit, body["fit_id"])
    assert stored.method["source"] == "fastchat" and stored.vote_count == 11  # type: ignore[union-attr]
    ratings = db.scalars(select(Rating).where(Rating.fit_id == body["fit_id"])).all()
    assert len(ratings) == 3 and all(r.ci_low <= r.rating <= r.ci_high for r in ratings)
    x = db.scalar(
        select(ModelVersion).where(ModelVersion.project_id == project.id, ModelVersion.name == "a")
    )
    assert x.base == "external:a"  # type: ignore[union-attr]
    assert {r.votes for r in ratings if r.model_version_id == x.id} == {10}  # type: ignore[union-attr]

    broken = battles[:3] + [{"model_a": "a", "model_b": "y", "winner": "nobody"}]
    refused = client.post(
        url + "?format=fastchat",
        files={"file": ("b.json", json.dumps(broken).encode())},
        headers=bearer(token),
    )
    assert refused.status_code == 422
    assert refused.json()["detail"]["errors"][0].startswith("record 4: unknown winner 'nobody'")


def test_upload_size_limit_is_413(client, db, make_user, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.core.config import get_settings

    lead, token = make_user("lead")
    project = Project(name="p", settings={})
    db.add(project)
    db.flush()
    db.add(Membership(project_id=project.id, user_id=lead.id, role="lead"))
    db.commit()
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 2048)
    big = b"x" * 4096
    for path in ("import?format=pickapic", "import?format=fastchat", "prompts/upload"):
        response = client.post(
            f"/api/v1/projects/{project.id}/{path}",
            files={"file": ("f.txt", big)},
            headers=bearer(token),
        )
        assert response.status_code == 413, (path, response.text)
        assert "2048" in response.json()["detail"]


def test_authorisation_on_every_data_route(
    client, db, make_user, streaming_in_test_session
) -> None:  # type: ignore[no-untyped-def]
    lead, lead_token = make_user("lead")
    built = build_project(db, lead)
    _, other_lead_token = make_user("lead")
    annotator = built.annotators[0]
    annotator_token = users.issue_token(db, annotator)
    _, admin_token = make_user("admin")
    db.commit()
    pid = built.project.id
    routes = [
        ("get", f"/api/v1/projects/{pid}/export?format=jsonl", None),
        ("get", f"/api/v1/projects/{pid}/export?format=pickapic", None),
        (
            "post",
            f"/api/v1/projects/{pid}/import?format=pickapic",
            ("v.parquet", _pickapic_bytes(_valid_rows(1))),
        ),
        (
            "post",
            f"/api/v1/projects/{pid}/import?format=fastchat",
            ("b.json", b'[{"model_a": "p", "model_b": "q", "winner": "tie"}]'),
        ),
        ("post", f"/api/v1/projects/{pid}/prompts/upload", ("p.txt", b"a prompt\n")),
    ]
    for method, url, upload in routes:
        kwargs: dict[str, Any] = {"files": {"file": upload}} if upload else {}
        call = getattr(client, method)
        assert call(url, **kwargs).status_code == 401, url
        for token in (annotator_token, other_lead_token):
            denied = call(url, headers=bearer(token), **kwargs)
            assert denied.status_code == 403, (url, denied.text)
        missing = call(url.replace(f"/{pid}/", "/999999/"), headers=bearer(lead_token), **kwargs)
        assert missing.status_code == 404, url
        for token in (lead_token, admin_token):
            allowed = call(url, headers=bearer(token), **kwargs)
            assert allowed.status_code in (200, 201), (url, allowed.text)


# --------------------------------------------------------------------------------------------
# Property tests: corrupt parquet and battle JSON are refused cleanly, leaving nothing behind
# --------------------------------------------------------------------------------------------

VALID_PARQUET = _pickapic_bytes(_valid_rows(4))


def _corrupt(data: bytes, how: str, position: int, value: int) -> bytes:
    position %= len(data)
    if how == "truncate":
        return data[:position]
    if how == "flip":
        return data[:position] + bytes([data[position] ^ (value or 1)]) + data[position + 1 :]
    return data[:position] + bytes([value]) * 16 + data[position + 16 :]


_cell_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)


@pytest.fixture()
def import_target(db, make_user) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """A project and its lead's token; hypothesis shares it across a test's examples."""
    lead, token = make_user("lead")
    project = Project(name="target", settings={})
    db.add(project)
    db.flush()
    db.add(Membership(project_id=project.id, user_id=lead.id, role="lead"))
    db.commit()
    return project.id, token


@pytest.mark.slow
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.tuples(
            st.sampled_from(["truncate", "flip", "smear"]),
            st.integers(0, 10**6),
            st.integers(0, 255),
        ).map(lambda t: _corrupt(VALID_PARQUET, *t)),
        st.tuples(
            st.integers(0, 3),
            st.sampled_from([c for c in PICKAPIC_SCHEMA.names if c in _valid_rows(1)[0]]),
            _cell_values,
        ).map(lambda t: _with_cell(*t)),
        st.binary(max_size=300),
    )
)
def test_corrupt_pickapic_is_refused_without_partial_rows(client, db, import_target, data) -> None:  # type: ignore[no-untyped-def]
    pid, token = import_target
    before = _project_counts(db, pid)
    response = client.post(
        f"/api/v1/projects/{pid}/import?format=pickapic",
        files={"file": ("v.parquet", data)},
        headers=bearer(token),
    )
    assert response.status_code in (201, 422), response.text
    after = _project_counts(db, pid)
    if response.status_code == 422:
        errors = response.json()["detail"]["errors"]
        assert errors and all(isinstance(e, str) and e for e in errors)
        assert after == before
    else:
        summary = response.json()
        assert after["votes"] - before["votes"] == summary["votes"]
        assert after["images"] - before["images"] == summary["images"]


def _with_cell(row: int, column: str, value: object) -> bytes:
    rows = _valid_rows(4)
    rows[row][column] = value
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    try:
        table = pa.table({k: pa.array(v) for k, v in columns.items()})
    except (pa.ArrowException, OverflowError):
        table = pa.table(
            {
                k: pa.array([None if x is None else repr(x) for x in v])
                if k == column
                else pa.array(v)
                for k, v in columns.items()
            }
        )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


_name = st.one_of(st.sampled_from(["a", "b", "c"]), st.text(max_size=5), st.integers(), st.none())
_record = st.one_of(
    st.fixed_dictionaries(
        {
            "model_a": _name,
            "model_b": _name,
            "winner": st.one_of(
                st.sampled_from(["model_a", "model_b", "tie", "tie (bothbad)"]), st.text(max_size=4)
            ),
        },
        optional={"judge": st.text(max_size=5), "tstamp": st.floats(), "anony": st.booleans()},
    ),
    st.integers(),
    st.text(max_size=5),
)


@pytest.mark.slow
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        st.lists(_record, max_size=8).map(lambda r: json.dumps(r).encode()),
        st.binary(max_size=100),
        st.lists(_record, max_size=4).map(lambda r: json.dumps(r).encode()[:-3]),
    )
)
def test_corrupt_battles_are_refused_without_partial_rows(client, db, import_target, body) -> None:  # type: ignore[no-untyped-def]
    pid, token = import_target
    before = _project_counts(db, pid)
    response = client.post(
        f"/api/v1/projects/{pid}/import?format=fastchat",
        files={"file": ("b.json", body)},
        headers=bearer(token),
    )
    assert response.status_code in (201, 422), response.text
    after = _project_counts(db, pid)
    if response.status_code == 422:
        assert response.json()["detail"]["errors"]
        assert after == before
    else:
        assert after["fits"] == before["fits"] + 1


# --------------------------------------------------------------------------------------------
# Command line, against committed data
# --------------------------------------------------------------------------------------------


def test_cli_export_then_import_round_trip(pg_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    with session_scope() as session:
        built = build_project(session, name="cli-source")
        source_id = built.project.id
        target = Project(name="cli-target", settings={})
        session.add(target)
        session.flush()
        target_id = target.id
        annotator_ids = [u.id for u in built.annotators]
    try:
        out = tmp_path / "votes.parquet"
        exported = runner.invoke(
            main,
            ["export", "--project", str(source_id), "--format", "pickapic", "--out", str(out)],
        )
        assert exported.exit_code == 0, exported.output
        n_rows = len(_table(out.read_bytes()))
        assert f"exported {n_rows} votes" in exported.output
        assert not out.with_name(out.name + ".partial").exists()
        for fmt in ("fastchat", "jsonl", "csv"):
            other = tmp_path / f"votes.{fmt}"
            result = runner.invoke(
                main, ["export", "--project", str(source_id), "--format", fmt, "--out", str(other)]
            )
            assert result.exit_code == 0 and other.stat().st_size > 0, result.output

        imported = runner.invoke(
            main, ["import", "--project", str(target_id), "--format", "pickapic", str(out)]
        )
        assert imported.exit_code == 0, imported.output
        summary = json.loads(imported.stdout[imported.stdout.index("{") :])
        assert summary["votes"] == n_rows
        again = runner.invoke(
            main, ["import", "--project", str(target_id), "--format", "pickapic", str(out)]
        )
        assert again.exit_code == 0
        assert json.loads(again.stdout[again.stdout.index("{") :])["votes"] == 0

        bad = tmp_path / "bad.parquet"
        rows = _valid_rows()
        rows[0]["label_0"] = 2.0
        bad.write_bytes(_pickapic_bytes(rows))
        with session_scope() as session:
            before = _project_counts(session, target_id)
        refused = runner.invoke(
            main, ["import", "--project", str(target_id), "--format", "pickapic", str(bad)]
        )
        assert refused.exit_code == 2 and "row 0: label_0/label_1" in refused.output
        battles = tmp_path / "b.json"
        battles.write_text('[{"model_a": "x", "model_b": "x", "winner": "tie"}]')
        refused = runner.invoke(
            main, ["import", "--project", str(target_id), "--format", "fastchat", str(battles)]
        )
        assert refused.exit_code == 2 and "1 same-model pairs" in refused.output
        with session_scope() as session:
            assert _project_counts(session, target_id) == before
        fastchat_ok = tmp_path / "ok.json"
        fastchat_ok.write_text(json.dumps([{"model_a": "x", "model_b": "y", "winner": "tie"}]))
        fit = runner.invoke(
            main,
            [
                "import",
                "--project",
                str(target_id),
                "--format",
                "fastchat",
                "--bootstrap",
                "5",
                str(fastchat_ok),
            ],
        )
        assert fit.exit_code == 0 and '"fit_id"' in fit.output, fit.output
        missing = runner.invoke(
            main, ["export", "--project", "999999", "--format", "csv", "--out", str(out)]
        )
        assert missing.exit_code == 1 and "project 999999 not found" in missing.output
    finally:
        with session_scope() as session:
            for pid in (source_id, target_id):
                session.delete(session.get(Project, pid))
            imported_users = session.scalars(
                select(User).where(User.email.like(f"import+p{target_id}%"))
            ).all()
            for user in [*imported_users, *(session.get(User, i) for i in annotator_ids)]:
                session.delete(user)
