"""Projects, memberships and prompts (no HTTP here)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.projects.models import MEMBER_ROLES, Membership, Project, Prompt
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
    """Make `user` a member; an existing membership keeps its role and becomes active again."""
    existing = session.get(Membership, (project.id, user.id))
    if existing is not None:
        if not existing.is_active:
            existing.is_active = True
            session.flush()
        return existing
    membership = Membership(project_id=project.id, user_id=user.id, role=role)
    session.add(membership)
    session.flush()
    return membership


@dataclass
class AddedMember:
    user: User
    # True when the account existed before this call: then nothing but a membership was made.
    existing: bool
    # Only for an account created by this very call: its first API token, confined to the
    # project. An existing account's credentials belong to its owner alone.
    token: str | None = None


def add_annotator(
    session: Session, *, project: Project, email: str, actor: User | None = None
) -> AddedMember:
    """Add an annotator to the project by email.

    An unknown email gets a new account and its first token (for scripts that enrol
    annotators). A known email gets a membership only: issuing a token, invite or password
    for an account the caller did not create would hand them someone else's identity.
    """
    address = users.normalise_email(email)
    user = users.get_by_email(session, address)
    if user is not None:
        add_member(session, project=project, user=user, role="annotator")
        return AddedMember(user=user, existing=True)
    user = users.create_user(session, email=address, role="annotator")
    add_member(session, project=project, user=user, role="annotator")
    token = users.issue_token(
        session, user, name=f"project {project.id}", project_id=project.id, created_by=actor
    )
    return AddedMember(user=user, existing=False, token=token)


def projects_for(session: Session, user: User) -> list[Project]:
    stmt = select(Project).order_by(Project.id)
    if user.role != "admin":
        stmt = stmt.join(Membership, Membership.project_id == Project.id).where(
            Membership.user_id == user.id, Membership.is_active.is_(True)
        )
    scope = getattr(user, "token_project_id", None)
    if scope is not None:
        stmt = stmt.where(Project.id == scope)
    return list(session.scalars(stmt))


class MemberError(ValueError):
    """A membership change that cannot be made (the message says why)."""


def _check_lead_account(user: User, role: str) -> None:
    if role == "lead" and user.role not in ("lead", "admin"):
        raise MemberError(
            f"{user.email} has an annotator account; only an admin can make it a lead account"
        )


def _active_leads(session: Session, project: Project) -> set[int]:
    return set(
        session.scalars(
            select(Membership.user_id).where(
                Membership.project_id == project.id,
                Membership.role == "lead",
                Membership.is_active.is_(True),
            )
        )
    )


def _keep_a_lead(session: Session, project: Project, user: User, actor: User) -> None:
    # A project left without an active lead could only be run by admins again.
    if actor.role != "admin" and _active_leads(session, project) <= {user.id}:
        raise MemberError("a project keeps at least one active lead")


def member_of(session: Session, project: Project, user_id: int) -> tuple[Membership, User]:
    membership = session.get(Membership, (project.id, user_id))
    user = session.get(User, user_id)
    if membership is None or user is None:
        raise LookupError(f"user {user_id} is not a member of this project")
    return membership, user


def add_project_member(
    session: Session, *, project: Project, email: str, role: str
) -> AddedMember:
    """Add a lead or annotator by email. A new account is created without any credential (the
    caller may show it an invite link); an existing one only gains the membership."""
    if role not in MEMBER_ROLES:
        raise MemberError(f"unknown role {role!r}; expected one of {', '.join(MEMBER_ROLES)}")
    address = users.normalise_email(email)
    user = users.get_by_email(session, address)
    existing = user is not None
    if user is None:
        user = users.create_user(session, email=address, role=role)
    _check_lead_account(user, role)
    # An existing membership keeps its role: changing it is change_member's job (and rules).
    add_member(session, project=project, user=user, role=role)
    return AddedMember(user=user, existing=existing)


def change_member(
    session: Session,
    *,
    project: Project,
    user_id: int,
    actor: User,
    role: str | None = None,
    active: bool | None = None,
) -> Membership:
    membership, user = member_of(session, project, user_id)
    if role is not None and role != membership.role:
        if role not in MEMBER_ROLES:
            raise MemberError(f"unknown role {role!r}; expected one of {', '.join(MEMBER_ROLES)}")
        _check_lead_account(user, role)
        if membership.role == "lead":
            _keep_a_lead(session, project, user, actor)
        membership.role = role
    if active is not None and active != membership.is_active:
        if not active and membership.role == "lead":
            _keep_a_lead(session, project, user, actor)
        membership.is_active = active
    session.flush()
    return membership


def remove_member(session: Session, *, project: Project, user_id: int, actor: User) -> None:
    membership, user = member_of(session, project, user_id)
    if membership.role == "lead":
        _keep_a_lead(session, project, user, actor)
    session.delete(membership)
    session.flush()


def members(session: Session, project: Project) -> list[tuple[Membership, User]]:
    return [
        (m, u)
        for m, u in session.execute(
            select(Membership, User)
            .join(User, User.id == Membership.user_id)
            .where(Membership.project_id == project.id)
            .order_by(Membership.role, User.email)
        )
    ]
