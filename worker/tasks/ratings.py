"""`fit_ratings`: the project's leaderboard (Bradley–Terry with bootstrap intervals) and the
annotator-quality table, stored as one rating fit."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sqlalchemy import func, select

from app.generators.models import ModelVersion
from app.jobs.kinds import FitRatingsParams
from app.pairs.models import Pair
from app.projects.models import Project
from app.ratings.bradley_terry import DisconnectedComparisonsWarning, aggregate_comparisons
from app.ratings.leaderboard import leaderboard as build_leaderboard
from app.ratings.models import Rating, RatingFit
from app.ratings.quality import annotator_quality
from app.ratings.reliability import project_exclusion
from app.ratings.service import evaluation_votes, finite_or_none
from app.votes.models import Vote
from app.votes.vocabulary import PREFERENCES, Choice, gold_answer
from worker.runner import ProjectJobContext


def _annotator_table(ctx: ProjectJobContext[FitRatingsParams]) -> list[dict[str, Any]]:
    """Quality figures over every vote of the project (gold answers included)."""
    with ctx.session() as session:
        rows = session.execute(
            select(
                Vote.annotator_id,
                Vote.pair_id,
                Vote.left_image_id,
                Vote.choice,
                Vote.latency_ms,
                Pair.image_a_id,
                Pair.image_b_id,
                Pair.is_gold,
                Pair.gold_expected,
            )
            .join(Pair, Pair.id == Vote.pair_id)
            .where(Vote.project_id == ctx.project_id)
        ).all()
    if not rows:
        return []
    annotator, pair, left, right, choice, latency = [], [], [], [], [], []
    gold: list[str | None] = []
    for ann, pair_id, left_id, vote_choice, ms, image_a, image_b, is_gold, expected in rows:
        right_id = image_b if left_id == image_a else image_a
        annotator.append(ann)
        pair.append(pair_id)
        left.append(left_id)
        right.append(right_id)
        choice.append(vote_choice)
        latency.append(float(ms) if ms is not None else np.nan)
        if is_gold and expected:
            gold.append(gold_answer(expected, left_id, right_id).value)
        else:
            gold.append(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedComparisonsWarning)
        quality = annotator_quality(annotator, pair, left, right, choice, latency, gold)
    table = []
    for q in quality:
        table.append(
            {
                # Quality rows keep whatever ids they were given (typed object); ours are ints.
                "annotator_id": int(q.annotator),  # type: ignore[call-overload]
                "votes": q.n_votes,
                "decisive": q.n_decisive,
                "left_rate": finite_or_none(q.left_rate),
                "position_bias_p": finite_or_none(q.position_bias_pvalue),
                "skill": finite_or_none(q.skill),
                "left_habit": finite_or_none(q.left_habit),
                "agreement": finite_or_none(q.agreement),
                "gold_accuracy": finite_or_none(q.gold_accuracy),
                "gold_votes": q.n_gold,
                "median_latency_ms": finite_or_none(q.median_latency_ms),
                "flags": list(q.flags),
            }
        )
    return table


def fit_ratings(ctx: ProjectJobContext[FitRatingsParams]) -> dict[str, Any]:
    params = ctx.params
    with ctx.session() as session:
        project = session.get_one(Project, ctx.project_id)
        exclusion = project_exclusion(session, project)
        votes = evaluation_votes(
            session, ctx.project_id, exclude_annotators=exclusion.annotator_ids
        )
        used_by = dict(
            session.execute(
                select(Vote.annotator_id, func.count())
                .join(Pair, Pair.id == Vote.pair_id)
                .where(
                    Vote.project_id == ctx.project_id,
                    Pair.purpose == "eval",
                    Pair.is_gold.is_(False),
                    Vote.choice.in_(PREFERENCES),
                    Vote.annotator_id.not_in(exclusion.annotator_ids),
                )
                .group_by(Vote.annotator_id)
            ).all()
        )
        names = dict(
            session.execute(
                select(ModelVersion.id, ModelVersion.name).where(
                    ModelVersion.project_id == ctx.project_id
                )
            ).all()
        )
    ctx.progress(0.1, f"{len(votes)} evaluation votes")
    leaderboard: list[dict[str, Any]] = []
    models = sorted({v.left_model for v in votes} | {v.right_model for v in votes})
    if len(models) >= 2:
        index = {m: i for i, m in enumerate(models)}
        counts = aggregate_comparisons(
            np.array([index[v.left_model] for v in votes]),
            np.array([index[v.right_model] for v in votes]),
            np.array([Choice(v.choice).outcome for v in votes]),
            n_items=len(models),
        )
        board = build_leaderboard(
            counts,
            [names.get(m, str(m)) for m in models],
            ties=params.ties,
            n_bootstrap=params.bootstrap,
            prior=params.prior,
            seed=params.seed,
            on_progress=lambda done: ctx.progress(
                0.1 + 0.8 * done / params.bootstrap, f"bootstrap {done}"
            ),
        )
        for message in board.warnings:
            ctx.log(message)
        for row in board.rows:
            leaderboard.append(
                {
                    "model_id": models[row.index],
                    "name": row.model,
                    "score": row.score,
                    "rating": row.rating,
                    # Without bootstrap the interval collapses to the point rating.
                    "ci_low": row.rating if row.ci_low is None else row.ci_low,
                    "ci_high": row.rating if row.ci_high is None else row.ci_high,
                    "rank": row.rank,
                    "votes": row.votes,
                }
            )
        leaderboard.sort(key=lambda r: (r["rank"], -r["rating"]))
        fit = board.fit
        method: dict[str, Any] = {
            "ties": params.ties,
            "prior": params.prior,
            "bootstrap": params.bootstrap,
            "tie_param": fit.tie_param,
            "log_likelihood": fit.log_likelihood,
            "converged": fit.converged,
            "components": len(fit.components),
        }
    else:
        method = {"ties": params.ties, "note": "fewer than two rated models"}
    method["reliability"] = exclusion.record(used_by)
    if exclusion.excluded:
        ctx.log(f"left out the votes of annotators {exclusion.annotator_ids} (reliability rule)")
    annotators = _annotator_table(ctx)
    for entry in annotators:
        entry["excluded"] = list(exclusion.excluded.get(entry["annotator_id"], ()))
    with ctx.session() as session:
        fit_row = RatingFit(
            project_id=ctx.project_id,
            job_id=ctx.job_id,
            method=method,
            annotators=annotators,
            vote_count=len(votes),
        )
        session.add(fit_row)
        session.flush()
        for entry in leaderboard:
            session.add(
                Rating(
                    fit_id=fit_row.id,
                    model_version_id=entry["model_id"],
                    score=entry["score"],
                    rating=entry["rating"],
                    ci_low=entry["ci_low"],
                    ci_high=entry["ci_high"],
                    rank=entry["rank"],
                    votes=entry["votes"],
                )
            )
        fit_id = fit_row.id
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in e.items()}
        for e in leaderboard
    ]
    return {
        "fit_id": fit_id,
        "votes": len(votes),
        "leaderboard": clean,
        "annotators": annotators,
        "method": method,
    }
