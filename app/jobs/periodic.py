"""The platform's periodic work: re-queue jobs whose worker died, refresh stale leaderboards.

Beat runs it on a worker (`prefloop.periodic`); `prefloop serve` runs it in its own process, so
the embedded platform needs no beat. Both only touch the database and the broker.
"""

from __future__ import annotations

from app.core.config import get_settings
from app.core.db import session_scope
from app.jobs.service import reap_stale_jobs
from app.ratings.service import schedule_rating_refresh


def periodic_work() -> list[int]:
    """One round; returns the ids of the jobs re-sent to the broker."""
    settings = get_settings()
    with session_scope() as session:
        resent = reap_stale_jobs(session, settings)
    with session_scope() as session:
        schedule_rating_refresh(
            session,
            max_attempts=settings.job_max_attempts,
            min_age_seconds=settings.ratings_refresh_seconds,
        )
    return resent
