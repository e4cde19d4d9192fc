"""The job kinds: which queue runs each, and the schema of its params (checked at creation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelftestParams(JobParams):
    """A diagnostic: proves that a worker picks jobs up, reports progress and writes media."""

    steps: int = Field(default=3, ge=1, le=1000)
    sleep: float = Field(default=0.2, ge=0, le=600, description="seconds per step")
    queue: Literal["gpu", "cpu"] = "cpu"
    # For testing the failure paths: raise a transient error on every attempt.
    fail: bool = False


class GenerateParams(JobParams):
    """Prompts × model versions × images per prompt, with deterministic seeds."""

    model_ids: list[int] = Field(min_length=1, max_length=50)
    images_per_prompt: int = Field(default=2, ge=1, le=64)
    # "all" generates for every prompt of the project.
    split: Literal["train", "val", "test", "all"] = "train"
    # Seeds used for every prompt (default 0..images_per_prompt-1): the same seeds across
    # models give paired comparisons (common random numbers).
    seeds: list[int] | None = Field(default=None, max_length=64)
    prompt_ids: list[int] | None = Field(default=None, max_length=100_000)
    make_pairs: bool = True
    batch_size: int | None = Field(default=None, ge=1, le=256)


class FitRatingsParams(JobParams):
    """Leaderboard of model versions from evaluation votes, plus annotator quality."""

    ties: Literal["half", "davidson"] = "half"
    bootstrap: int = Field(default=1000, ge=0, le=20_000)
    prior: float = Field(default=0.01, gt=0, le=100)
    seed: int = 0


# A check that needs the database (ids belong to the project...): returns error dicts.
Checker = Callable[[Session, int | None, dict[str, Any]], list[dict[str, Any]]]


def check_model_ids(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    from app.generators.models import ModelVersion

    wanted = [int(i) for i in params.get("model_ids") or []]
    if params.get("model_id") is not None:
        wanted.append(int(params["model_id"]))
    found = set(
        session.scalars(
            select(ModelVersion.id).where(
                ModelVersion.id.in_(wanted), ModelVersion.project_id == project_id
            )
        )
    )
    missing = [i for i in wanted if i not in found]
    if missing:
        return [{"loc": ["params", "model_ids"], "msg": f"not models of this project: {missing}"}]
    return []


def check_generate(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    errors = check_model_ids(session, project_id, params)
    seeds = params.get("seeds")
    if seeds is not None and len(seeds) != params["images_per_prompt"]:
        errors.append({"loc": ["params", "seeds"], "msg": "needs exactly images_per_prompt seeds"})
    if seeds is not None and any(not 0 <= s < 2**63 for s in seeds):
        errors.append({"loc": ["params", "seeds"], "msg": "seeds must be in [0, 2**63)"})
    return errors


@dataclass(frozen=True)
class JobKind:
    name: str
    params: type[JobParams]
    queue: str
    needs_project: bool = True
    check: Checker | None = None

    def queue_for(self, params: dict[str, Any]) -> str:
        return str(params.get("queue", self.queue))


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    KINDS[kind.name] = kind
    return kind


register_kind(JobKind("selftest", SelftestParams, queue="cpu", needs_project=False))
register_kind(JobKind("generate", GenerateParams, queue="gpu", check=check_generate))
register_kind(JobKind("fit_ratings", FitRatingsParams, queue="cpu"))
