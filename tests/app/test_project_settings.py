"""Stored project settings evolve: old rows upgrade, unknown keys and refused values are
tolerated on read, while submissions stay strict."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.projects.models import Project
from app.projects.schemas import ProjectSettings
from app.projects.settings import SETTINGS_VERSION, dump_settings, load_settings, upgrade_settings
from tests.support import bearer

# A settings row as the first release stored it (ProjectSettings.model_dump(), no version).
FIRST_RELEASE_ROW: dict[str, Any] = {
    "votes_per_pair": 4,
    "gold_rate": 0.1,
    "reservation_minutes": 5.0,
    "tie_policy": "soft",
    "active_sampling": True,
    "random_floor": 0.3,
    "votes_per_second": 7.0,
    "change_vote_seconds": 30,
    "reveal_gold": False,
    "train_pairs_per_prompt": 2,
}
# Version 3 (quality control): projects from before keep their behaviour, with no minimum
# viewing time and every annotator's votes used; the other new fields take their defaults.
KEPT_BY_V3 = {"min_view_ms": 0, "exclude_flagged": False}
NEW_IN_V3 = {
    "min_gold_accuracy": 0.7,
    "excluded_annotators": [],
    "included_annotators": [],
    "question": "Which image fits the prompt better?",
    "guidelines": "",
}
# Version 4 (a per-session vote target): projects from before set none.
KEPT_BY_V4 = {"session_target": 0}


def test_a_first_release_row_upgrades_to_the_same_settings() -> None:
    settings = load_settings(FIRST_RELEASE_ROW)
    assert settings.model_dump() == {**FIRST_RELEASE_ROW, **KEPT_BY_V3, **NEW_IN_V3, **KEPT_BY_V4}
    assert ProjectSettings().min_view_ms == 500 and ProjectSettings().exclude_flagged
    stored = dump_settings(settings)
    assert stored["version"] == SETTINGS_VERSION and load_settings(stored) == settings
    assert load_settings(None) == ProjectSettings() == load_settings({})


def test_every_upgrade_step_exists_up_to_the_current_version() -> None:
    # A row of any earlier version reaches the current one (no gap in UPGRADES).
    assert SETTINGS_VERSION == 4
    for version in range(1, 3):
        upgraded = upgrade_settings({**FIRST_RELEASE_ROW, "version": version})
        assert upgraded == {**FIRST_RELEASE_ROW, **KEPT_BY_V3, **KEPT_BY_V4}
    # A version-3 row keeps its quality-control choices and gains no session target.
    v3 = {**FIRST_RELEASE_ROW, "min_view_ms": 250, "exclude_flagged": True, "version": 3}
    assert upgrade_settings(v3) == {
        **FIRST_RELEASE_ROW, "min_view_ms": 250, "exclude_flagged": True, **KEPT_BY_V4
    }
    current = {**FIRST_RELEASE_ROW, "session_target": 40, "version": SETTINGS_VERSION}
    assert upgrade_settings(current) == {**FIRST_RELEASE_ROW, "session_target": 40}


def test_unknown_keys_and_refused_values_in_a_stored_row_are_tolerated() -> None:
    newer = {**FIRST_RELEASE_ROW, "version": SETTINGS_VERSION + 1, "pair_budget": 9}
    assert load_settings(newer).model_dump() == {
        **ProjectSettings().model_dump(), **FIRST_RELEASE_ROW
    }
    removed_field = {**FIRST_RELEASE_ROW, "old_knob": True}
    assert load_settings(removed_field).votes_per_pair == 4
    # A value a later bound refuses falls back to its default; the rest is kept.
    refused = load_settings({**FIRST_RELEASE_ROW, "votes_per_pair": 10_000})
    assert refused.votes_per_pair == ProjectSettings().votes_per_pair
    assert refused.tie_policy == "soft"
    # Submissions are checked strictly.
    with pytest.raises(ValidationError):
        ProjectSettings.model_validate({"pair_budget": 9})


def test_a_project_with_an_old_row_still_works_through_the_api(db, client, make_user) -> None:  # type: ignore[no-untyped-def]
    lead, token = make_user("lead")
    project = Project(name="old", settings={**FIRST_RELEASE_ROW, "old_knob": 1})
    db.add(project)
    db.flush()
    from app.projects.service import add_member

    add_member(db, project=project, user=lead, role="lead")
    db.commit()
    listed = client.get("/api/v1/projects", headers=bearer(token))
    assert listed.status_code == 200
    (row,) = [p for p in listed.json() if p["id"] == project.id]
    assert row["settings"] == {**FIRST_RELEASE_ROW, **KEPT_BY_V3, **NEW_IN_V3, **KEPT_BY_V4}
    created = client.post(
        "/api/v1/projects",
        json={"name": "new", "settings": {"votes_per_pair": 2}},
        headers=bearer(token),
    )
    assert created.status_code == 201
    stored = db.get(Project, created.json()["id"]).settings
    assert stored["version"] == SETTINGS_VERSION and stored["votes_per_pair"] == 2
