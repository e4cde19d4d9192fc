"""Editing, archiving and deleting prompts and projects after they were made.

Archiving keeps a thing with everything made from it (history, leaderboards, exports) and
leaves it out of new work: new jobs, new pairs, pairs served to annotators. Deleting is for
mistakes: it is refused, naming what refers to the thing, once anything does.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from app.core.db import set_archived
from app.core.errors import Conflict
from app.generators.service import (
    StillReferenced,
    counted_references,
    delete_unreferenced,
    naming_jobs,
)
from app.images.models import Image
from app.jobs.models import Job
from app.pairs.hiding import refresh_hidden
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.projects.schemas import ProjectUpdate, PromptUpdate
from app.votes.models import Vote


class ProjectArchived(Conflict):
    """New work asked of an archived project."""


def refuse_archived(project: Project) -> None:
    if project.archived_at is not None:
        raise ProjectArchived(
            f"project {project.id} ({project.name}) is archived; unarchive it to start new work"
        )


# -- prompts ----------------------------------------------------------------------------------


def prompt_references(session: Session, prompt: Prompt) -> list[str]:
    """What still refers to a prompt, in words; empty when it can be deleted or reworded."""
    found = counted_references(
        session,
        [
            ("images", Image, Image.prompt_id == prompt.id),
            ("pairs", Pair, Pair.prompt_id == prompt.id),
        ],
    )
    jobs = (
        job_id
        for job_id, params in session.execute(
            select(Job.id, Job.params).where(Job.project_id == prompt.project_id)
        )
        if prompt.id in ((params or {}).get("prompt_ids") or [])
    )
    return naming_jobs(found, jobs)


def update_prompt(session: Session, *, prompt: Prompt, data: PromptUpdate) -> dict[str, Any]:
    """Apply an edit; returns what changed, for the audit row.

    The text is fixed once images were made from it: they show the old words, and votes on
    them judged the old words (archive the prompt and add the new wording instead).
    """
    changes: dict[str, Any] = {}
    if data.text is not None and data.text != prompt.text:
        refs = prompt_references(session, prompt)
        if refs:
            raise StillReferenced(
                f"prompt {prompt.id} has {'; '.join(refs)} made from its text; archive it and "
                "add the new wording as a new prompt"
            )
        changes["text"] = [prompt.text, data.text]
        prompt.text = data.text
    if data.split is not None and data.split != prompt.split:
        changes["split"] = [prompt.split, data.split]
        prompt.split = data.split
    if data.tags is not None and data.tags != list(prompt.tags or []):
        changes["tags"] = data.tags
        prompt.tags = list(data.tags)
    set_archived(prompt, data.archived, changes)
    if "archived" in changes:
        refresh_hidden(session, project_id=prompt.project_id, prompt_id=prompt.id)
    session.flush()
    return changes


def delete_prompt(session: Session, *, prompt: Prompt) -> None:
    refusal = f"prompt {prompt.id} is still referenced by"
    delete_unreferenced(session, prompt, prompt_references(session, prompt), refusal)


def search_prompts(
    session: Session,
    *,
    project_id: int,
    query: str = "",
    split: str | None = None,
    archived: bool | None = False,
    limit: int = 50,
) -> list[Prompt]:
    """Prompts whose text or tags contain `query` (case-insensitive), newest first."""
    stmt = select(Prompt).where(Prompt.project_id == project_id)
    if split:
        stmt = stmt.where(Prompt.split == split)
    if archived is not None:
        stmt = stmt.where(
            Prompt.archived_at.is_not(None) if archived else Prompt.archived_at.is_(None)
        )
    needle = query.strip().lower()
    if not needle:
        return list(session.scalars(stmt.order_by(Prompt.id.desc()).limit(limit)))
    # Tags are a JSON list: matched in Python, so the search is the same on SQLite and Postgres.
    found: list[Prompt] = []
    for prompt in session.scalars(stmt.order_by(Prompt.id.desc())):
        if needle in prompt.text.lower() or any(needle in str(t).lower() for t in prompt.tags):
            found.append(prompt)
            if len(found) >= limit:
                break
    return found


# -- projects ---------------------------------------------------------------------------------


def project_references(session: Session, project: Project) -> list[str]:
    """The work a project holds; empty when deleting it loses nothing but its setup (prompts,
    models, members), which goes with it."""
    # Model checks are part of the setup, not work.
    return counted_references(
        session,
        [
            ("images", Image, Image.project_id == project.id),
            ("votes", Vote, Vote.project_id == project.id),
            ("jobs", Job, and_(Job.project_id == project.id, Job.kind != "check_model")),
        ],
    )


def update_project(session: Session, *, project: Project, data: ProjectUpdate) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if data.name is not None and data.name != project.name:
        changes["name"] = [project.name, data.name]
        project.name = data.name
    if data.description is not None and data.description != project.description:
        changes["description"] = True
        project.description = data.description
    set_archived(project, data.archived, changes)
    session.flush()
    return changes


def delete_project(session: Session, *, project: Project) -> None:
    refusal = f"project {project.id} ({project.name}) holds"
    delete_unreferenced(session, project, project_references(session, project), refusal)
