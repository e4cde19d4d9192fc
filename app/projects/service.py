"""Projects, memberships and prompts (no HTTP here)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.projects.models import Membership, Project, Prompt
from app.projects.schemas import ProjectCreate, ProjectSettings, PromptIn
from app.projects.settings import dump_settings, load_settings
from app.users import service as users
from app.users.models import User


def create_project(session: Session, *, data: ProjectCreate, creator: User) -> Project:
    project = Project(
        name=data.name,
        description=data.description,
        settings=dump_settings(data.settings),
        created_by_id=creator.id,
    )
    session.add(project)
    session.flush()
    if creator.role != "admin":
        session.add(Membership(project_id=project.id, user_id=creator.id, role="lead"))
        session.flush()
    return project


def project_settings(project: Project) -> ProjectSettings:
    return load_settings(project.settings)


def add_prompts(session: Session, *, project: Project, prompts: list[PromptIn]) -> int:
    session.add_all(
        Prompt(project_id=project.id, text=p.text, split=p.split, tags=list(p.tags))
        for p in prompts
    )
    session.flush()
    return len(prompts)


def add_member(session: Session, *, project: Project, user: User, role: str) -> Membership:
    existing = session.get(Membership, (project.id, user.id))
    if existing is not None:
        return existing
    membership = Membership(project_id=project.id, user_id=user.id, role=role)
    session.add(membership)
    session.flush()
    return membership


def add_annotator(session: Session, *, project: Project, email: str) -> tuple[User, str]:
    """Create (or reuse) an annotator account, add it to the project, and issue a token."""
    user = users.get_by_email(session, email)
    if user is None:
        user = users.create_user(session, email=email, role="annotator")
    add_member(session, project=project, user=user, role="annotator")
    return user, users.issue_token(session, user, name=f"project {project.id}")


def projects_for(session: Session, user: User) -> list[Project]:
    stmt = select(Project).order_by(Project.id)
    if user.role != "admin":
        stmt = stmt.join(Membership, Membership.project_id == Project.id).where(
            Membership.user_id == user.id
        )
    return list(session.scalars(stmt))
