"""All HTML routers in one place, so the app factory includes them once."""

from fastapi import APIRouter

from app.dashboard.pages import router as dashboard_pages
from app.jobs.pages import router as jobs_pages
from app.projects.pages import router as projects_pages
from app.users.account_pages import router as account_pages
from app.users.invites import router as invites_pages
from app.users.pages import router as users_pages
from app.votes.pages import router as votes_pages

router = APIRouter()
for sub in (
    users_pages,
    account_pages,
    invites_pages,
    projects_pages,
    dashboard_pages,
    jobs_pages,
    votes_pages,
):
    router.include_router(sub)
