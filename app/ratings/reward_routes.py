"""JSON API for a project's reward models (trained by `train_reward` jobs); leads only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for, led_row
from app.ratings.models import RewardModel

router = APIRouter(prefix="/api/v1", tags=["reward models"])


def reward_model_public(row: RewardModel) -> dict[str, Any]:
    return {
        "id": row.id,
        "project_id": row.project_id,
        "version": row.version,
        "backbone": row.backbone,
        "snapshot_id": row.snapshot_id,
        "job_id": row.job_id,
        "created_at": row.created_at.isoformat(),
        "metrics": row.metrics,
    }


@router.get("/projects/{project_id}/reward-models")
def list_reward_models(
    project_id: int, session: SessionDep, user: CurrentUser
) -> list[dict[str, Any]]:
    """The project's reward models, newest version first, with their validation metrics."""
    get_project_for(session, user, project_id, lead=True)
    rows = session.scalars(
        select(RewardModel)
        .where(RewardModel.project_id == project_id)
        .order_by(RewardModel.version.desc(), RewardModel.id.desc())
    )
    return [reward_model_public(row) for row in rows]


@router.get("/reward-models/{reward_model_id}")
def get_reward_model(
    reward_model_id: int, session: SessionDep, user: CurrentUser
) -> dict[str, Any]:
    row = led_row(session, user, RewardModel, reward_model_id, "reward model")
    return reward_model_public(row)
