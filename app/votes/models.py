"""Votes: one per (pair, annotator)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("pair_id", "annotator_id"),
        UniqueConstraint("annotator_id", "idempotency_key"),
        Index("ix_votes_project_created", "project_id", "created_at"),
        # The rate limit's count of an annotator's last votes in a project (migration 0007).
        Index("ix_votes_annotator_recent", "annotator_id", "project_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # The image actually shown on the left, so position bias can be measured.
    left_image_id: Mapped[str] = mapped_column(String(32))
    choice: Mapped[str] = mapped_column(String(16))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
