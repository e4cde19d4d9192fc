"""Storing images (content-addressed bytes + a row with provenance) and reading them back."""

from __future__ import annotations

import io
import secrets
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.storage import MediaStore
from app.images.models import Image


def new_image_id() -> str:
    return secrets.token_hex(16)


def store_image(
    session: Session,
    store: MediaStore,
    *,
    project_id: int,
    prompt_id: int,
    png: bytes,
    model_version_id: int | None = None,
    seed: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> Image:
    with PILImage.open(io.BytesIO(png)) as img:
        width, height = img.size
    digest, key = store.put(png, ext="png")
    image = Image(
        id=new_image_id(),
        project_id=project_id,
        prompt_id=prompt_id,
        model_version_id=model_version_id,
        seed=seed,
        sha256=digest,
        storage_key=key,
        width=width,
        height=height,
        provenance=provenance or {},
    )
    session.add(image)
    session.flush()
    return image


def find_image(
    session: Session, *, prompt_id: int, model_version_id: int, seed: int
) -> Image | None:
    return session.scalar(
        select(Image).where(
            Image.prompt_id == prompt_id,
            Image.model_version_id == model_version_id,
            Image.seed == seed,
        )
    )


def image_url(image_id: str) -> str:
    return f"/api/v1/images/{image_id}"
