"""Bodies for registering model versions (generators)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.projects.schemas import Name

# Every sampler the worker can build (worker.generation maps each to its diffusers class);
# "default" keeps the scheduler the model ships with.
SchedulerName = Literal[
    "default",
    "ddim",
    "ddpm",
    "pndm",
    "lms",
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
]
DType = Literal["auto", "float32", "float16", "bfloat16"]


class GenerationParams(BaseModel):
    """How a model version samples: stored on the version, read by the worker as registered."""

    model_config = ConfigDict(extra="forbid")

    scheduler: SchedulerName = "ddim"
    steps: int = Field(default=20, ge=1, le=500)
    guidance_scale: float = Field(default=5.0, ge=0.0, le=50.0)
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    dtype: DType = "auto"
    # Sampling policy: best-of-N, the project's reward model `reward_model_id` keeps the best of
    # `best_of` samples per image (so "parent + best-of-4" can compete in the arena).
    best_of: int = Field(default=1, ge=1, le=64)
    reward_model_id: int | None = None

    @model_validator(mode="after")
    def _policy(self) -> GenerationParams:
        if self.best_of > 1 and self.reward_model_id is None:
            raise ValueError("best_of above 1 needs the reward_model_id that chooses")
        return self

    def stored(self) -> dict[str, object]:
        """The params a model version keeps; no sampling-policy keys when sampling is plain."""
        params = self.model_dump()
        if self.best_of == 1 and self.reward_model_id is None:
            params.pop("best_of")
            params.pop("reward_model_id")
        return params


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    base: str = Field(min_length=1, max_length=500, description='hub id, local path, or "toy"')
    adapter: str | None = Field(default=None, max_length=1000)
    params: GenerationParams = Field(default_factory=GenerationParams)
    parent_id: int | None = None


class ModelUpdate(BaseModel):
    """A rename and/or (un)archiving; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    archived: bool | None = None


class ModelPublic(BaseModel):
    id: int
    project_id: int
    name: str
    base: str
    adapter: str | None
    params: dict[str, object]
    parent_id: int | None
    produced_by_job_id: int | None
    status: str
    evaluation: dict[str, object]
    # pending until its check job ran, then ready or failed (check_error says why).
    check_status: str
    check_error: str | None
    archived: bool
