"""HTML forms generated from pydantic schemas (job params, project settings, model params).

The schema stays the single source of truth: the form shows its fields with their defaults and
bounds, the posted strings go back through the same model's validation, and its errors are
shown beside the fields they name.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MultipleOf
from fastapi import Depends, Request
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from starlette.datastructures import FormData

Kind = Literal[
    "checkbox", "select", "number", "text", "longtext", "list", "json", "models", "model"
]
# Free text fields edited as several lines (Markdown).
LONG_TEXT = frozenset({"guidelines"})
_LIST_SPLIT = re.compile(r"[\s,;]+")


async def posted_form(request: Request) -> FormData:
    """The posted form, read once (the CSRF check may have read it already; it is cached)."""
    return await request.form()


# Lets a sync route (run in the thread pool, off the event loop) take the whole form.
PostedForm = Annotated[FormData, Depends(posted_form)]


@dataclass
class FormField:
    name: str  # the input's name (with the form's prefix)
    key: str  # the schema field
    label: str
    kind: Kind
    value: Any = ""
    options: list[tuple[str, str]] = field(default_factory=list)
    required: bool = False
    help: str = ""
    min: float | None = None
    max: float | None = None
    step: str = "1"
    error: str | None = None


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) != len(get_args(annotation))
    return annotation, False


def _kind(key: str, annotation: Any) -> tuple[Kind, list[tuple[str, str]]]:
    inner, _ = _unwrap_optional(annotation)
    origin = get_origin(inner)
    if inner is bool:
        return "checkbox", []
    if origin is Literal:
        return "select", [(str(v), str(v)) for v in get_args(inner)]
    items = [get_args(a)[0] if get_origin(a) is Annotated else a for a in get_args(inner)]
    if origin in (list, tuple, Sequence) and all(a in (int, float, str) for a in items):
        return ("models" if key == "model_ids" else "list"), []
    if inner in (int, float):
        return ("model" if key in ("model_id", "parent_id") else "number"), []
    if inner is str:
        return ("longtext" if key in LONG_TEXT else "text"), []
    return "json", []


def _bounds(info: FieldInfo) -> tuple[float | None, float | None, str]:
    # annotated_types types its bounds as comparison protocols; our fields' bounds are numbers.
    low: Any = None
    high: Any = None
    step = "any"
    for meta in info.metadata:
        if isinstance(meta, Ge):
            low = meta.ge
        elif isinstance(meta, Gt):
            low = meta.gt
        elif isinstance(meta, Le):
            high = meta.le
        elif isinstance(meta, Lt):
            high = meta.lt
        elif isinstance(meta, MultipleOf):
            step = str(meta.multiple_of)
    inner, _ = _unwrap_optional(info.annotation)
    if inner is int and step == "any":
        step = "1"
    return low, high, step


def _default(info: FieldInfo) -> Any:
    if info.default is not PydanticUndefined:
        return info.default
    if info.default_factory is not None:
        # Typed as maybe taking the validated data; the settings fields' factories take none.
        return info.default_factory()  # type: ignore[call-arg]
    return None


def _display(kind: Kind, value: Any) -> Any:
    if value is None:
        return [] if kind == "models" else ""
    if kind == "list" and isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if kind == "json" and not isinstance(value, str):
        return json.dumps(value)
    if kind == "models":
        return [str(v) for v in value]
    if kind == "checkbox":
        return bool(value)
    return str(value)


def fields_for(
    schema: type[BaseModel],
    values: Mapping[str, Any] | None = None,
    errors: Mapping[str, str] | None = None,
    *,
    prefix: str = "",
    models: Sequence[tuple[int, str]] = (),
    skip: Sequence[str] = (),
) -> list[FormField]:
    """The form fields of a schema, filled with `values` (else the defaults) and errors.

    `models` are the (id, name) choices for model-id fields (`model_ids`, `model_id`,
    `parent_id`).
    """
    values = values or {}
    errors = errors or {}
    out = []
    for key, info in schema.model_fields.items():
        if key in skip:
            continue
        kind, options = _kind(key, info.annotation)
        _, optional = _unwrap_optional(info.annotation)
        if kind in ("models", "model"):
            options = [(str(i), f"{name} (#{i})") for i, name in models]
        if kind in ("select", "model") and optional:
            # None usually means "decided elsewhere" (e.g. the project's setting).
            options = [("", "— default"), *options]
        low, high, step = _bounds(info)
        value = values[key] if key in values else _default(info)
        out.append(
            FormField(
                name=prefix + key,
                key=key,
                label=key.replace("_", " "),
                kind=kind,
                value=_display(kind, value),
                options=options,
                required=info.is_required(),
                help=_help(info, kind),
                min=low,
                max=high,
                step=step,
                error=errors.get(key),
            )
        )
    return out


def _help(info: FieldInfo, kind: Kind) -> str:
    parts = [info.description] if info.description else []
    if kind == "list":
        parts.append("comma-separated; empty for the default")
    elif kind == "json":
        parts.append("JSON")
    return "; ".join(parts)


def parse_form(
    schema: type[BaseModel], form: FormData, *, prefix: str = "", skip: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, str]]:
    """Posted strings → raw values for the schema (not yet validated), plus parse errors.

    Empty inputs are left out so that the schema's defaults apply; unchecked checkboxes are
    False; list inputs are split on commas; JSON inputs are parsed.
    """
    raw: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for key, info in schema.model_fields.items():
        if key in skip:
            continue
        kind, _ = _kind(key, info.annotation)
        name = prefix + key
        if kind == "checkbox":
            raw[key] = name in form
            continue
        if kind == "models":
            chosen = [v for v in form.getlist(name) if isinstance(v, str) and v.strip()]
            if chosen or info.is_required():
                raw[key] = chosen
            continue
        posted = form.get(name, "")
        text = posted.strip() if isinstance(posted, str) else ""
        if not text:
            continue
        if kind == "list":
            raw[key] = [part for part in _LIST_SPLIT.split(text) if part]
        elif kind == "json":
            try:
                raw[key] = json.loads(text)
            except json.JSONDecodeError as exc:
                problems[key] = f"not valid JSON: {exc.msg}"
        else:
            raw[key] = text
    return raw, problems


def errors_by_field(errors: Sequence[Mapping[str, Any]], *, skip_head: int = 0) -> dict[str, str]:
    """Validation errors (pydantic or the job service's dicts) keyed by their top field.

    `skip_head` drops leading loc parts, e.g. 1 for the job service's ("params", field, ...).
    A problem that names no field is keyed "" (shown above the form).
    """
    out: dict[str, str] = {}
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())][skip_head:]
        key = loc[0] if loc else ""
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if len(loc) > 1:
            message = f"{'.'.join(loc[1:])}: {message}"
        out[key] = f"{out[key]}; {message}" if key in out else message
    return out
