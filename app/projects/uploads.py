"""Prompt files (plain text, CSV, JSONL) → validated prompts, all or nothing.

Formats:
- text: one prompt per line; blank lines are ignored; every prompt goes to the train split.
- csv: a header row naming a `text` column, optionally `split` and `tags` (tags separated by
  `;` or `|`); other columns are ignored; empty rows are ignored.
- jsonl: one object `{"text", "split"?, "tags"?}` per non-blank line.
Every problem is reported with its 1-based line number; nothing is inserted unless the whole
file is valid.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from typing import Any, Literal, cast

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.projects import service
from app.projects.models import SPLITS, Project
from app.projects.schemas import PromptIn

UploadFormat = Literal["text", "csv", "jsonl"]
FORMATS: tuple[str, ...] = ("text", "csv", "jsonl")
MAX_PROMPTS = 100_000
# Past this many problems the file is clearly wrong; more messages would not help anyone.
MAX_ERRORS = 50

_EXTENSIONS: dict[str, UploadFormat] = {
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
_CONTENT_TYPES: dict[str, UploadFormat] = {
    "text/plain": "text",
    "text/csv": "csv",
    "application/csv": "csv",
    "application/jsonl": "jsonl",
    "application/x-jsonlines": "jsonl",
    "application/jsonlines": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/ndjson": "jsonl",
}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_TAG_SEPARATORS = re.compile(r"[;|]")


class PromptFileError(ValueError):
    """The file cannot be imported; `errors` lists every problem, with line numbers."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def detect_format(
    filename: str | None, content_type: str | None, text: str, explicit: str | None = None
) -> UploadFormat:
    """The explicit format, else the file extension, else the content type, else a sniff."""
    if explicit:
        if explicit not in FORMATS:
            raise PromptFileError(
                [f"unknown format {explicit!r}; expected one of text, csv, jsonl"]
            )
        return cast(UploadFormat, explicit)  # checked against FORMATS just above
    name = (filename or "").lower()
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in _CONTENT_TYPES:
        return _CONTENT_TYPES[mime]
    first = next((line.strip() for line in _LINE_BREAK.split(text) if line.strip()), "")
    if first.startswith("{"):
        return "jsonl"
    header = [cell.strip().lower() for cell in first.split(",")]
    if len(header) > 1 and "text" in header:
        return "csv"
    return "text"


