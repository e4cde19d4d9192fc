"""What the lead's dashboard shows, as plain data: counts, vote rates, quality, lineage."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import image_url
from app.jobs.models import Job
from app.pairs.models import Pair
from app.projects.models import Membership, Project, Prompt
from app.projects.service import project_settings
from app.ratings import service as ratings
from app.ratings.models import RewardModel
from app.users.models import User
from app.votes.models import Vote


def _count(session: Session, stmt: Any) -> int:
    return int(session.scalar(stmt) or 0)


def overview(session: Session, project_id: int) -> dict[str, Any]:
    """Headline counts: prompts per split, models, images, pairs, votes, jobs running."""
    splits = dict(
        session.execute(
            select(Prompt.split, func.count())
            .where(Prompt.project_id == project_id)
            .group_by(Prompt.split)
        ).all()
    )
    pairs = dict(
        session.execute(
            select(Pair.purpose, func.count())
            .where(Pair.project_id == project_id)
            .group_by(Pair.purpose)
        ).all()
    )
    complete = _count(
        session,
        select(func.count())
        .select_from(Pair)
        .where(Pair.project_id == project_id, Pair.vote_count >= Pair.votes_wanted),
    )
    return {
        "prompts": sum(splits.values()),
        "prompts_by_split": {s: int(splits.get(s, 0)) for s in ("train", "val", "test")},
        "models": _count(
            session,
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.project_id == project_id),
        ),
        "images": _count(
            session, select(func.count()).select_from(Image).where(Image.project_id == project_id)
        ),
        "pairs": sum(pairs.values()),
        "pairs_by_purpose": {p: int(pairs.get(p, 0)) for p in ("eval", "train")},
        "pairs_complete": complete,
        "votes": _count(
            session, select(func.count()).select_from(Vote).where(Vote.project_id == project_id)
        ),
        "jobs_active": _count(
            session,
            select(func.count())
            .select_from(Job)
            .where(Job.project_id == project_id, Job.status.in_(("queued", "running"))),
        ),
    }


def _hour(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def votes_per_hour(
    session: Session, project_id: int, *, hours: int = 48, now: dt.datetime | None = None
) -> list[tuple[dt.datetime, int]]:
    """Votes cast in each of the last `hours` hours (UTC, oldest first, empty hours as 0)."""
    end = _hour(now or utcnow())
    start = end - dt.timedelta(hours=hours - 1)
    # Bucketed here rather than in SQL: the hour-truncation functions differ between SQLite and
    # Postgres, and a window of hours holds few enough rows.
    counts: dict[dt.datetime, int] = {}
    for (created,) in session.execute(
        select(Vote.created_at).where(Vote.project_id == project_id, Vote.created_at >= start)
    ):
        bucket = _hour(created)
        counts[bucket] = counts.get(bucket, 0) + 1
    return [
        (start + dt.timedelta(hours=i), counts.get(start + dt.timedelta(hours=i), 0))
        for i in range(hours)
    ]


@dataclass
class AnnotatorRow:
    user_id: int
    email: str
    is_active: bool
    member: bool
    votes: int = 0
    last_vote_at: dt.datetime | None = None
    votes_last_hour: int = 0


def votes_per_annotator(
    session: Session, project_id: int, *, now: dt.datetime | None = None
) -> list[AnnotatorRow]:
    """Every annotator member and everyone who voted, most votes first."""
    hour_ago = (now or utcnow()) - dt.timedelta(hours=1)
    rows: dict[int, AnnotatorRow] = {}
    for user, member_active in session.execute(
        select(User, Membership.is_active)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.project_id == project_id, Membership.role == "annotator")
    ):
        active = user.is_active and member_active
        rows[user.id] = AnnotatorRow(user.id, user.email, active, member=True)
    recent = func.sum(case((Vote.created_at >= hour_ago, 1), else_=0))
    for user_id, email, active, votes, last, last_hour in session.execute(
        select(
            Vote.annotator_id,
            User.email,
            User.is_active,
            func.count(),
            func.max(Vote.created_at),
            recent,
        )
        .join(User, User.id == Vote.annotator_id)
        .where(Vote.project_id == project_id)
        .group_by(Vote.annotator_id, User.email, User.is_active)
    ):
        row = rows.setdefault(user_id, AnnotatorRow(user_id, email, active, member=False))
        row.votes, row.last_vote_at, row.votes_last_hour = int(votes), last, int(last_hour or 0)
    return sorted(rows.values(), key=lambda r: (-r.votes, r.email))


def annotator_quality(session: Session, project_id: int) -> dict[str, Any]:
    """The latest rating fit's annotator table, with emails; empty before the first fit."""
    fit = ratings.latest_fit(session, project_id)
    if fit is None:
        return {"fit_id": None, "created_at": None, "rows": []}
    ids = [int(a["annotator_id"]) for a in fit.annotators if "annotator_id" in a]
    emails = dict(session.execute(select(User.id, User.email).where(User.id.in_(ids))).all())
    project = session.get(Project, project_id)
    settings = project_settings(project) if project is not None else None
    by_hand = {}
    if settings is not None:
        by_hand = {a: "exclude" for a in settings.excluded_annotators}
        by_hand.update({a: "include" for a in settings.included_annotators})
    rows = []
    for entry in fit.annotators:
        row = dict(entry)
        annotator_id = int(row["annotator_id"])
        row["email"] = emails.get(annotator_id, f"user {annotator_id}")
        row["use"] = by_hand.get(annotator_id, "auto")
        rows.append(row)
    rows.sort(key=lambda r: (-len(r.get("flags") or []), -(r.get("votes") or 0)))
    return {"fit_id": fit.id, "created_at": fit.created_at, "rows": rows}


