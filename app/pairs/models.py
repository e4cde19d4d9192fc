"""Pairs of images of one prompt, and their reservations for annotators."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, UTCDateTime, utcnow

PURPOSES = ("eval", "train")


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (
        UniqueConstraint("image_a_id", "image_b_id"),
        # The scheduler's hot path: open pairs of a project, fewest votes first.
        Index("ix_pairs_project_open", "project_id", "is_gold", "vote_count"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    image_a_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    image_b_id: Mapped[str] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    # eval: different model versions (ratings); train: one model version, different seeds.
    purpose: Mapped[str] = mapped_column(String(8))
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    # For gold pairs: the image that must win, or "tie".
    gold_expected: Mapped[str | None] = mapped_column(String(32))
    votes_wanted: Mapped[int] = mapped_column(Integer, default=3)
    # Counts only preference votes served through reservations; kept in step by the vote service.
    vote_count: Mapped[int] = mapped_column(Integer, default=0)
    # Its prompt or a model of one of its images is archived: kept for history and exports,
    # never served nor counted open. Kept by `app.pairs.hiding` when either is (un)archived.
    hidden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Reservation(Base):
    """A pair served to an annotator: holds a slot of the pair's k votes for a few minutes."""

    __tablename__ = "reservations"
    __table_args__ = (Index("ix_reservations_pair_expires", "pair_id", "expires_at"),)

    pair_id: Mapped[int] = mapped_column(
        ForeignKey("pairs.id", ondelete="CASCADE"), primary_key=True
    )
    annotator_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    # Which image this annotator is shown on the left: random per assignment.
    left_image_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class PairCount(Base):
    """Open regular pairs of a project (not gold, not hidden, fewer votes than wanted).

    On Postgres a trigger on `pairs` keeps it in the same transaction as every change to a pair
    (migrations 0005, 0006), so the vote page's "pairs left" reads one row instead of counting the
    project's pairs; SQLite counts them.
    """

    __tablename__ = "pair_counts"

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    open_pairs: Mapped[int] = mapped_column(Integer, default=0)
