"""Image bytes for project members, and the lead's image listing."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from app.core.db import SessionDep, request_session
from app.core.deps import CurrentUser, get_project_for, lookup_auth, membership_role
from app.core.storage import get_media_store
from app.images.models import Image
from app.images.service import image_url
from app.images.signing import verified_sha256
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


def _plausible(image_id: str) -> bool:
    # Ids are short hex strings; anything else (NUL bytes, traversal, overlong) is unknown.
    return len(image_id) <= 32 and image_id.isascii() and image_id.isalnum()


# Images up to this size are answered from memory, without FileResponse's thread hops. Files are
# content-addressed, so a copy never goes stale; a pair's images are fetched by each of its k
# annotators, and the toy model's or a thumbnail's are a few KB.
SMALL_IMAGE_BYTES = 256 * 1024
IMAGE_CACHE_BYTES = 32 * 1024 * 1024


class _SmallImages:
    """Least recently used image bytes by content hash, at most `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.items: OrderedDict[str, bytes] = OrderedDict()
        # The member route answers from threadpool threads, the signed one from the event loop.
        self.lock = threading.Lock()

    def get(self, sha256: str, path: Path) -> bytes | None:
        """The file's bytes if it is small (cached from now on), None for a large one; raises
        FileNotFoundError for a missing file."""
        with self.lock:
            data = self.items.get(sha256)
            if data is not None:
                self.items.move_to_end(sha256)
                return data
        if path.stat().st_size > SMALL_IMAGE_BYTES:
            return None
        data = path.read_bytes()
        with self.lock:
            if sha256 not in self.items:
                self.items[sha256] = data
                self.size += len(data)
            while self.size > self.limit:
                _, dropped = self.items.popitem(last=False)
                self.size -= len(dropped)
        return data


_small_images = _SmallImages(IMAGE_CACHE_BYTES)


def _png(request: Request, sha256: str, path: Path) -> Response:
    # Content-addressed, so the bytes behind an id never change.
    headers = {"Cache-Control": "private, max-age=86400", "ETag": f'"{sha256}"'}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    data = _small_images.get(sha256, path)
    if data is not None:
        return Response(data, media_type="image/png", headers=headers)
    return BlindFileResponse(path, media_type="image/png", headers=headers)


def _member_image(request: Request, image_id: str) -> Response:
    """The unsigned way: the caller must be a member of the image's project."""
    with request_session(request) as session:
        auth = lookup_auth(session, request)
        if auth is None:
            raise HTTPException(401, "authentication required", {"WWW-Authenticate": "Bearer"})
        image = session.get(Image, image_id) if _plausible(image_id) else None
        # Unknown and forbidden look the same, so ids cannot be probed.
        if image is None or membership_role(session, auth.user, image.project_id) is None:
            raise HTTPException(404, "image not found")
        sha256, key = image.sha256, image.storage_key
    try:
        path = get_media_store().path_for(key)
    except FileNotFoundError:
        raise HTTPException(404, "image not found") from None
    if not path.exists():
        raise HTTPException(404, "image file missing")
    return _png(request, sha256, path)


IMAGE_ROUTE = "/api/v1/images/{image_id}"
_IMAGE_PREFIX = "/api/v1/images/"


def signed_image_response(scope: Scope) -> Response | None:
    """The answer to a GET of a valid signed image URL, or None (then routing goes on).

    Called by the outermost middleware before routing and parameter validation: a signed URL
    needs neither, and the pair's 2 images are half of the requests of a vote cycle.
    """
    path: str = scope["path"]
    if scope["method"] not in ("GET", "HEAD") or not path.startswith(_IMAGE_PREFIX):
        return None
    image_id = path[len(_IMAGE_PREFIX) :]
    query = scope.get("query_string", b"")
    if b"s=" not in query or not _plausible(image_id):
        return None
    params = {k: v[0] for k, v in parse_qs(query.decode("latin-1")).items()}
    sha256 = verified_sha256(
        image_id, u=params.get("u"), e=params.get("e"), h=params.get("h"), s=params.get("s")
    )
    if sha256 is None:
        return None
    file = get_media_store().path_for(f"{sha256[:2]}/{sha256[2:4]}/{sha256}.png")
    try:
        return _png(Request(scope), sha256, file)
    except FileNotFoundError:
        return None


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    responses={404: {"description": "unknown image, not a member, or an invalid signature"}},
)
async def image_bytes(
    image_id: str,
    request: Request,
    u: str | None = Query(default=None, description="signed URLs: the annotator"),
    e: str | None = Query(default=None, description="signed URLs: expiry (Unix time)"),
    h: str | None = Query(default=None, description="signed URLs: the content hash"),
    s: str | None = Query(default=None, description="signed URLs: the signature"),
) -> Response:
    """PNG bytes: through a signed URL from a served pair (no lookup; answered before routing by
    `signed_image_response`, this is the fallback), or for project members."""
    sha256 = verified_sha256(image_id, u=u, e=e, h=h, s=s) if _plausible(image_id) else None
    if sha256 is not None:
        path = get_media_store().path_for(f"{sha256[:2]}/{sha256[2:4]}/{sha256}.png")
        if path.exists():
            return _png(request, sha256, path)
    slots: asyncio.Semaphore | None = getattr(request.app.state, "db_slots", None)
    if slots is None:
        return await run_in_threadpool(_member_image, request, image_id)
    async with slots:
        return await run_in_threadpool(_member_image, request, image_id)


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
