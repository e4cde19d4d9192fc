"""Streamed exports of a project's votes: Pick-a-Pic parquet, FastChat battles, JSONL and CSV.

Every export is a generator of byte chunks. Votes are read in keyset-paginated batches (by vote
id) and written out batch by batch, so memory stays bounded by the batch size, not the number of
votes, and an HTTP download can start before the last vote is read.

What each format holds:
- pickapic: one row per preference vote on a non-gold pair, image 0 = the image the annotator
  saw on the left. `jpg_0`/`jpg_1` hold the image files' bytes exactly as stored (PNG for images
  prefloop generated, whatever was imported otherwise) despite the column names, which keep the
  Pick-a-Pic schema. Labels: left → 1/0, right → 0/1, tie → 0.5/0.5. "both_bad" rows are kept
  with labels 0.5/0.5 and `has_label` false (no preference), so readers that filter on
  `has_label` or drop 0.5 labels skip them; "skip" votes carry no data and are left out.
  `best_image_uid` is "" unless one image won. `user_id` is the annotator id, `ranking_id` the
  vote id, `num_example_per_prompt` the number of rows of the same prompt in the export.
- fastchat: battles from eval pairs whose images come from two different model versions
  (non-gold, not skipped); model_a is the model shown on the left; both_bad → "tie (bothbad)".
- jsonl / csv: every vote (skips and gold pairs included, flagged) with its provenance. CSV cells
  that a spreadsheet would run as a formula are prefixed with a quote.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Select, and_, case, func, select
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, aliased

from app.core.storage import MediaStore, get_media_store
from app.generators.models import ModelVersion
from app.images.models import Image
from app.pairs.models import Pair
from app.projects.models import Prompt
from app.votes.models import Vote
from app.votes.vocabulary import PREFERENCES, Choice

ExportFormat = Literal["pickapic", "fastchat", "jsonl", "csv"]
EXPORT_FORMATS: tuple[str, ...] = ("pickapic", "fastchat", "jsonl", "csv")
# (file extension, media type) per format, for downloads and default file names.
FILE_TYPES: dict[str, tuple[str, str]] = {
    "pickapic": ("parquet", "application/vnd.apache.parquet"),
    "fastchat": ("json", "application/json"),
    "jsonl": ("jsonl", "application/x-ndjson"),
    "csv": ("csv", "text/csv; charset=utf-8"),
}

# Votes read per database round trip.
DEFAULT_BATCH = 1000
# A parquet row group is written once it holds this many rows or this many image bytes: the
# byte cap is what bounds memory when images are large.
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 32 * 1024 * 1024

PICKAPIC_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("best_image_uid", pa.string()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("num_example_per_prompt", pa.int64()),
    ]
)

# A spreadsheet treats a cell starting with one of these as a formula (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")

Progress = Callable[[int], None] | None


def spreadsheet_safe(value: object) -> object:
    """Prefix a quote to strings a spreadsheet would evaluate as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def export_filename(project_id: int, fmt: str) -> str:
    return f"prefloop-project-{project_id}-{fmt}.{FILE_TYPES[fmt][0]}"


# --------------------------------------------------------------------------------------------
# Reading votes in batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """Which votes a format exports."""

    choices: tuple[str, ...] | None  # None: every choice
    include_gold: bool
    eval_only: bool  # eval pairs of two different, known model versions


SCOPES: dict[str, _Scope] = {
    "pickapic": _Scope(PREFERENCES, include_gold=False, eval_only=False),
    "fastchat": _Scope(PREFERENCES, include_gold=False, eval_only=True),
    "jsonl": _Scope(None, include_gold=True, eval_only=False),
    "csv": _Scope(None, include_gold=True, eval_only=False),
}

_Left = aliased(Image, name="left_image")
_Right = aliased(Image, name="right_image")
_LeftModel = aliased(ModelVersion, name="left_model")
_RightModel = aliased(ModelVersion, name="right_model")


