"""`evaluate`: child vs parent on held-out prompts, same seeds, judged by a reward model."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.kinds import EvaluateParams
from app.projects.models import Prompt
from app.ratings.models import RewardModel
from worker.evaluation import paired_outcomes, win_rate_interval
from worker.runner import JobCancelled, ProjectJobContext
from worker.tasks.generate import generate_images, load_models


def _reward_model(ctx: ProjectJobContext[EvaluateParams]) -> RewardModel:
    with ctx.session() as session:
        rm_id = ctx.params.reward_model_id
        row = (
            session.get(RewardModel, rm_id)
            if rm_id
            else session.scalar(
                select(RewardModel)
                .where(RewardModel.project_id == ctx.project_id)
                .order_by(RewardModel.version.desc())
                .limit(1)
            )
        )
    if row is None:
        raise ValueError("no reward model to judge with; run train_reward first")
    return row


def evaluate(ctx: ProjectJobContext[EvaluateParams]) -> dict[str, Any]:
    from worker.tasks.reward import score_model_images

    params = ctx.params
    parent, child = load_models(ctx, params.model_ids)
    seeds = list(params.seeds)
    with ctx.session() as session:
        stmt = select(Prompt.id, Prompt.text).where(Prompt.project_id == ctx.project_id)
        if params.split != "all":
            stmt = stmt.where(Prompt.split == params.split)
        prompts = [(pid, text) for pid, text in session.execute(stmt.order_by(Prompt.id))]
    if not prompts:
        raise ValueError(f"no prompts in split {params.split!r} to evaluate on")
    generate_images(ctx, [parent, child], prompts, seeds, progress=(0.0, 0.7))
    if ctx.cancel_requested:
        raise JobCancelled()
    reward_row = _reward_model(ctx)
    with ctx.session() as session:
        images = list(
            session.scalars(
                select(Image).where(
                    Image.model_version_id.in_([parent.id, child.id]),
                    Image.prompt_id.in_([pid for pid, _ in prompts]),
                    Image.seed.in_(seeds),
                )
            )
        )
        scores = score_model_images(session, ctx.store, reward_row, images)
    by_key = {(img.model_version_id, img.prompt_id, img.seed): scores[img.id] for img in images}
    keys = [(pid, seed) for pid, _ in prompts for seed in seeds]
    child_scores = np.array([by_key[(child.id, pid, seed)] for pid, seed in keys])  # (N,)
    parent_scores = np.array([by_key[(parent.id, pid, seed)] for pid, seed in keys])  # (N,)
    win = win_rate_interval(paired_outcomes(child_scores, parent_scores))
    evaluation = {
        "vs_parent": {
            **win.as_dict(),
            "parent_id": parent.id,
            "reward_model_id": reward_row.id,
            "split": params.split,
            "seeds": seeds,
            "mean_reward_child": float(child_scores.mean()),
            "mean_reward_parent": float(parent_scores.mean()),
            "job_id": ctx.job_id,
        }
    }
    with ctx.session() as session:
        row = session.get(ModelVersion, child.id)
        assert row is not None
        row.evaluation = {**(row.evaluation or {}), **evaluation}
    ctx.progress(1.0, f"child wins {win.rate:.0%} [{win.ci_low:.0%}, {win.ci_high:.0%}]")
    return evaluation["vs_parent"]
