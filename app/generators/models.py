"""Model versions: the generators that compete in a project's arena."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow

STATUSES = ("candidate", "arena", "retired")
# Whether the model loads and samples: `pending` until its check job has run. Models the
# platform makes itself (training children, the toy demo, imported names) start `ready`.
CHECK_STATUSES = ("pending", "ready", "failed")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    # A hub id, a local path, or "toy" / "toy-v0" for the shipped toy models.
    base: Mapped[str] = mapped_column(String(500))
    adapter: Mapped[str | None] = mapped_column(String(1000))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    produced_by_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL")
    )
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id", ondelete="SET NULL"))
    status: Mapped[str] = mapped_column(String(16), default="arena")
    # Evaluation results against the parent (win-rate and interval), filled by evaluate jobs.
    evaluation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    check_status: Mapped[str] = mapped_column(String(16), default="ready", server_default="ready")
    # Why the check failed (the loader's or sampler's own message), shown on the models page.
    check_error: Mapped[str | None] = mapped_column(Text)
    # Archived: kept for history and exports, left out of new jobs and new pairs.
    archived_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
