"""Image bytes for project members, and the lead's image listing."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from app.core.db import SessionDep
from app.core.deps import CurrentUser, get_project_for, membership_role
from app.core.storage import get_media_store
from app.images.models import Image
from app.images.service import image_url
from app.projects.models import Prompt

router = APIRouter(prefix="/api/v1", tags=["images"])


class BlindFileResponse(FileResponse):
    """A file response that says nothing of when the file was written.

    Starlette's default Last-Modified and mtime-based ETag would tell a new model's images
    (written after its parent's) from the parent's, and votes would no longer be blind; the
    content hash is the only validator given.
    """

    def set_stat_headers(self, stat_result: os.stat_result) -> None:
        self.headers.setdefault("content-length", str(stat_result.st_size))


@router.get("/images/{image_id}", response_class=FileResponse)
def image_bytes(
    image_id: str, request: Request, session: SessionDep, user: CurrentUser
) -> Response:
    # Ids are short hex strings; anything else (NUL bytes, traversal, overlong) is unknown.
    plausible = len(image_id) <= 32 and image_id.isascii() and image_id.isalnum()
    image = session.get(Image, image_id) if plausible else None
    # Unknown and forbidden look the same, so ids cannot be probed.
    if image is None or membership_role(session, user, image.project_id) is None:
        raise HTTPException(404, "image not found")
    try:
        path = get_media_store().path_for(image.storage_key)
    except FileNotFoundError:
        raise HTTPException(404, "image not found") from None
    if not path.exists():
        raise HTTPException(404, "image file missing")
    # Content-addressed, so the bytes behind an id never change.
    headers = {"Cache-Control": "private, max-age=86400", "ETag": f'"{image.sha256}"'}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return BlindFileResponse(path, media_type="image/png", headers=headers)


@router.get("/projects/{project_id}/images")
def list_images(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    model_id: int | None = Query(default=None),
    prompt_id: int | None = Query(default=None),
    split: str | None = Query(default=None, pattern="^(train|val|test)$"),
    limit: int = Query(default=1000, ge=1, le=10000),
) -> list[dict[str, Any]]:
    get_project_for(session, user, project_id, lead=True)
    stmt = (
        select(Image, Prompt)
        .join(Prompt, Prompt.id == Image.prompt_id)
        .where(Image.project_id == project_id)
        .order_by(Image.created_at, Image.id)
        .limit(limit)
    )
    if model_id is not None:
        stmt = stmt.where(Image.model_version_id == model_id)
    if prompt_id is not None:
        stmt = stmt.where(Image.prompt_id == prompt_id)
    if split is not None:
        stmt = stmt.where(Prompt.split == split)
    return [
        {
            "id": image.id,
            "prompt_id": prompt.id,
            "prompt": prompt.text,
            "model_id": image.model_version_id,
            "seed": image.seed,
            "url": image_url(image.id),
            "sha256": image.sha256,
        }
        for image, prompt in session.execute(stmt)
    ]
