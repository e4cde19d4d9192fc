"""Where a model's weights may come from: the one check for `base` and `adapter`.

A lead names weights as a toy model name, a model hub id (`org/name`), a model or job of the
same project (`model:<id>`, `job:<id>`), or a directory under the configured model roots
(`PREFLOOP_MODEL_ROOTS`). Anything else is refused with one message whatever the reason, so the
answer never tells whether a path exists; `~` is not expanded and symlinks are followed before
the roots are checked. Artifacts that jobs write under the media dir are reachable by id only,
which keeps one project's trained adapters away from the others.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.generators.models import ModelVersion

TOY_RE = re.compile(r"^toy(-[\w.]+)?$")
# Exactly "org/name": one slash, no dot-only parts, so a hub id is never a path upwards.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w-]*(\.[\w-]+)*/[A-Za-z0-9][\w-]*(\.[\w-]+)*$")
REF_RE = re.compile(r"^(model|job):(\d{1,18})$")


class SourceError(ValueError):
    """`base` or `adapter` names nothing this project may load."""


def refusal(field: str) -> SourceError:
    return SourceError(
        f"{field}: not an allowed model source; use a toy name, a model hub id (org/name), "
        "model:<id> or job:<id> of this project, or a directory under the model roots"
    )


def within_roots(path: str, roots: list[Path] | None = None) -> bool:
    """True if `path` (absolute, symlinks followed) exists under one of the model roots."""
    if "\x00" in path or not os.path.isabs(path):
        return False
    real = Path(os.path.realpath(path))
    if not real.exists():
        return False
    media = get_settings().resolved_media_dir
    for root in roots if roots is not None else get_settings().resolved_model_roots:
        root = Path(os.path.realpath(root))
        # Job artifacts live under the media dir: reachable by id only, unless a root is
        # itself inside it.
        if real.is_relative_to(root) and (
            not real.is_relative_to(media) or root.is_relative_to(media)
        ):
            return True
    return False


def _produced(session: Session, project_id: int, kind: str, ident: int) -> ModelVersion | None:
    column = ModelVersion.id if kind == "model" else ModelVersion.produced_by_job_id
    return session.scalar(
        select(ModelVersion).where(column == ident, ModelVersion.project_id == project_id)
    )


def resolve_sources(
    session: Session, *, project_id: int, base: str, adapter: str | None
) -> tuple[str, str | None]:
    """The (base, adapter) to store for a new model of the project, or SourceError."""
    base = base.strip()
    adapter = adapter.strip() if adapter is not None else None
    adapter = adapter or None
    inherited: str | None = None
    ref = REF_RE.match(base)
    if ref:
        source = _produced(session, project_id, ref.group(1), int(ref.group(2)))
        if source is None:
            raise refusal("base")
        # A referenced model that is a base plus an adapter brings both along.
        base, inherited = source.base, source.adapter
    elif not (TOY_RE.match(base) or HUB_ID_RE.match(base) or within_roots(base)):
        raise refusal("base")
    if adapter is None:
        return base, inherited
    ref = REF_RE.match(adapter)
    if ref:
        source = _produced(session, project_id, ref.group(1), int(ref.group(2)))
        if source is None or not source.adapter:
            raise refusal("adapter")
        adapter = source.adapter
    elif not (HUB_ID_RE.match(adapter) or within_roots(adapter)):
        raise refusal("adapter")
    return base, adapter


def loadable_local(path: str) -> bool:
    """For the worker, about a stored value that is a path on its disk: under the model roots,
    or a job artifact under the media dir (registration already checked its project)."""
    if within_roots(path):
        return True
    return within_roots(path, [get_settings().resolved_media_dir / "jobs"])
