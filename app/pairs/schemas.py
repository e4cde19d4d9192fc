"""What annotators are served: opaque image references and the prompt, nothing about models."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel


class ImageRef(BaseModel):
    image_id: str
    url: str


class PairServed(BaseModel):
    pair_id: int
    prompt: str
    left: ImageRef
    right: ImageRef
    # Until then the pair's slot is held for this annotator.
    expires_at: dt.datetime
