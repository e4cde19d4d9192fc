"""The job kinds: which queue runs each, and the schema of its params (checked at creation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelftestParams(JobParams):
    """A diagnostic: proves that a worker picks jobs up, reports progress and writes media."""

    steps: int = Field(default=3, ge=1, le=1000)
    sleep: float = Field(default=0.2, ge=0, le=600, description="seconds per step")
    queue: Literal["gpu", "cpu"] = "cpu"
    # For testing the failure paths: raise a transient error on every attempt.
    fail: bool = False


@dataclass(frozen=True)
class JobKind:
    name: str
    params: type[JobParams]
    queue: str
    needs_project: bool = True

    def queue_for(self, params: dict[str, Any]) -> str:
        return str(params.get("queue", self.queue))


KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    KINDS[kind.name] = kind
    return kind


register_kind(JobKind("selftest", SelftestParams, queue="cpu", needs_project=False))