def decode_utf8(data: bytes) -> str:
    """UTF-8 (a leading byte-order mark is allowed) or a PromptFileError naming the bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start]
        raise PromptFileError(
            [f"not UTF-8 text (byte 0x{bad:02x} at offset {exc.start})"]
        ) from None


def _field_message(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ())) or "prompt"
    kind = error.get("type", "")
    if loc == "split":
        return f"split must be one of {', '.join(SPLITS)}"
    if kind == "extra_forbidden":
        return f"unknown field {loc!r}"
    if kind == "missing":
        return f"missing field {loc!r}"
    if kind == "string_too_long":
        return f"{loc} is longer than {error.get('ctx', {}).get('max_length')} characters"
    if kind == "too_long":
        return f"{loc} has more than {error.get('ctx', {}).get('max_length')} items"
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "string_too_short" or msg == "must not be blank":
        return f"{loc} must not be blank"
    return f"{loc}: {msg}"


def _unstorable(value: object) -> str | None:
    """Why Postgres could not store this string (NUL, lone surrogate), else None."""
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str):
            continue
        if "\x00" in item:
            return "contains a NUL character"
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            return "is not valid Unicode (a lone surrogate)"
    return None


def _validate(line_no: int, raw: dict[str, Any], errors: list[str]) -> PromptIn | None:
    for key, value in raw.items():
        problem = _unstorable(value)
        if problem:
            errors.append(f"line {line_no}: {key} {problem}")
            return None
    try:
        return PromptIn.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            errors.append(f"line {line_no}: {_field_message(dict(error))}")
        return None


def _numbered_lines(text: str) -> Iterable[tuple[int, str]]:
    for number, line in enumerate(_LINE_BREAK.split(text), start=1):
        if line.strip():
            yield number, line


def _parse_text(text: str, errors: list[str]) -> list[PromptIn]:
    prompts = []
    for number, line in _numbered_lines(text):
        prompt = _validate(number, {"text": line}, errors)
        if prompt is not None:
            prompts.append(prompt)
    return prompts


def _split_tags(value: str) -> list[str]:
    return [tag.strip() for tag in _TAG_SEPARATORS.split(value) if tag.strip()]


def _parse_csv(text: str, errors: list[str]) -> list[PromptIn]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    prompts: list[PromptIn] = []
    columns: dict[str, int] | None = None
    line_no = 1  # where the next record starts
    try:
        for row in reader:
            start, line_no = line_no, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                header = [cell.strip().lower() for cell in row]
                if "text" not in header:
                    errors.append(
                        f"line {start}: missing column text (the header names: "
                        f"{', '.join(repr(c) for c in header)})"
                    )
                    return []
                columns = {
                    name: header.index(name) for name in ("text", "split", "tags") if name in header
                }
                continue
            raw: dict[str, Any] = {}
            for name, index in columns.items():
                cell = row[index].strip() if index < len(row) else ""
                if name == "text":
                    raw["text"] = cell
                elif name == "split" and cell:
                    raw["split"] = cell
                elif name == "tags" and cell:
                    raw["tags"] = _split_tags(cell)
            prompt = _validate(start, raw, errors)
            if prompt is not None:
                prompts.append(prompt)
            if len(errors) >= MAX_ERRORS:
                break
    except csv.Error as exc:
        errors.append(f"line {reader.line_num or line_no}: not valid CSV: {exc}")
    if columns is None and not errors:
        errors.append("line 1: missing column text (the file has no header row)")
    return prompts


def _parse_jsonl(text: str, errors: list[str]) -> list[PromptIn]:
    prompts = []
    for number, line in _numbered_lines(text):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:
            errors.append(f"line {number}: not valid JSON: nested too deeply")
            continue
        if not isinstance(record, dict):
            errors.append(f"line {number}: expected an object, got {type(record).__name__}")
            continue
        prompt = _validate(number, record, errors)
        if prompt is not None:
            prompts.append(prompt)
        if len(errors) >= MAX_ERRORS:
            break
    return prompts


def parse_prompt_file(
    data: bytes,
    *,
    filename: str | None = None,
    content_type: str | None = None,
    file_format: str | None = None,
) -> list[PromptIn]:
    """Every prompt of the file, or a PromptFileError listing every problem."""
    text = decode_utf8(data)
    fmt = detect_format(filename, content_type, text, file_format)
    errors: list[str] = []
    parser = {"text": _parse_text, "csv": _parse_csv, "jsonl": _parse_jsonl}[fmt]
    prompts = parser(text, errors)
    if errors:
        shown = errors[:MAX_ERRORS]
        if len(errors) > MAX_ERRORS:
            shown.append(f"... and {len(errors) - MAX_ERRORS} more errors")
        raise PromptFileError(shown)
    if not prompts:
        raise PromptFileError([f"the file has no prompts (read as {fmt})"])
    if len(prompts) > MAX_PROMPTS:
        raise PromptFileError([f"too many prompts: {len(prompts)} (at most {MAX_PROMPTS})"])
    return prompts


def import_prompt_file(
    session: Session,
    *,
    project: Project,
    data: bytes,
    filename: str | None = None,
    content_type: str | None = None,
    file_format: str | None = None,
) -> int:
    """Validate the whole file, then add its prompts to the project; returns how many."""
    prompts = parse_prompt_file(
        data, filename=filename, content_type=content_type, file_format=file_format
    )
    return service.add_prompts(session, project=project, prompts=prompts)
