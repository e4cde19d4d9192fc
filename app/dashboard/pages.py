"""The lead's dashboard `/projects/{id}`: each section is a partial that htmx refreshes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.core import plots
from app.core.db import SessionDep, utcnow
from app.core.deps import PageUser, get_project_for
from app.core.web import render
from app.dashboard import service
from app.exports.service import FILE_TYPES
from app.projects.models import Project
from app.ratings import service as ratings
from app.ratings.scale import ELO_OFFSET

router = APIRouter(include_in_schema=False)

EXPORT_LABELS = {
    "pickapic": "Pick-a-Pic parquet",
    "fastchat": "FastChat battles (JSON)",
    "jsonl": "Votes (JSONL)",
    "csv": "Votes (CSV)",
}


def _overview(session: Session, project: Project, request: Request) -> dict[str, Any]:
    now = utcnow()
    hourly = service.votes_per_hour(session, project.id, hours=48, now=now)
    end = hourly[-1][0]

    def clock(offset: float) -> str:
        return (end + dt.timedelta(hours=offset)).strftime("%H:00")

    per_hour = plots.line_chart(
        {"votes": [(float(i - len(hourly) + 1), n) for i, (_, n) in enumerate(hourly)]},
        title="Votes per hour (last 48 h, UTC)",
        x_format=clock,
        x_ticks=[float(-h) for h in range(0, len(hourly), 6)],
        height=220,
    )
    annotators = service.votes_per_annotator(session, project.id, now=now)
    voted = [a for a in annotators if a.votes]
    per_annotator = plots.bar_chart(
        [plots.Bar(a.email, a.votes) for a in voted[:30]], title="Votes per annotator"
    )
    return {
        "counts": service.overview(session, project.id),
        "votes_last_hour": hourly[-1][1],
        "per_hour_svg": per_hour,
        "per_annotator_svg": per_annotator,
        "annotators": annotators,
    }


def _leaderboard(session: Session, project: Project, request: Request) -> dict[str, Any]:
    rows = service.leaderboard(session, project.id)
    svg = plots.bar_chart(
        [plots.Bar(r["name"], r["rating"], r["ci_low"], r["ci_high"]) for r in rows],
        title="Rating with 95 % interval",
        value_label=f"rating (Elo scale; bars from the average, {ELO_OFFSET:.0f})",
        baseline=ELO_OFFSET,
    )
    empty_fit = None
    if not rows:
        # A fit can exist with nothing to rank, e.g. when every vote so far came from annotators
        # the reliability rule leaves out; "no fit yet" would then send the lead the wrong way.
        fit = ratings.latest_fit(session, project.id)
        if fit is not None:
            excluded = (fit.method or {}).get("reliability", {}).get("excluded", {})
            empty_fit = {"vote_count": fit.vote_count, "excluded_annotators": len(excluded)}
    return {"leaderboard": rows, "leaderboard_svg": svg, "empty_fit": empty_fit}


def _quality(session: Session, project: Project, request: Request) -> dict[str, Any]:
    return {"quality": service.annotator_quality(session, project.id)}


def _lineage(session: Session, project: Project, request: Request) -> dict[str, Any]:
    nodes = service.lineage(session, project.id)
    return {
        "lineage": [{"node": n, "summary": service.evaluation_summary(n.evaluation)} for n in nodes]
    }


def _reward(session: Session, project: Project, request: Request) -> dict[str, Any]:
    rows = service.reward_models(session, project.id)
    keys = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    return {"reward_models": rows, "reward_metric_keys": keys}


def _gallery(session: Session, project: Project, request: Request) -> dict[str, Any]:
    query = request.query_params

    def number(name: str) -> int | None:
        raw = query.get(name, "")
        # ASCII only: str.isdigit() accepts '²', which int() refuses; past 18 digits, no row.
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None

    split = query.get("split") or None
    if split not in (None, "train", "val", "test"):
        raise HTTPException(422, "split must be train, val or test")
    offset = number("offset") or 0
    data = service.gallery(
        session,
        project.id,
        model_id=number("model_id"),
        prompt_id=number("prompt_id"),
        split=split,
        limit=8,
        offset=offset,
    )
    return {
        "gallery": data,
        "gallery_filter": {"model_id": number("model_id"), "split": split or ""},
        "all_models": service.lineage(session, project.id),
    }


SECTIONS: dict[str, Callable[[Session, Project, Request], dict[str, Any]]] = {
    "overview": _overview,
    "leaderboard": _leaderboard,
    "quality": _quality,
    "lineage": _lineage,
    "reward": _reward,
    "gallery": _gallery,
}


@router.get("/projects/{project_id}", response_class=HTMLResponse)
def dashboard(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    exports = {fmt: EXPORT_LABELS.get(fmt, fmt) for fmt in FILE_TYPES}
    ctx: dict[str, Any] = {"project": project, "tab": "dashboard", "exports": exports}
    for build in SECTIONS.values():
        ctx.update(build(session, project, request))
    return render(request, "pages/dashboard.html", ctx)


@router.get("/projects/{project_id}/dash/{section}", response_class=HTMLResponse)
def dashboard_section(
    project_id: int,
    section: str,
    request: Request,
    session: SessionDep,
    user: PageUser,
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=True)
    build = SECTIONS.get(section)
    if build is None:
        raise HTTPException(404, f"no dashboard section {section!r}")
    ctx = {"project": project, **build(session, project, request)}
    return render(request, f"partials/dash_{section}.html", ctx)