def leaderboard(session: Session, project_id: int) -> list[dict[str, Any]]:
    return ratings.leaderboard(session, project_id)


@dataclass
class LineageNode:
    id: int
    name: str
    base: str
    adapter: str | None
    status: str
    parent_id: int | None
    produced_by_job_id: int | None
    evaluation: dict[str, Any]
    depth: int = 0
    children: list[LineageNode] = field(default_factory=list)


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def evaluation_summary(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The win-rates in a model's evaluation, each with its interval when one is recorded.

    A win-rate is any numeric entry whose key contains "win_rate" (at the top level or one level
    down, e.g. {"reward": {"win_rate": ...}}); its interval is `<key>_ci` / `ci` as [low, high]
    or `ci_low` / `ci_high` beside it.
    """
    found: list[dict[str, Any]] = []

    def scan(section: dict[str, Any], prefix: str) -> None:
        for key, value in section.items():
            if isinstance(value, dict) and not prefix:
                scan(value, f"{key} ")
                continue
            rate = _as_float(value)
            if rate is None or "win_rate" not in key:
                continue
            interval = section.get(f"{key}_ci") or section.get("ci")
            low = high = None
            if isinstance(interval, (list, tuple)) and len(interval) == 2:
                low, high = _as_float(interval[0]), _as_float(interval[1])
            elif "ci_low" in section:
                low, high = _as_float(section.get("ci_low")), _as_float(section.get("ci_high"))
            n = section.get("n")
            found.append(
                {
                    "label": (prefix + key).replace("_", " "),
                    "value": rate,
                    "low": low,
                    "high": high,
                    "n": n if isinstance(n, int) and not isinstance(n, bool) else None,
                }
            )

    scan(evaluation or {}, "")
    return found


def lineage(session: Session, project_id: int) -> list[LineageNode]:
    """Model versions as a forest (parent → children), flattened depth-first with depths."""
    models = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project_id)
            .order_by(ModelVersion.id)
        )
    )
    nodes = {
        m.id: LineageNode(
            m.id,
            m.name,
            m.base,
            m.adapter,
            m.status,
            m.parent_id,
            m.produced_by_job_id,
            dict(m.evaluation or {}),
        )
        for m in models
    }
    roots: list[LineageNode] = []
    for node in nodes.values():
        parent = nodes.get(node.parent_id) if node.parent_id is not None else None
        (parent.children if parent is not None else roots).append(node)
    flat: list[LineageNode] = []
    seen: set[int] = set()

    def walk(node: LineageNode, depth: int) -> None:
        if node.id in seen:  # a parent cycle cannot be created, but never loop on one
            return
        seen.add(node.id)
        node.depth = depth
        flat.append(node)
        for child in node.children:
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    return flat


def reward_models(session: Session, project_id: int) -> list[dict[str, Any]]:
    """Reward models, newest first, with their numeric metrics."""
    rows = session.scalars(
        select(RewardModel)
        .where(RewardModel.project_id == project_id)
        .order_by(RewardModel.version.desc(), RewardModel.id.desc())
    )
    out = []
    for row in rows:
        metrics = row.metrics or {}
        numeric = {k: v for k, v in metrics.items() if _as_float(v) is not None}
        out.append(
            {
                "id": row.id,
                "version": row.version,
                "backbone": row.backbone,
                "job_id": row.job_id,
                "snapshot_id": row.snapshot_id,
                "created_at": row.created_at,
                "metrics": numeric,
            }
        )
    return out


def gallery(
    session: Session,
    project_id: int,
    *,
    model_id: int | None = None,
    prompt_id: int | None = None,
    split: str | None = None,
    limit: int = 8,
    offset: int = 0,
) -> dict[str, Any]:
    """Images laid out as prompts × model versions (each cell: that model's seeds)."""
    models = [
        m
        for m in session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project_id)
            .order_by(ModelVersion.id)
        )
        if model_id is None or m.id == model_id
    ]
    with_images = (
        select(Image.prompt_id)
        .where(Image.project_id == project_id)
        .group_by(Image.prompt_id)
        .order_by(Image.prompt_id)
    )
    if model_id is not None:
        with_images = with_images.where(Image.model_version_id == model_id)
    if prompt_id is not None:
        with_images = with_images.where(Image.prompt_id == prompt_id)
    if split is not None:
        with_images = with_images.join(Prompt, Prompt.id == Image.prompt_id).where(
            Prompt.split == split
        )
    total = _count(session, select(func.count()).select_from(with_images.subquery()))
    prompt_ids = list(session.scalars(with_images.limit(limit).offset(offset)))
    prompts = {p.id: p for p in session.scalars(select(Prompt).where(Prompt.id.in_(prompt_ids)))}
    cells: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for image in session.scalars(
        select(Image)
        .where(Image.prompt_id.in_(prompt_ids), Image.project_id == project_id)
        .order_by(Image.seed, Image.id)
    ):
        cells.setdefault((image.prompt_id, image.model_version_id), []).append(
            {"id": image.id, "url": image_url(image.id), "seed": image.seed}
        )
    rows = [
        {
            "prompt_id": pid,
            "text": prompts[pid].text,
            "split": prompts[pid].split,
            "cells": [cells.get((pid, m.id), []) for m in models],
        }
        for pid in prompt_ids
        if pid in prompts
    ]
    return {
        "models": [{"id": m.id, "name": m.name} for m in models],
        "rows": rows,
        "total": total,
        "limit": limit,
        "offset": offset,
    }
