"""`evaluate`: child vs parent on held-out prompts, same seeds, judged by a reward model.

Seeds come from the evaluation range of `worker.seeds` (per prompt, never used for training
images) unless the job names `seeds`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.generators.models import ModelVersion
from app.images.models import Image
from app.projects.models import Prompt
from app.ratings.models import RewardModel
from worker.evaluation import cluster_bootstrap_ci, paired_outcomes, win_rate_interval
from worker.runner import JobCancelled, JobContext, handler
from worker.seeds import seeds_by_prompt
from worker.tasks.generate import generate_images, load_models


def _reward_model(ctx: JobContext) -> RewardModel:
    with ctx.session() as session:
        rm_id = ctx.params.get("reward_model_id")
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


@handler("evaluate")
def evaluate(ctx: JobContext) -> dict[str, Any]:
    from worker.tasks.reward import score_model_images

    params = ctx.params
    parent, child = load_models(ctx, params["model_ids"])
    with ctx.session() as session:
        stmt = select(Prompt.id, Prompt.text).where(Prompt.project_id == ctx.project_id)
        if params["split"] != "all":
            stmt = stmt.where(Prompt.split == params["split"])
        prompts = [(pid, text) for pid, text in session.execute(stmt.order_by(Prompt.id))]
    if not prompts:
        raise ValueError(f"no prompts in split {params['split']!r} to evaluate on")
    seeds = seeds_by_prompt(
        [pid for pid, _ in prompts], params["images_per_prompt"], "eval", params.get("seeds")
    )
    generate_images(ctx, [parent, child], prompts, seeds, progress=(0.0, 0.7))
    if ctx.cancel_requested:
        raise JobCancelled()
    reward_row = _reward_model(ctx)
    with ctx.session() as session:
        candidates = session.scalars(
            select(Image).where(
                Image.model_version_id.in_([parent.id, child.id]),
                Image.prompt_id.in_([pid for pid, _ in prompts]),
            )
        )
        images = [img for img in candidates if img.seed in seeds[img.prompt_id]]
        scores = score_model_images(session, ctx.store, reward_row, images)
    by_key = {(img.model_version_id, img.prompt_id, img.seed): scores[img.id] for img in images}
    keys = [(pid, seed) for pid, _ in prompts for seed in seeds[pid]]
    child_scores = np.array([by_key[(child.id, pid, seed)] for pid, seed in keys])  # (N,)
    parent_scores = np.array([by_key[(parent.id, pid, seed)] for pid, seed in keys])  # (N,)
    # A reward model's score has no perceptual scale to set a tolerance on: only exact ties tie.
    win = win_rate_interval(paired_outcomes(child_scores, parent_scores, tol=0.0))
    # Seeds of one prompt are not independent comparisons: the interval resamples prompts.
    cluster_low, cluster_high = cluster_bootstrap_ci(
        paired_outcomes(child_scores, parent_scores, tol=0.0), [pid for pid, _ in keys]
    )
    evaluation = {
        "vs_parent": {
            **win.as_dict(),
            "cluster_ci_low": cluster_low,
            "cluster_ci_high": cluster_high,
            "parent_id": parent.id,
            "reward_model_id": reward_row.id,
            "split": params["split"],
            "seeds": params.get("seeds"),  # None: per-prompt evaluation seeds
            "images_per_prompt": len(keys) // len(prompts),
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
