"""JSON API: the next pair for an annotator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response

from app.audit.service import record
from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for
from app.core.storage import get_media_store
from app.images.signing import served_image_url
from app.pairs import gold, scheduler
from app.pairs.schemas import ImageRef, PairServed

router = APIRouter(prefix="/api/v1", tags=["annotators"])


def to_public(served: scheduler.ServedPair, annotator_id: int) -> PairServed:
    left, right = served.left_image_id, served.right_image_id
    return PairServed(
        pair_id=served.pair_id,
        prompt=served.prompt,
        left=ImageRef(image_id=left, url=served_image_url(left, served.left_sha256, annotator_id)),
        right=ImageRef(
            image_id=right, url=served_image_url(right, served.right_sha256, annotator_id)
        ),
        expires_at=served.expires_at,
    )


@router.get(
    "/projects/{project_id}/pairs/next",
    response_model=PairServed,
    responses={
        204: {"description": "nothing is left for this annotator"},
        503: {"description": "every open pair is being handed out right now (see Retry-After)"},
    },
)
def next_pair(project_id: int, session: SessionDep, user: CurrentUser) -> Any:
    project = get_project_for(session, user, project_id, lead=False)
    try:
        served = scheduler.next_pair(session, project=project, annotator=user)
    except scheduler.PairsBusy as exc:
        raise HTTPException(503, str(exc), {"Retry-After": "1"}) from None
    if served is None:
        return Response(status_code=204)
    return to_public(served, user.id)


@router.post("/projects/{project_id}/gold", tags=["projects"])
def create_gold(project_id: int, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    """Top the project's gold pairs up to its `gold_rate` (a lead action; audited)."""
    project = get_project_for(session, user, project_id, lead=True)
    made = gold.top_up_gold(session, get_media_store(), project=project)
    total = gold.gold_count(session, project_id=project.id)
    record(
        session,
        actor=user,
        action="gold.create",
        target=f"project:{project.id}",
        project_id=project.id,
        details={"created": len(made), "gold_pairs": total},
    )
    return {"created": len(made), "pair_ids": [p.id for p in made], "gold_pairs": total}
