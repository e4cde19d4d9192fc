"""Hidden pairs: those of an archived prompt, or with an image of an archived model.

They are kept for history and exports but never served, and not counted open (`PairCount`).
The flag `Pair.hidden` is stored, not worked out per request: the scheduler's candidate
statement and the open-pairs counter read it as a plain column, and it changes only when a
prompt or a model is archived or unarchived, in the same transaction (`refresh_hidden`).

A pair is hidden by either source, so a refresh computes the flag from both: unarchiving a model
does not show a pair whose prompt is still archived. New pairs need no refresh: building leaves
archived prompts and models out (`app.pairs.building`), a gold pair takes its source image's
state (`app.pairs.gold`), and imported pairs are closed from the start. An archived project is
left out whole by the scheduler, so its pairs keep their own flag.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import advisory_lock
from app.images.models import Image
from app.pairs.models import Pair
from app.projects.models import Prompt


def archived_source() -> Any:
    """True for a pair row whose prompt or one of whose images' models is archived (the
    definition of hidden, correlated to `pairs`)."""
    from app.generators.models import ModelVersion  # generators imports pairs

    archived_prompt = exists().where(Prompt.id == Pair.prompt_id, Prompt.archived_at.is_not(None))
    archived_model = (
        select(Image.id)
        .join(ModelVersion, ModelVersion.id == Image.model_version_id)
        .where(
            Image.id.in_([Pair.image_a_id, Pair.image_b_id]), ModelVersion.archived_at.is_not(None)
        )
        .exists()
    )
    return archived_prompt | archived_model


def refresh_hidden(
    session: Session,
    *,
    project_id: int,
    prompt_id: int | None = None,
    model_id: int | None = None,
    pair_ids: Collection[int] = (),
) -> None:
    """Set `hidden` again on the project's pairs of this prompt, with an image of this model, or
    with these ids, from the archived state now (flushed first), in the caller's transaction.

    Only pairs whose flag changes are written: on Postgres the counter's trigger moves the
    project's open count by those alone. Refreshes of one project are serialised (an advisory
    lock until the transaction ends): two archive changes at once, say a prompt archived while
    a model is unarchived, would each compute the pairs they share from a state without the
    other's change. SQLite serialises writers anyway.
    """
    scopes = []
    if prompt_id is not None:
        scopes.append(Pair.prompt_id == prompt_id)
    if model_id is not None:
        of_model = select(Image.id).where(Image.model_version_id == model_id)
        scopes += [Pair.image_a_id.in_(of_model), Pair.image_b_id.in_(of_model)]
    if pair_ids:
        scopes.append(Pair.id.in_(list(pair_ids)))
    if not scopes:
        return
    advisory_lock(session, f"pairs.hidden:{project_id}")
    session.flush()
    hidden = archived_source()
    session.execute(
        update(Pair)
        .where(Pair.project_id == project_id, Pair.hidden != hidden)
        .where(or_(*scopes))
        .values(hidden=hidden),
        execution_options={"synchronize_session": "fetch"},
    )
