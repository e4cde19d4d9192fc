"""Imports: Pick-a-Pic-schema parquet → prompts, images, pairs and votes; FastChat battles → a
stored leaderboard.

Both only flush: the caller's transaction (the request, or the CLI's session_scope) commits, and
an ImportFormatError rolls everything back, so a bad file leaves nothing half-imported. Every
image is checked (complete, not a decompression bomb) before the first one is written to the
media store, so a bad file leaves no files behind either.

Pick-a-Pic rows are numbered from 0 (as in `datasets` and pandas). Mapping:
- `caption` → a prompt of the project (reused when the text already exists), split "train";
- `jpg_0`/`jpg_1` → images stored byte-identical, remembered by their uid (`image_0_uid`...) in
  the image provenance, so a uid seen again (in this file or an earlier import) is reused;
- `model_0`/`model_1` → the project's model version of that name, or a new one with base
  "external:<name>"; an empty name means no model version;
- the two images → a pair (eval when the model versions differ, train otherwise);
- labels → a vote with image 0 shown on the left: 1/0 → left, 0/1 → right, 0.5/0.5 → tie;
  `has_label` false → both_bad (no preference). `user_id` → an import annotator account
  `import+p<project>-u<user_id>@prefloop.local` (`import+p<project>@prefloop.local` without a
  user id), an annotator member of the project;
- `ranking_id` → the vote's idempotency key, so importing the same file twice adds nothing. A
  second vote of one user on one image pair is counted under `skipped`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.storage import MediaStore
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.pairs.models import Pair
from app.projects import service as projects
from app.projects.models import Project, Prompt
from app.projects.schemas import PROMPT_TEXT_MAX
from app.ratings.battles import BattleFormatError, parse_battles_text
from app.ratings.bradley_terry import DEFAULT_PRIOR
from app.ratings.leaderboard import leaderboard
from app.ratings.models import Rating, RatingFit
from app.users import service as users
from app.votes.models import Vote
from app.votes.vocabulary import Choice

IMPORT_FORMATS: tuple[str, ...] = ("pickapic", "fastchat")
REQUIRED_COLUMNS = (
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "image_0_uid",
    "image_1_uid",
    "ranking_id",
)
OPTIONAL_COLUMNS = ("model_0", "model_1", "user_id", "created_at", "has_label")
KEY_PREFIX = "pickapic:"
MAX_ERRORS = 50
MAX_NAME = 200  # ModelVersion.name
MAX_UID = 200
# Rows read (and image bytes held) at a time in the writing pass.
IMPORT_BATCH = 128
DEFAULT_FASTCHAT_BOOTSTRAP = 200
# Pick-a-Pic (label_0, label_1) → the vote, image 0 being the left one.
_LABELS = {
    (c.p_left, 1.0 - c.p_left): c.value
    for c in (Choice.LEFT, Choice.RIGHT, Choice.TIE)
    if c.p_left is not None
}


class ImportFormatError(ValueError):
    """The file cannot be imported; `errors` names each offending row or record."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class ImportSummary:
    """What an import added (and what it left out, by reason)."""

    rows: int = 0
    prompts: int = 0
    images: int = 0
    pairs: int = 0
    votes: int = 0
    model_versions: int = 0
    annotators: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unstorable(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    return None


# --------------------------------------------------------------------------------------------
# Pick-a-Pic: validation of the scalar columns (first pass, no image bytes read)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RowMeta:
    caption: str
    uid_0: str
    uid_1: str
    model_0: str
    model_1: str
    choice: str
    user_key: str | None
    ranking_key: str
    created_at: dt.datetime | None


def _as_text(value: object, column: str, *, allow_int: bool = False) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{column} is missing")
    if isinstance(value, int) and allow_int:
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{column} must be a string, got {type(value).__name__}")
    problem = _unstorable(value)
    if problem:
        raise ValueError(f"{column} {problem}")
    return value


def _as_label(value: object, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{column} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{column} must be finite, got {value!r}")
    return float(value)


def _as_time(value: object) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"created_at is not an ISO timestamp: {value!r}") from None
    if not isinstance(value, dt.datetime):
        raise ValueError(f"created_at must be a timestamp, got {type(value).__name__}")
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _row_meta(row: dict[str, Any]) -> _RowMeta:
    caption = _as_text(row["caption"], "caption").strip()
    if not caption:
        raise ValueError("caption is blank")
    if len(caption) > PROMPT_TEXT_MAX:
        raise ValueError(f"caption is longer than {PROMPT_TEXT_MAX} characters")
    if "\x00" in caption:
        raise ValueError("caption contains NUL characters")
    uids = []
    for column in ("image_0_uid", "image_1_uid"):
        uid = _as_text(row[column], column, allow_int=True).strip()
        if not uid or len(uid) > MAX_UID:
            raise ValueError(f"{column} must be 1 to {MAX_UID} characters")
        uids.append(uid)
    if uids[0] == uids[1]:
        raise ValueError(f"image_0_uid and image_1_uid are the same ({uids[0]!r})")
    models = []
    for column in ("model_0", "model_1"):
        value = row.get(column)
        name = "" if value is None else _as_text(value, column).strip()
        if len(name) > MAX_NAME:
            raise ValueError(f"{column} is longer than {MAX_NAME} characters")
        models.append(name)
    label_0 = _as_label(row["label_0"], "label_0")
    label_1 = _as_label(row["label_1"], "label_1")
    has_label = row.get("has_label")
    if has_label is not None and not isinstance(has_label, bool):
        raise ValueError(f"has_label must be true or false, got {has_label!r}")
    if has_label is False:
        choice = Choice.BOTH_BAD.value
    elif (label_0, label_1) in _LABELS:
        choice = _LABELS[(label_0, label_1)]
    else:
        raise ValueError(
            f"label_0/label_1 must be 1/0, 0/1 or 0.5/0.5, got {label_0:g}/{label_1:g}"
        )
    ranking = _as_text(row["ranking_id"], "ranking_id", allow_int=True).strip()
    if not ranking:
        raise ValueError("ranking_id is blank")
    user = row.get("user_id")
    user_key = None if user is None else _as_text(user, "user_id", allow_int=True).strip() or None
    return _RowMeta(
        caption=caption,
        uid_0=uids[0],
        uid_1=uids[1],
        model_0=models[0],
        model_1=models[1],
        choice=choice,
        user_key=user_key,
        ranking_key=_idempotency_key(ranking),
        created_at=_as_time(row.get("created_at")),
    )


def _idempotency_key(ranking: str) -> str:
    key = KEY_PREFIX + ranking
    # Vote.idempotency_key holds 100 characters; long ids are kept apart by their hash.
    if len(key) > 100:
        key = KEY_PREFIX + "sha256:" + hashlib.sha256(ranking.encode()).hexdigest()
    return key


def _open_parquet(source: str | IO[bytes]) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(source)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ImportFormatError([f"not a readable Parquet file: {exc}"]) from None
    names = set(parquet.schema_arrow.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ImportFormatError(
            [
                f"missing column(s) {', '.join(missing)} (Pick-a-Pic schema needs "
                f"{', '.join(REQUIRED_COLUMNS)})"
            ]
        )
    return parquet


def _batches(parquet: pq.ParquetFile, columns: list[str], batch_size: int) -> Any:
    """Record batches as lists of row dicts; unreadable data becomes an ImportFormatError."""
    start = 0
    iterator = parquet.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        try:
            batch = next(iterator)
            rows = batch.to_pylist()
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise ImportFormatError(
                [f"rows from {start}: the Parquet data cannot be read: {exc}"]
            ) from None
        yield start, rows
        start += len(rows)


def _columns(parquet: pq.ParquetFile, *, images: bool) -> list[str]:
    present = set(parquet.schema_arrow.names)
    columns = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in present]
    return columns if images else [c for c in columns if c not in ("jpg_0", "jpg_1")]


def validate_pickapic(parquet: pq.ParquetFile) -> int:
    """Check every row's scalar columns (no image bytes read); returns the number of rows.

    Raises ImportFormatError listing the bad rows (up to MAX_ERRORS).
    """
    n_rows = 0
    errors: list[str] = []
    for start, rows in _batches(parquet, _columns(parquet, images=False), 4096):
        for offset, row in enumerate(rows):
            try:
                _row_meta(row)
            except ValueError as exc:
                errors.append(f"row {start + offset}: {exc}")
                if len(errors) >= MAX_ERRORS:
                    raise ImportFormatError([*errors, "(stopped after this many errors)"]) from None
        n_rows += len(rows)
    if errors:
        raise ImportFormatError(errors)
    if not n_rows:
        raise ImportFormatError(["the file has no rows"])
    return n_rows


# --------------------------------------------------------------------------------------------
# Pick-a-Pic: writing (second pass)
# --------------------------------------------------------------------------------------------


def _slug(value: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", value.lower()).strip("-.")[:40]
    if slug != value or not slug:
        # Different ids must never share an account, even when their slugs coincide.
        slug = f"{slug}-{hashlib.sha256(value.encode()).hexdigest()[:10]}".strip("-")
    return slug


def import_annotator_email(project_id: int, user_key: str | None) -> str:
    if user_key is None:
        return f"import+p{project_id}@prefloop.local"
    return f"import+p{project_id}-u{_slug(user_key)}@prefloop.local"


def check_image(row_no: int, column: str, data: object) -> None:
    """Complete image bytes of a sane size, or an ImportFormatError naming the cell."""
    if not isinstance(data, bytes) or not data:
        raise ImportFormatError([f"row {row_no}: {column} must hold the image file's bytes"])
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow only warns; here such a size is a decompression bomb.
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:
                # Checksums and the end marker without decoding: a truncated file fails here.
                img.verify()
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad image
        raise ImportFormatError(
            [f"row {row_no}: {column} is not a readable image ({type(exc).__name__}: {exc})"]
        ) from None


def _check_new_images(parquet: pq.ParquetFile, writer: _PickapicWriter) -> None:
    """Check every image the writing pass would store, before it stores the first one."""
    known = set(writer.images)
    keys = set(writer.keys)
    columns = ["image_0_uid", "image_1_uid", "jpg_0", "jpg_1", "ranking_id"]
    for start, rows in _batches(parquet, columns, IMPORT_BATCH):
        for offset, row in enumerate(rows):
            key = _idempotency_key(str(row["ranking_id"]).strip())
            if key in keys:
                continue  # skipped as already imported: its images are not read
            keys.add(key)
            for k in (0, 1):
                uid = str(row[f"image_{k}_uid"]).strip()
                if uid not in known:
                    check_image(start + offset, f"jpg_{k}", row[f"jpg_{k}"])
                    known.add(uid)


class _PickapicWriter:
    """Get-or-create lookups for one import, preloaded once so rows cost no extra queries."""

    def __init__(self, session: Session, project: Project, store: MediaStore) -> None:
        self.session = session
        self.project = project
        self.store = store
        self.summary = ImportSummary()
        pid = project.id
        self.prompts: dict[str, int] = {
            text: prompt_id
            for prompt_id, text in session.execute(
                select(Prompt.id, Prompt.text).where(Prompt.project_id == pid).order_by(Prompt.id)
            )
        }
        self.models: dict[str, int] = dict(
            session.execute(
                select(ModelVersion.name, ModelVersion.id).where(ModelVersion.project_id == pid)
            ).all()
        )
        uid_expr = Image.provenance["import_uid"].as_string()
        self.images: dict[str, tuple[str, int | None]] = {
            uid: (image_id, model_id)
            for uid, image_id, model_id in session.execute(
                select(uid_expr, Image.id, Image.model_version_id).where(
                    Image.project_id == pid, uid_expr.is_not(None)
                )
            )
        }
        self.pairs: dict[frozenset[str], Pair] = {}
        for pair in session.scalars(select(Pair).where(Pair.project_id == pid)):
            self.pairs[frozenset((pair.image_a_id, pair.image_b_id))] = pair
        imported = session.execute(
            select(Vote.idempotency_key, Vote.pair_id, Vote.annotator_id).where(
                Vote.project_id == pid, Vote.idempotency_key.startswith(KEY_PREFIX)
            )
        ).all()
        self.keys: set[str] = {key for key, _, _ in imported if key is not None}
        self.voted: set[tuple[int, int]] = {(pair_id, user) for _, pair_id, user in imported}
        self.annotators: dict[str | None, int] = {}
        self.new_pairs: list[Pair] = []

    def annotator(self, user_key: str | None) -> int:
        if user_key in self.annotators:
            return self.annotators[user_key]
        email = import_annotator_email(self.project.id, user_key)
        user = users.get_by_email(self.session, email)
        if user is None:
            user = users.create_user(self.session, email=email, role="annotator")
            self.summary.annotators += 1
        projects.add_member(self.session, project=self.project, user=user, role="annotator")
        self.annotators[user_key] = user.id
        return user.id

    def prompt(self, caption: str) -> int:
        if caption not in self.prompts:
            prompt = Prompt(project_id=self.project.id, text=caption, split="train", tags=[])
            self.session.add(prompt)
            self.session.flush()
            self.prompts[caption] = prompt.id
            self.summary.prompts += 1
        return self.prompts[caption]

    def model(self, name: str) -> int | None:
        if not name:
            return None
        if name not in self.models:
            version = ModelVersion(
                project_id=self.project.id,
                name=name,
                base=f"external:{name}",
                params={},
                status="arena",
                evaluation={},
            )
            self.session.add(version)
            self.session.flush()
            self.models[name] = version.id
            self.summary.model_versions += 1
        return self.models[name]

    def image(
        self, row_no: int, column: str, uid: str, data: object, prompt_id: int, model: str
    ) -> tuple[str, int | None]:
        if uid in self.images:
            return self.images[uid]
        check_image(row_no, column, data)
        assert isinstance(data, bytes)
        model_id = self.model(model)
        image = store_image(
            self.session,
            self.store,
            project_id=self.project.id,
            prompt_id=prompt_id,
            png=data,
            model_version_id=model_id,
            provenance={"source": "pickapic", "import_uid": uid, "model": model or None},
        )
        self.images[uid] = (image.id, model_id)
        self.summary.images += 1
        return self.images[uid]

    def row(self, row_no: int, meta: _RowMeta, jpg_0: object, jpg_1: object) -> None:
        self.summary.rows += 1
        if meta.ranking_key in self.keys:
            self.summary.skip("already imported")
            return
        prompt_id = self.prompt(meta.caption)
        image_0, model_0 = self.image(row_no, "jpg_0", meta.uid_0, jpg_0, prompt_id, meta.model_0)
        image_1, model_1 = self.image(row_no, "jpg_1", meta.uid_1, jpg_1, prompt_id, meta.model_1)
        pair = self.pairs.get(frozenset((image_0, image_1)))
        if pair is None:
            different = model_0 is not None and model_1 is not None and model_0 != model_1
            # One stored order (as the scheduler does), so the unique constraint sees (b, a).
            image_a, image_b = sorted((image_0, image_1))
            pair = Pair(
                project_id=self.project.id,
                prompt_id=prompt_id,
                image_a_id=image_a,
                image_b_id=image_b,
                purpose="eval" if different else "train",
                is_gold=False,
                votes_wanted=0,
                vote_count=0,
            )
            self.session.add(pair)
            self.session.flush()
            self.pairs[frozenset((image_0, image_1))] = pair
            self.new_pairs.append(pair)
            self.summary.pairs += 1
        annotator_id = self.annotator(meta.user_key)
        if (pair.id, annotator_id) in self.voted:
            self.summary.skip("second vote of one user on one pair")
            return
        created = meta.created_at or utcnow()
        self.session.add(
            Vote(
                pair_id=pair.id,
                project_id=self.project.id,
                annotator_id=annotator_id,
                left_image_id=image_0,
                choice=meta.choice,
                latency_ms=None,
                idempotency_key=meta.ranking_key,
                created_at=created,
            )
        )
        pair.vote_count += 1
        self.keys.add(meta.ranking_key)
        self.voted.add((pair.id, annotator_id))
        self.summary.votes += 1

    def finish(self) -> ImportSummary:
        # Imported pairs already hold all the votes they will get: the scheduler leaves them be.
        for pair in self.new_pairs:
            pair.votes_wanted = pair.vote_count
        self.session.flush()
        return self.summary


def import_pickapic(
    session: Session,
    *,
    project: Project,
    source: str | IO[bytes],
    store: MediaStore,
    on_rows: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Import a Pick-a-Pic-schema parquet file into the project (see the module docstring)."""
    parquet = _open_parquet(source)
    validate_pickapic(parquet)
    writer = _PickapicWriter(session, project, store)
    _check_new_images(parquet, writer)
    # Second pass: the rows again, now with their images, a batch at a time.
    for start, rows in _batches(parquet, _columns(parquet, images=True), IMPORT_BATCH):
        for offset, row in enumerate(rows):
            writer.row(start + offset, _row_meta(row), row["jpg_0"], row["jpg_1"])
        session.flush()
        if on_rows is not None:
            on_rows(len(rows))
    return writer.finish()


# --------------------------------------------------------------------------------------------
# FastChat battles → model versions and a stored leaderboard
# --------------------------------------------------------------------------------------------


def import_fastchat(
    session: Session,
    *,
    project: Project,
    data: bytes,
    n_bootstrap: int = DEFAULT_FASTCHAT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Battle records (FastChat JSON list or JSON Lines) → model versions by name and a RatingFit.

    Ratings are the Bradley–Terry leaderboard (app.ratings.leaderboard) with ties as half a win
    each, on the Elo-like scale, with bootstrap percentile intervals and interval-based ranks.
    """

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFormatError(
            [f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"]
        ) from None
    try:
        battles = parse_battles_text(text)
    except BattleFormatError as exc:
        raise ImportFormatError(exc.problems[:MAX_ERRORS]) from None
    errors = []
    for name in battles.models:
        problem = _unstorable(name)
        if problem or len(name.strip()) > MAX_NAME or not name.strip():
            errors.append(
                f"model name {name[:50]!r}: " + (problem or f"must be 1 to {MAX_NAME} characters")
            )
    if errors:
        raise ImportFormatError(errors[:MAX_ERRORS])

    existing = dict(
        session.execute(
            select(ModelVersion.name, ModelVersion.id).where(ModelVersion.project_id == project.id)
        ).all()
    )
    created = 0
    model_ids = []
    for name in battles.models:
        if name not in existing:
            version = ModelVersion(
                project_id=project.id,
                name=name,
                base=f"external:{name}",
                params={},
                status="arena",
                evaluation={},
            )
            session.add(version)
            session.flush()
            existing[name] = version.id
            created += 1
        model_ids.append(existing[name])

    board = leaderboard(
        battles.counts(), battles.models, ties="half", n_bootstrap=max(n_bootstrap, 1), seed=seed
    )
    fit = RatingFit(
        project_id=project.id,
        method={
            "source": "fastchat",
            "model": "bradley_terry",
            "ties": "half",
            "prior": DEFAULT_PRIOR,
            "bootstrap": max(n_bootstrap, 1),
            "level": board.level,
            "battles": len(battles.outcome),
            "skipped": battles.n_skipped,
            "warnings": board.warnings,
        },
        annotators=[],
        vote_count=len(battles.outcome),
    )
    session.add(fit)
    session.flush()
    rows = []
    for row in board.rows:
        session.add(
            Rating(
                fit_id=fit.id,
                model_version_id=model_ids[row.index],
                score=row.score,
                rating=row.rating,
                ci_low=row.ci_low,
                ci_high=row.ci_high,
                rank=row.rank,
                votes=row.votes,
            )
        )
        rows.append(
            {
                "model_id": model_ids[row.index],
                "name": row.model,
                "rating": row.rating,
                "ci_low": row.ci_low,
                "ci_high": row.ci_high,
                "rank": row.rank,
                "votes": row.votes,
            }
        )
    session.flush()
    return {
        "fit_id": fit.id,
        "battles": len(battles.outcome),
        "skipped": battles.n_skipped,
        "model_versions": created,
        "leaderboard": rows,
    }


def summary_json(summary: ImportSummary | dict[str, Any]) -> str:
    payload = summary.as_dict() if isinstance(summary, ImportSummary) else summary
    return json.dumps(payload, indent=2)
