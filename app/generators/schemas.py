"""Bodies for registering model versions (generators)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    base: str = Field(min_length=1, max_length=500, description='hub id, local path, or "toy"')
    adapter: str | None = Field(default=None, max_length=1000)
    params: GenerationParams = Field(default_factory=GenerationParams)
    parent_id: int | None = None


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
