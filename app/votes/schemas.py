"""Request and response bodies of the vote API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.votes.vocabulary import MAX_LATENCY_MS, Choice


class VoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choice: Choice
    left_image_id: str = Field(min_length=1, max_length=32)
    latency_ms: int | None = Field(default=None, ge=0, le=MAX_LATENCY_MS)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=100)


class VoteAck(BaseModel):
    vote_id: int


class VoteChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    choice: Choice


class VoteChanged(BaseModel):
    vote_id: int
    choice: Choice


class GoldScore(BaseModel):
    answered: int
    correct: int
    accuracy: float | None


class AnnotatorMe(BaseModel):
    votes_today: int
    votes_total: int
    pairs_left: int
    # Only when the project reveals gold results to annotators.
    gold: GoldScore | None
