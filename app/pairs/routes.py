"""JSON API: the next pair for an annotator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Response

from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for
from app.images.service import image_url
from app.pairs import service
from app.pairs.schemas import ImageRef, PairServed

router = APIRouter(prefix="/api/v1", tags=["annotators"])


def to_public(served: service.ServedPair) -> PairServed:
    return PairServed(
        pair_id=served.pair_id,
        prompt=served.prompt,
        left=ImageRef(image_id=served.left_image_id, url=image_url(served.left_image_id)),
        right=ImageRef(image_id=served.right_image_id, url=image_url(served.right_image_id)),
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
        served = service.next_pair(session, project=project, annotator=user)
    except service.PairsBusy as exc:
        raise HTTPException(503, str(exc), {"Retry-After": "1"}) from None
    if served is None:
        return Response(status_code=204)
    return to_public(served)
