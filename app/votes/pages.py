"""The annotator's pages: the blind vote page (htmx) and "my votes".

A vote is ONE request: the POST records it through the same service as the JSON API and
answers with the next pair's partial. That partial also carries `<link rel="preload">` for the
images of the pair most likely to come after it (a peek, nothing reserved), so the following
swap shows images already in the browser cache. Without JavaScript the same form posts and the
full page comes back.
"""

from __future__ import annotations

import datetime as dt
import uuid
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import SessionDep, utcnow
from app.core.deps import PageUser, get_project_for
from app.core.markdown import render_markdown
from app.core.web import is_htmx, render
from app.images.models import Image
from app.images.signing import served_image_url
from app.jobs.models import Job
from app.pairs import scheduler as pairs
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.projects.schemas import ProjectSettings
from app.projects.service import project_settings
from app.users.models import User
from app.votes import service
from app.votes.models import Vote
from app.votes.sitting import gold_record, sitting_votes
from app.votes.vocabulary import MAX_LATENCY_MS, Choice

router = APIRouter(include_in_schema=False)


def _side(image_id: str, sha256: str = "", annotator_id: int = 0) -> dict[str, str]:
    return {"image_id": image_id, "url": served_image_url(image_id, sha256, annotator_id)}


def undo_offer(
    settings: ProjectSettings, vote_id: int, choice: str, cast_at: dt.datetime, now: dt.datetime
) -> dict[str, Any] | None:
    """The "change your last vote" offer for the annotator's latest vote, while it lasts."""
    left = settings.change_vote_seconds - (now - cast_at).total_seconds()
    if left <= 0:
        return None
    return {"id": vote_id, "choice": Choice(choice).label, "seconds_left": int(left)}


def _undo(
    session: Session, project: Project, user: User, now: dt.datetime
) -> dict[str, Any] | None:
    last = service.last_vote(session, project_id=project.id, annotator_id=user.id)
    if last is None:
        return None
    return undo_offer(project_settings(project), last.id, last.choice, last.created_at, now)


def figures_given(
    settings: ProjectSettings, *, given: Any, left: Any, sitting: Any, gold: Any = None
) -> dict[str, Any]:
    """The vote page's counters from their raw values."""
    votes = int(sitting or 0)
    return {
        "votes_given": int(given or 0),
        "pairs_left": int(left or 0),
        "session_votes": votes,
        "session_target": settings.session_target,
        "target_met": 0 < settings.session_target <= votes,
        "gold": gold,
    }


def counters(project_id: Any, annotator_id: Any, now: Any, pairs_left: Any) -> Any:
    """Votes given, pairs left (`pairs_left`: the scheduler's expression) and the session's votes
    in one statement; values or bound parameters."""
    given = (
        select(func.count())
        .select_from(Vote)
        .where(Vote.project_id == project_id, Vote.annotator_id == annotator_id)
        .scalar_subquery()
    )
    sitting = sitting_votes(project_id=project_id, annotator_id=annotator_id, now=now)
    return select(given, pairs_left, sitting)


def _figures(session: Session, project: Project, user: User, now: dt.datetime) -> dict[str, Any]:
    """Votes given, pairs left, this session's votes against the lead's target, and the gold
    record where revealed. The counters are read in one statement."""
    settings = project_settings(project)
    left = pairs.pairs_left_count(session, project=project, annotator=user)
    given, left, sitting = session.execute(counters(project.id, user.id, now, left)).one()
    gold = (
        gold_record(session, project_id=project.id, annotator_id=user.id)
        if settings.reveal_gold
        else None
    )
    return figures_given(settings, given=given, left=left, sitting=sitting, gold=gold)


def instructions(settings: ProjectSettings, *, min_view: bool = True) -> dict[str, Any]:
    """The project's question and guidelines, and how long the controls stay inert."""
    return {
        "question": settings.question,
        "guidelines": _guidelines(settings.guidelines),
        "min_view_ms": settings.min_view_ms if min_view else 0,
    }


@lru_cache(maxsize=64)
def _guidelines(source: str) -> Markup:
    return render_markdown(source)


def _instructions(project: Project, *, min_view: bool = True) -> dict[str, Any]:
    return instructions(project_settings(project), min_view=min_view)


