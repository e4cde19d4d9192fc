"""Leaderboards and annotator quality from a project's votes (the maths: app/ratings/
bradley_terry.py, quality.py and leaderboard.py)."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.models import Job
from app.pairs.models import Pair
from app.ratings.models import Rating, RatingFit
from app.votes.models import Vote
from app.votes.vocabulary import PREFERENCES


@dataclass(frozen=True)
class EvalVote:
    """One evaluation vote as the rating fit sees it: which model was shown where, and the pick."""

    left_model: int
    right_model: int
    choice: str  # left | right | tie | both_bad


def evaluation_votes(
    session: Session, project_id: int, *, exclude_annotators: Collection[int] = ()
) -> list[EvalVote]:
    """Preference votes on evaluation pairs (different models); gold pairs, skips and the votes
    of `exclude_annotators` left out."""
    left = aliased(Image)
    right_a = aliased(Image)
    right_b = aliased(Image)
    rows = session.execute(
        select(
            Vote.left_image_id,
            Vote.choice,
            left.model_version_id,
            right_a.model_version_id,
            right_b.model_version_id,
            Pair.image_a_id,
        )
        .join(Pair, Pair.id == Vote.pair_id)
        .join(left, left.id == Vote.left_image_id)
        .join(right_a, right_a.id == Pair.image_a_id)
        .join(right_b, right_b.id == Pair.image_b_id)
        .where(
            Vote.project_id == project_id,
            Pair.purpose == "eval",
            Pair.is_gold.is_(False),
            Vote.choice.in_(PREFERENCES),
            Vote.annotator_id.not_in(list(exclude_annotators)),
        )
    )
    votes: list[EvalVote] = []
    for left_id, choice, left_model, model_a, model_b, image_a in rows:
        right_model = model_b if left_id == image_a else model_a
        if left_model is None or right_model is None or left_model == right_model:
            continue
        votes.append(EvalVote(left_model, right_model, choice))
    return votes


def latest_fit(session: Session, project_id: int) -> RatingFit | None:
    return session.scalar(
        select(RatingFit)
        .where(RatingFit.project_id == project_id)
        .order_by(RatingFit.created_at.desc(), RatingFit.id.desc())
        .limit(1)
    )


def leaderboard(session: Session, project_id: int) -> list[dict[str, Any]]:
    """The latest fit's rows, best first; empty before the first fit."""
    fit = latest_fit(session, project_id)
    if fit is None:
        return []
    rows = session.execute(
        select(Rating, ModelVersion.name, ModelVersion.parent_id)
        .join(ModelVersion, ModelVersion.id == Rating.model_version_id)
        .where(Rating.fit_id == fit.id)
        .order_by(Rating.rank, Rating.rating.desc())
    )
    return [
        {
            "model_id": rating.model_version_id,
            "name": name,
            "parent_id": parent_id,
            "rating": round(rating.rating, 2),
            "ci_low": round(rating.ci_low, 2),
            "ci_high": round(rating.ci_high, 2),
            "rank": rating.rank,
            "votes": rating.votes,
        }
        for rating, name, parent_id in rows
    ]


def finite_or_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def projects_needing_refresh(session: Session, *, min_age_seconds: float = 0) -> list[int]:
    """Projects with votes newer than their latest fit (itself older than min_age_seconds) and
    no fit already queued or running."""
    import datetime as dt

    from app.core.db import utcnow

    cutoff = utcnow() - dt.timedelta(seconds=min_age_seconds)
    last_fit = (
        select(RatingFit.project_id, func.max(RatingFit.created_at).label("at"))
        .group_by(RatingFit.project_id)
        .subquery()
    )
    busy = select(Job.project_id).where(
        Job.kind == "fit_ratings",
        Job.status.in_(("queued", "running")),
        Job.project_id.is_not(None),
    )
    stmt = (
        select(Vote.project_id)
        .outerjoin(last_fit, last_fit.c.project_id == Vote.project_id)
        .where(
            Vote.project_id.not_in(busy),
            last_fit.c.at.is_(None)
            | and_(Vote.created_at > last_fit.c.at, last_fit.c.at < cutoff),
        )
        .distinct()
    )
    return sorted(session.scalars(stmt))


def schedule_rating_refresh(
    session: Session, *, max_attempts: int = 3, min_age_seconds: float = 60
) -> list[int]:
    """Queue a fit_ratings job for every project whose votes changed since its last fit."""
    from app.jobs.service import create_job

    project_ids = projects_needing_refresh(session, min_age_seconds=min_age_seconds)
    for project_id in project_ids:
        create_job(
            session,
            kind="fit_ratings",
            params={},
            project_id=project_id,
            created_by_id=None,
            max_attempts=max_attempts,
        )
    return project_ids