def _vote_select(project_id: int, scope: _Scope, columns: list[Any]) -> Select[Any]:
    right_id = case((Pair.image_a_id == Vote.left_image_id, Pair.image_b_id), else_=Pair.image_a_id)
    stmt = (
        select(*columns)
        .select_from(Vote)
        .join(Pair, Pair.id == Vote.pair_id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(_Left, _Left.id == Vote.left_image_id)
        .join(_Right, _Right.id == right_id)
        .outerjoin(_LeftModel, _LeftModel.id == _Left.model_version_id)
        .outerjoin(_RightModel, _RightModel.id == _Right.model_version_id)
        .where(Vote.project_id == project_id)
    )
    if scope.choices is not None:
        stmt = stmt.where(Vote.choice.in_(scope.choices))
    if not scope.include_gold:
        stmt = stmt.where(Pair.is_gold.is_(False))
    if scope.eval_only:
        stmt = stmt.where(
            and_(
                Pair.purpose == "eval",
                _Left.model_version_id.is_not(None),
                _Right.model_version_id.is_not(None),
                _Left.model_version_id != _Right.model_version_id,
            )
        )
    return stmt


_ROW_COLUMNS = [
    Vote.id.label("vote_id"),
    Vote.pair_id,
    Vote.choice,
    Vote.latency_ms,
    Vote.annotator_id,
    Vote.created_at,
    Vote.updated_at,
    Pair.purpose,
    Pair.is_gold,
    Pair.image_a_id,
    Prompt.id.label("prompt_id"),
    Prompt.text.label("prompt"),
    Prompt.split,
    _Left.id.label("left_id"),
    _Left.model_version_id.label("left_model_id"),
    _Left.seed.label("left_seed"),
    _Left.sha256.label("left_sha256"),
    _Left.storage_key.label("left_key"),
    _LeftModel.name.label("left_model"),
    _Right.id.label("right_id"),
    _Right.model_version_id.label("right_model_id"),
    _Right.seed.label("right_seed"),
    _Right.sha256.label("right_sha256"),
    _Right.storage_key.label("right_key"),
    _RightModel.name.label("right_model"),
]


def iter_vote_rows(
    session: Session, project_id: int, fmt: str, *, batch_size: int = DEFAULT_BATCH
) -> Iterator[list[Row[Any]]]:
    """Batches of joined vote rows in vote-id order, batch_size votes at a time.

    The vote ids stream from one query on the votes table alone (a server-side cursor on
    Postgres); each batch of ids is then joined in its own statement. Paging the join itself
    with ORDER BY/LIMIT let the planner, with statistics lagging a bulk load, join every
    remaining vote before cutting each page: quadratic in the number of votes.
    """
    scope = SCOPES[fmt]
    ids = select(Vote.id).where(Vote.project_id == project_id)
    if scope.choices is not None:
        ids = ids.where(Vote.choice.in_(scope.choices))
    ids = ids.order_by(Vote.id).execution_options(yield_per=batch_size)
    joined = _vote_select(project_id, scope, _ROW_COLUMNS).order_by(Vote.id)
    id_result = session.scalars(ids)
    try:
        for id_batch in id_result.partitions():
            rows = session.execute(joined.where(Vote.id.in_(id_batch))).all()
            if rows:
                yield list(rows)
    finally:
        id_result.close()


def count_export_rows(session: Session, project_id: int, fmt: str) -> int:
    """How many rows (votes) an export of this format will hold."""
    stmt = _vote_select(project_id, SCOPES[fmt], [func.count()])
    return int(session.scalar(stmt) or 0)


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).isoformat()


def _winner_image(row: Row[Any]) -> str | None:
    return {Choice.LEFT: row.left_id, Choice.RIGHT: row.right_id}.get(row.choice)


# --------------------------------------------------------------------------------------------
# Pick-a-Pic parquet
# --------------------------------------------------------------------------------------------