def _vote_context(
    session: Session,
    project: Project,
    user: User,
    *,
    notice: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    now = utcnow()
    busy = False
    try:
        served = pairs.next_pair(session, project=project, annotator=user, now=now)
    except pairs.PairsBusy:
        served, busy = None, True
    pair = None
    preload: list[str] = []
    if served is not None:
        pair = served_pair(served, user.id)
        peek = pairs.peek_candidate(
            session, project=project, annotator=user, exclude=[served.pair_id], now=now
        )
        if peek is not None:
            # The URLs the next pair will be served with, so the preloaded copies are used.
            shas = dict(
                session.execute(
                    select(Image.id, Image.sha256).where(
                        Image.id.in_((peek.image_a_id, peek.image_b_id))
                    )
                ).all()
            )
            preload = [
                served_image_url(i, shas.get(i, ""), user.id)
                for i in (peek.image_a_id, peek.image_b_id)
            ]
    # Only when nothing is left: say whether new pairs are on their way.
    generating = None if served is not None or busy else _generating(session, project.id, now)
    return vote_context(
        project=project,
        settings=project_settings(project),
        pair=pair,
        preload=preload,
        undo=_undo(session, project, user, now),
        notice=notice,
        error=error,
        busy=busy,
        generating=generating,
        figures=_figures(session, project, user, now),
    )


def served_pair(served: pairs.ServedPair, annotator_id: int) -> dict[str, Any]:
    """A served pair as the vote page shows it."""
    return {
        "pair_id": served.pair_id,
        "prompt": served.prompt,
        "left": _side(served.left_image_id, served.left_sha256, annotator_id),
        "right": _side(served.right_image_id, served.right_sha256, annotator_id),
    }


def vote_context(
    *,
    project: Any,
    settings: ProjectSettings,
    pair: dict[str, Any] | None,
    preload: list[str],
    undo: dict[str, Any] | None,
    notice: str | None,
    error: str | None,
    busy: bool,
    generating: dict[str, Any] | None,
    figures: dict[str, Any],
) -> dict[str, Any]:
    """What the vote area shows (the JSON API's fast lane renders it too)."""
    return {
        "project": project,
        "mode": "vote",
        **instructions(settings),
        "pair": pair,
        "action": f"/projects/{project.id}/vote",
        "idempotency_key": uuid.uuid4().hex,
        "preload": preload,
        "undo": undo,
        "notice": notice,
        "error": error,
        "busy": busy,
        "generating": generating,
        **figures,
    }


def _generating(session: Session, project_id: int, now: dt.datetime) -> dict[str, Any] | None:
    """The project's generate job that will bring new pairs (running first, else the oldest
    queued), with a rough time left from its progress so far; None when there is none."""
    row = session.execute(
        select(Job.status, Job.progress, Job.started_at)
        .where(
            Job.project_id == project_id,
            Job.kind == "generate",
            Job.status.in_(("queued", "running")),
        )
        .order_by((Job.status == "running").desc(), Job.created_at, Job.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    status, progress, started_at = row
    minutes_left = None
    if status == "running" and started_at is not None and 0.05 <= progress < 1:
        elapsed = (now - started_at).total_seconds()
        minutes_left = max(1, round(elapsed * (1 - progress) / progress / 60))
    return {"status": status, "percent": round(100 * progress), "minutes_left": minutes_left}


def _show(request: Request, ctx: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    template = "partials/vote_area.html" if is_htmx(request) else "pages/vote.html"
    return render(request, template, ctx, status_code=status_code)


@router.get("/projects/{project_id}/vote", response_class=HTMLResponse)
def vote_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=False)
    return _show(request, _vote_context(session, project, user))


def _latency(raw: str) -> int | None:
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()):  # str.isdigit() accepts '²', int() does not
        return None
    return min(int(raw), MAX_LATENCY_MS)


@router.post("/projects/{project_id}/vote", response_class=HTMLResponse)
def cast_vote(
    project_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    pair_id: int = Form(),
    left_image_id: str = Form(max_length=32),
    choice: str = Form(max_length=16),
    latency_ms: str = Form(default="", max_length=12),
    idempotency_key: str = Form(default="", max_length=100),
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=False)
    try:
        vote, _ = service.record_vote(
            session,
            pair_id=pair_id,
            annotator=user,
            choice=choice,
            left_image_id=left_image_id,
            latency_ms=_latency(latency_ms),
            idempotency_key=idempotency_key or None,
        )
    except service.VoteError as exc:
        ctx = _vote_context(session, project, user, error=exc.detail)
        response = _show(request, ctx, status_code=exc.status)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return _show(request, _vote_context(session, project, user, notice=saved_notice(vote.choice)))


def saved_notice(choice: str) -> str:
    return f"Saved: {Choice(choice).label}."


@router.get("/projects/{project_id}/vote/change/{vote_id}", response_class=HTMLResponse)
def change_form(
    project_id: int, vote_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=False)
    try:
        vote = service.changeable_vote(session, vote_id=vote_id, annotator=user)
    except service.VoteError as exc:
        return _show(request, _vote_context(session, project, user, error=exc.detail), exc.status)
    pair = session.get(Pair, vote.pair_id)
    assert pair is not None
    right = pair.image_b_id if vote.left_image_id == pair.image_a_id else pair.image_a_id
    ctx = {
        "project": project,
        "mode": "change",
        # The pair was looked at when the vote was cast: changing it needs no new wait.
        **_instructions(project, min_view=False),
        "pair": {
            "pair_id": pair.id,
            "prompt": session.scalar(select(Prompt.text).where(Prompt.id == pair.prompt_id)),
            # The same sides as when the vote was cast.
            "left": _side(vote.left_image_id),
            "right": _side(right),
        },
        "previous": Choice(vote.choice).label,
        "action": f"/projects/{project.id}/vote/change/{vote.id}",
        "preload": [],
        "undo": None,
        "notice": None,
        "error": None,
        **_figures(session, project, user, utcnow()),
    }
    return _show(request, ctx)


@router.post("/projects/{project_id}/vote/change/{vote_id}", response_class=HTMLResponse)
def change_vote(
    project_id: int,
    vote_id: int,
    request: Request,
    session: SessionDep,
    user: PageUser,
    choice: str = Form(max_length=16),
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=False)
    try:
        vote = service.change_last_vote(session, vote_id=vote_id, annotator=user, choice=choice)
    except service.VoteError as exc:
        return _show(request, _vote_context(session, project, user, error=exc.detail), exc.status)
    notice = f"Changed your last vote to: {Choice(vote.choice).label}."
    return _show(request, _vote_context(session, project, user, notice=notice))


@router.get("/projects/{project_id}/me", response_class=HTMLResponse)
def annotator_page(
    project_id: int, request: Request, session: SessionDep, user: PageUser
) -> HTMLResponse:
    project = get_project_for(session, user, project_id, lead=False)
    stats = service.annotator_stats(session, project=project, annotator=user)
    return render(request, "pages/annotator.html", {"project": project, "stats": stats})
