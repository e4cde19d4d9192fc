"""JSON API for leaderboards and annotator quality."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for
from app.ratings import service

router = APIRouter(prefix="/api/v1", tags=["ratings"])


@router.get("/projects/{project_id}/leaderboard")
def leaderboard(project_id: int, session: SessionDep, user: CurrentUser) -> list[dict[str, Any]]:
    """Model versions by rating (Elo-like scale) with 95 % intervals, from the latest fit."""
    get_project_for(session, user, project_id, lead=True)
    return service.leaderboard(session, project_id)


@router.get("/projects/{project_id}/annotator-quality")
def annotator_quality(project_id: int, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    get_project_for(session, user, project_id, lead=True)
    fit = service.latest_fit(session, project_id)
    if fit is None:
        return {"fit_id": None, "annotators": []}
    created = fit.created_at.isoformat()
    return {"fit_id": fit.id, "created_at": created, "annotators": fit.annotators}
