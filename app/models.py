"""Imports every table so that `Base.metadata` is complete (Alembic, tests)."""

from app.audit.models import AuditEvent
from app.core.db import Base
from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.models import Job, WorkerHeartbeat
from app.pairs.models import Pair, Reservation
from app.projects.models import Membership, Project, Prompt
from app.ratings.models import (
    Rating,
    RatingFit,
    RewardImageScore,
    RewardModel,
    Snapshot,
    SnapshotVote,
)
from app.users.models import ApiToken, LoginAttempt, User, UserSession
from app.votes.models import Vote

__all__ = [
    "ApiToken",
    "AuditEvent",
    "Base",
    "Image",
    "Job",
    "LoginAttempt",
    "Membership",
    "ModelVersion",
    "Pair",
    "Project",
    "Prompt",
    "Rating",
    "RatingFit",
    "Reservation",
    "RewardImageScore",
    "RewardModel",
    "Snapshot",
    "SnapshotVote",
    "User",
    "UserSession",
    "Vote",
    "WorkerHeartbeat",
]
