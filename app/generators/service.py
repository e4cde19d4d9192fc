"""Registering and listing model versions."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Invalid
from app.generators.models import ModelVersion
from app.generators.schemas import ModelCreate, ModelPublic
from app.generators.sources import SourceError, resolve_sources
from app.projects.models import Project
from app.ratings.models import RewardModel


class ModelNameTaken(Conflict):
    pass


class UnknownParent(Invalid):
    pass


def register_model(session: Session, *, project: Project, data: ModelCreate) -> ModelVersion:
    taken = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.project_id == project.id, ModelVersion.name == data.name
        )
    )
    if taken is not None:
        raise ModelNameTaken(f"a model named {data.name!r} already exists in this project")
    if data.parent_id is not None:
        parent = session.get(ModelVersion, data.parent_id)
        if parent is None or parent.project_id != project.id:
            raise UnknownParent(f"parent_id {data.parent_id} is not a model of this project")
    if data.params.reward_model_id is not None:
        reward = session.get(RewardModel, data.params.reward_model_id)
        if reward is None or reward.project_id != project.id:
            raise Invalid(
                f"params.reward_model_id {data.params.reward_model_id} is not a reward model "
                "of this project"
            )
    try:
        base, adapter = resolve_sources(
            session, project_id=project.id, base=data.base, adapter=data.adapter
        )
    except SourceError as exc:
        raise Invalid(str(exc)) from None
    model = ModelVersion(
        project_id=project.id,
        name=data.name,
        base=base,
        adapter=adapter,
        params=data.params.stored(),
        parent_id=data.parent_id,
        status="arena",
        evaluation={},
    )
    session.add(model)
    session.flush()
    return model


def to_public(model: ModelVersion) -> ModelPublic:
    return ModelPublic(
        id=model.id,
        project_id=model.project_id,
        name=model.name,
        base=model.base,
        adapter=model.adapter,
        params=model.params,
        parent_id=model.parent_id,
        produced_by_job_id=model.produced_by_job_id,
        status=model.status,
        evaluation=model.evaluation or {},
    )


def list_models(session: Session, project_id: int) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project_id)
            .order_by(ModelVersion.id)
        )
    )
