"""Stored project settings and their evolution.

A project's settings row is `{"version": N, ...fields}`. Reading goes through `load_settings`:
older rows are upgraded step by step (`UPGRADES`), keys this version does not know (from an
older or a newer prefloop) are dropped, and a stored value this version would refuse falls
back to its default, so changing `ProjectSettings` later never breaks an existing project.
Submissions are still checked strictly by `ProjectSettings` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from app.projects.schemas import ProjectSettings

log = logging.getLogger("prefloop.projects")

SETTINGS_VERSION = 4


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 2 introduced the version stamp itself; the fields are the first release's.
    return raw


def _v2_to_v3(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 3 added annotation quality control. Existing projects keep accepting votes as
    # before (no minimum viewing time) and keep using every vote until a lead opts in.
    return {"min_view_ms": 0, "exclude_flagged": False, **raw}


def _v3_to_v4(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 4 added a per-session vote target; existing projects set none.
    return {"session_target": 0, **raw}


# UPGRADES[n] turns a version-n row into a version-(n + 1) one.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
}


def upgrade_settings(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """A stored row (any version; none: the first release) → this version's known fields."""
    data = dict(raw or {})
    if not data:
        # No stored choices at all (a project row made without settings): today's defaults.
        return {}
    version = int(data.pop("version", 1))
    while version < SETTINGS_VERSION:
        data = UPGRADES[version](data)
        version += 1
    unknown = sorted(set(data) - set(ProjectSettings.model_fields))
    if unknown:
        log.info("projects.settings_ignored keys=%s version=%s", unknown, version)
    return {k: v for k, v in data.items() if k in ProjectSettings.model_fields}


def load_settings(raw: Mapping[str, Any] | None) -> ProjectSettings:
    data = upgrade_settings(raw)
    try:
        return ProjectSettings.model_validate(data)
    except ValidationError as exc:
        refused = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        log.warning("projects.settings_defaulted keys=%s", sorted(refused))
        return ProjectSettings.model_validate({k: v for k, v in data.items() if k not in refused})


def dump_settings(settings: ProjectSettings) -> dict[str, Any]:
    """The row to store: this version's stamp and every field."""
    return {"version": SETTINGS_VERSION, **settings.model_dump()}
