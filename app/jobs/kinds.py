"""The job kinds: which queue runs each, and the schema of its params (checked at creation)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
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


class TrainRewardParams(JobParams):
    """A reward model r(prompt, image) from a snapshot of the project's votes."""

    # "toyconv" (small convnet, for the toy world), "clip" (openai/clip-vit-large-patch14) or a
    # CLIP hub id / local directory.
    backbone: str = Field(default="toyconv", min_length=1, max_length=500)
    steps: int = Field(default=1500, ge=1, le=200_000)
    batch_size: int = Field(default=64, ge=1, le=4096)
    # None: 1e-3 for toyconv, 1e-6 (PickScore) for CLIP.
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of prompts held out")
    # Prompts held out from training and validation alike: the accuracy the job reports.
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="share of prompts for test")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # soft: a tie is a (0.5, 0.5) target, as PickScore trains; drop: ties are left out.
    tie_policy: Literal["drop", "soft"] = "soft"

    @field_validator("test_fraction")
    @classmethod
    def _leaves_training_prompts(cls, value: float, info: ValidationInfo) -> float:
        if value + info.data.get("val_fraction", 0.0) >= 1:
            raise ValueError("val_fraction + test_fraction must leave prompts to train on")
        return value

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str) -> str:
        value = value.strip()
        if value in ("toyconv", "clip") or value.startswith(("/", "./")):
            return value
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value):
            raise ValueError("must be 'toyconv', 'clip', a CLIP hub id (org/name) or a path")
        return value


class ScoreImagesParams(JobParams):
    """Reward scores of model versions' images (per image, and each model's mean)."""

    reward_model_id: int | None = Field(default=None, description="default: the latest version")
    model_ids: list[int] | None = Field(default=None, min_length=1, max_length=50)
    split: Literal["train", "val", "test", "all"] = "all"
    batch_size: int = Field(default=64, ge=1, le=1024)


def check_train_reward(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    from app.ratings.snapshots import usable_vote_counts

    decisive, prompts = usable_vote_counts(session, project_id)  # type: ignore[arg-type]
    if decisive == 0 or prompts < 2:
        return [
            {
                "loc": ["params"],
                "msg": "no usable votes: training needs left/right votes on non-gold pairs of "
                f"at least two prompts (found {decisive} over {prompts} prompts)",
            }
        ]
    return []


def check_score_images(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    from app.pairs.active import latest_reward_model
    from app.ratings.models import RewardModel

    errors = check_model_ids(session, project_id, params)
    wanted = params.get("reward_model_id")
    if wanted is None:
        if latest_reward_model(session, project_id) is None:  # type: ignore[arg-type]
            errors.append({"loc": ["params"], "msg": "the project has no reward model yet"})
    else:
        row = session.get(RewardModel, wanted)
        if row is None or row.project_id != project_id:
            errors.append(
                {"loc": ["params", "reward_model_id"], "msg": "not a reward model of this project"}
            )
    return errors


register_kind(JobKind("train_reward", TrainRewardParams, queue="gpu", check=check_train_reward))
register_kind(JobKind("score_images", ScoreImagesParams, queue="gpu", check=check_score_images))


class TrainDPOParams(JobParams):
    """Diffusion-DPO on the project's votes, producing a child of `model_id`."""

    model_id: int
    # Paper convention, softplus((β/2)(Δθ − Δref)). 5000 is the paper's SD 1.5 value; the toy
    # model's errors are larger per pixel, so its useful β is smaller (see benchmarks).
    beta: float = Field(default=5000.0, gt=0)
    beta_convention: Literal["paper", "diffusers"] = "paper"
    loss: Literal["sigmoid", "hinge", "ipo", "sft"] = "sigmoid"
    steps: int = Field(default=200, ge=1, le=100_000)
    learning_rate: float = Field(default=1e-4, gt=0, le=1.0)
    lora_rank: int = Field(default=8, ge=0, le=256, description="0 = full fine-tuning")
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    empty_prompt_prob: float = Field(default=0.0, ge=0, le=1)
    tie_policy: Literal["drop", "soft"] | None = None  # default: the project's setting
    checkpoint_every: int = Field(default=50, ge=1)
    # A soft time limit: checkpoint and re-queue after this long; the next attempt resumes.
    time_limit_minutes: float | None = Field(default=None, gt=0)
    seed: int = 0
    name: str | None = Field(default=None, max_length=200)
    # After success: evaluate child vs parent and enter the child into the arena.
    closed_loop: bool = True
    arena_images_per_prompt: int = Field(default=2, ge=1, le=16)


class EvaluateParams(JobParams):
    """Parent vs child on held-out prompts with the same seeds, judged by a reward model."""

    model_ids: list[int] = Field(min_length=2, max_length=2, description="[parent, child]")
    split: Literal["train", "val", "test", "all"] = "test"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1, max_length=64)
    reward_model_id: int | None = None


def check_train_dpo(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    from app.generators.models import ModelVersion
    from app.ratings.snapshots import usable_vote_counts

    errors = check_model_ids(session, project_id, params)
    if errors:
        return errors
    model = session.get(ModelVersion, params["model_id"])
    if model is not None and model.adapter and params["lora_rank"] > 0:
        errors.append(
            {
                "loc": ["params", "lora_rank"],
                "msg": f"model {model.id} already has an adapter; train it with lora_rank 0 "
                "(full fine-tuning) to build on it",
            }
        )
    decisive, _ = usable_vote_counts(session, project_id)  # type: ignore[arg-type]
    if decisive == 0:
        errors.append({"loc": ["params"], "msg": "the project has no votes to train on yet"})
    return errors


def check_evaluate(
    session: Session, project_id: int | None, params: dict[str, Any]
) -> list[dict[str, Any]]:
    from app.ratings.models import RewardModel

    errors = check_model_ids(session, project_id, params)
    rm_id = params.get("reward_model_id")
    if rm_id is not None:
        row = session.get(RewardModel, rm_id)
        if row is None or row.project_id != project_id:
            errors.append(
                {"loc": ["params", "reward_model_id"], "msg": "not a reward model of this project"}
            )
    elif (
        session.scalar(select(RewardModel.id).where(RewardModel.project_id == project_id).limit(1))
        is None
    ):
        errors.append(
            {
                "loc": ["params", "reward_model_id"],
                "msg": "the project has no reward model yet; run train_reward first",
            }
        )
    return errors


register_kind(JobKind("train_dpo", TrainDPOParams, queue="gpu", check=check_train_dpo))
register_kind(JobKind("evaluate", EvaluateParams, queue="gpu", check=check_evaluate))