class _ChunkSink(io.RawIOBase):
    """A write-only file that hands out what was written so far (pyarrow writes into it)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def pickapic_labels(choice: str) -> tuple[float, float, bool]:
    """(label_0, label_1, has_label) for a vote, image 0 being the left one."""
    p_left = Choice(choice).p_left
    if p_left is None:
        raise ValueError(f"{choice!r} votes are not exported to Pick-a-Pic")
    # "Both bad" is exported as a tie without a label, so readers can tell the two apart.
    return p_left, 1.0 - p_left, choice != Choice.BOTH_BAD


def _prompt_counts(session: Session, project_id: int) -> dict[int, int]:
    stmt = _vote_select(project_id, SCOPES["pickapic"], [Prompt.id, func.count()]).group_by(
        Prompt.id
    )
    return {int(prompt_id): int(n) for prompt_id, n in session.execute(stmt)}


def _pickapic_record(
    row: Row[Any], store: MediaStore, per_prompt: dict[int, int]
) -> dict[str, Any]:
    label_0, label_1, has_label = pickapic_labels(row.choice)
    winner = _winner_image(row) if has_label else None
    return {
        "caption": row.prompt,
        "jpg_0": store.read(row.left_key),
        "jpg_1": store.read(row.right_key),
        "label_0": label_0,
        "label_1": label_1,
        "model_0": row.left_model or "",
        "model_1": row.right_model or "",
        "image_0_uid": row.left_id,
        "image_1_uid": row.right_id,
        "best_image_uid": winner or "",
        "user_id": row.annotator_id,
        "ranking_id": row.vote_id,
        "created_at": row.created_at,
        "has_label": has_label,
        "are_different": row.left_sha256 != row.right_sha256,
        "num_example_per_prompt": per_prompt.get(row.prompt_id, 0),
    }


def export_pickapic(
    session: Session,
    project_id: int,
    *,
    store: MediaStore | None = None,
    on_rows: Progress = None,
    batch_size: int = DEFAULT_BATCH,
    row_group_rows: int = ROW_GROUP_ROWS,
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> Iterator[bytes]:
    """Pick-a-Pic-schema parquet bytes, one chunk per row group."""
    store = store or get_media_store()
    per_prompt = _prompt_counts(session, project_id)
    sink = _ChunkSink()
    # Image bytes are all different: dictionary-encoding them would only cost memory and time.
    text_columns = [name for name in PICKAPIC_SCHEMA.names if name not in ("jpg_0", "jpg_1")]
    writer = pq.ParquetWriter(
        sink, PICKAPIC_SCHEMA, compression="zstd", use_dictionary=text_columns
    )
    pending: list[dict[str, Any]] = []
    pending_bytes = 0

    def flush() -> bytes:
        nonlocal pending, pending_bytes
        writer.write_table(pa.Table.from_pylist(pending, schema=PICKAPIC_SCHEMA))
        if on_rows is not None:
            on_rows(len(pending))
        pending, pending_bytes = [], 0
        return sink.take()

    try:
        for rows in iter_vote_rows(session, project_id, "pickapic", batch_size=batch_size):
            for row in rows:
                record = _pickapic_record(row, store, per_prompt)
                pending.append(record)
                pending_bytes += len(record["jpg_0"]) + len(record["jpg_1"])
                if len(pending) >= row_group_rows or pending_bytes >= row_group_bytes:
                    yield flush()
        if pending:
            yield flush()
    finally:
        writer.close()
    yield sink.take()


# --------------------------------------------------------------------------------------------
# FastChat battles, JSONL, CSV
# --------------------------------------------------------------------------------------------


def fastchat_record(row: Row[Any]) -> dict[str, Any]:
    return {
        "model_a": row.left_model,
        "model_b": row.right_model,
        "winner": Choice(row.choice).fastchat_winner,
        "judge": f"prefloop-annotator-{row.annotator_id}",
        "tstamp": row.created_at.timestamp(),
        "question_id": str(row.prompt_id),
        "anony": True,  # annotators never see which model made an image
    }


def export_fastchat(
    session: Session, project_id: int, *, on_rows: Progress = None, batch_size: int = DEFAULT_BATCH
) -> Iterator[bytes]:
    """A JSON list of FastChat battle records, streamed a batch at a time."""
    yield b"["
    first = True
    for rows in iter_vote_rows(session, project_id, "fastchat", batch_size=batch_size):
        parts = [json.dumps(fastchat_record(row), ensure_ascii=False) for row in rows]
        yield (("\n" if first else ",\n") + ",\n".join(parts)).encode()
        first = False
        if on_rows is not None:
            on_rows(len(rows))
    yield b"\n]\n"


def _image_dict(row: Row[Any], side: str) -> dict[str, Any]:
    return {
        "image_id": getattr(row, f"{side}_id"),
        "model_version_id": getattr(row, f"{side}_model_id"),
        "model": getattr(row, f"{side}_model"),
        "seed": getattr(row, f"{side}_seed"),
        "sha256": getattr(row, f"{side}_sha256"),
    }


def vote_record(row: Row[Any]) -> dict[str, Any]:
    """One vote with its provenance (the JSONL line)."""
    return {
        "vote_id": row.vote_id,
        "pair_id": row.pair_id,
        "pair_purpose": row.purpose,
        "is_gold": bool(row.is_gold),
        "prompt_id": row.prompt_id,
        "prompt": row.prompt,
        "split": row.split,
        "left": _image_dict(row, "left"),
        "right": _image_dict(row, "right"),
        "left_image_id": row.left_id,
        # model_a/model_b (left/right) and choice make the line readable by `prefloop rate`.
        "model_a": row.left_model,
        "model_b": row.right_model,
        "choice": row.choice,
        "winner_image_id": _winner_image(row),
        "latency_ms": row.latency_ms,
        "annotator_id": row.annotator_id,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
    }


def export_jsonl(
    session: Session, project_id: int, *, on_rows: Progress = None, batch_size: int = DEFAULT_BATCH
) -> Iterator[bytes]:
    """One JSON object per vote and line."""
    for rows in iter_vote_rows(session, project_id, "jsonl", batch_size=batch_size):
        lines = [json.dumps(vote_record(row), ensure_ascii=False) + "\n" for row in rows]
        yield "".join(lines).encode()
        if on_rows is not None:
            on_rows(len(rows))


CSV_COLUMNS = [
    "vote_id",
    "pair_id",
    "pair_purpose",
    "is_gold",
    "prompt_id",
    "prompt",
    "split",
    "left_image_id",
    "left_model_version_id",
    "left_model",
    "left_seed",
    "left_sha256",
    "right_image_id",
    "right_model_version_id",
    "right_model",
    "right_seed",
    "right_sha256",
    "choice",
    "winner_image_id",
    "latency_ms",
    "annotator_id",
    "created_at",
    "updated_at",
]


def csv_row(row: Row[Any]) -> list[object]:
    record = vote_record(row)
    flat: dict[str, object] = {k: v for k, v in record.items() if k not in ("left", "right")}
    for side in ("left", "right"):
        image = record[side]
        flat[f"{side}_image_id"] = image["image_id"]
        flat[f"{side}_model_version_id"] = image["model_version_id"]
        flat[f"{side}_model"] = image["model"]
        flat[f"{side}_seed"] = image["seed"]
        flat[f"{side}_sha256"] = image["sha256"]
    return [spreadsheet_safe("" if flat[c] is None else flat[c]) for c in CSV_COLUMNS]


def export_csv(
    session: Session, project_id: int, *, on_rows: Progress = None, batch_size: int = DEFAULT_BATCH
) -> Iterator[bytes]:
    """Votes as CSV (header first), safe to open in a spreadsheet."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue().encode()
    for rows in iter_vote_rows(session, project_id, "csv", batch_size=batch_size):
        buffer.seek(0)
        buffer.truncate()
        writer.writerows(csv_row(row) for row in rows)
        yield buffer.getvalue().encode()
        if on_rows is not None:
            on_rows(len(rows))


def export_stream(
    session: Session,
    project_id: int,
    fmt: str,
    *,
    store: MediaStore | None = None,
    on_rows: Progress = None,
) -> Iterator[bytes]:
    """The byte chunks of an export in the given format."""
    if fmt == "pickapic":
        return export_pickapic(session, project_id, store=store, on_rows=on_rows)
    if fmt == "fastchat":
        return export_fastchat(session, project_id, on_rows=on_rows)
    if fmt == "jsonl":
        return export_jsonl(session, project_id, on_rows=on_rows)
    if fmt == "csv":
        return export_csv(session, project_id, on_rows=on_rows)
    raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
