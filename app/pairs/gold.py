"""Gold pairs: an image against a visibly degraded copy of itself, whose right answer is known.

They measure annotators: served at the project's `gold_rate`, at most once per annotator, not
capped at k (see `app.pairs.scheduler`).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageFilter
from sqlalchemy import false, func, select
from sqlalchemy.orm import Session

from app.core.storage import MediaStore
from app.images.models import Image
from app.images.service import store_image
from app.pairs.building import canonical
from app.pairs.hiding import refresh_hidden
from app.pairs.models import Pair
from app.projects.models import Project
from app.projects.service import project_settings

GOLD_KINDS = ("blur", "noise")


def degrade_png(png: bytes, kind: str, *, seed: int = 0) -> tuple[bytes, dict[str, Any]]:
    """A visibly worse copy of an image (for gold pairs); returns (png, what was done)."""
    with PILImage.open(io.BytesIO(png)) as src:
        img = src.convert("RGB")
    if kind == "blur":
        radius = max(2.0, min(img.size) / 12)
        out = img.filter(ImageFilter.GaussianBlur(radius))
        info: dict[str, Any] = {"kind": "blur", "radius": round(radius, 2)}
    elif kind == "noise":
        sigma = 64.0
        pixels = np.asarray(img, dtype=np.float32)  # (H, W, 3)
        noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
        out = PILImage.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
        info = {"kind": "noise", "sigma": sigma, "seed": seed}
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {GOLD_KINDS}")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), info


def create_gold_pairs(
    session: Session,
    store: MediaStore,
    *,
    project: Project,
    images: Sequence[Image],
    kind: str = "blur",
    seed: int = 0,
) -> list[Pair]:
    """Store a degraded copy of each image and a gold pair whose expected winner is the original.

    The pair of an image of an archived prompt or model is hidden, as its regular pairs are."""
    settings = project_settings(project)
    pairs: list[Pair] = []
    for n, image in enumerate(images):
        png, info = degrade_png(store.read(image.storage_key), kind, seed=seed + n)
        copy = store_image(
            session,
            store,
            project_id=project.id,
            prompt_id=image.prompt_id,
            png=png,
            model_version_id=None,
            seed=None,
            provenance={"gold_of": image.id, "degradation": info},
        )
        a, b = canonical(image.id, copy.id)
        pair = Pair(
            project_id=project.id,
            prompt_id=image.prompt_id,
            image_a_id=a,
            image_b_id=b,
            purpose="eval",
            is_gold=True,
            gold_expected=image.id,
            votes_wanted=settings.votes_per_pair,
            vote_count=0,
        )
        session.add(pair)
        pairs.append(pair)
    session.flush()
    refresh_hidden(session, project_id=project.id, pair_ids=[pair.id for pair in pairs])
    return pairs


def gold_wanted(gold_rate: float, regular_pairs: int) -> int:
    """Gold pairs a project should hold: `gold_rate` of its pairs, at least one when the rate is on.

    Each annotator meets a gold pair at most once, so the pool grows with the pairs it is mixed in.
    """
    if gold_rate <= 0 or regular_pairs <= 0:
        return 0
    return max(1, math.ceil(gold_rate * regular_pairs))


def gold_count(session: Session, *, project_id: int) -> int:
    stmt = select(func.count()).select_from(Pair).where(Pair.project_id == project_id, Pair.is_gold)
    return int(session.scalar(stmt) or 0)


def top_up_gold(session: Session, store: MediaStore, *, project: Project) -> list[Pair]:
    """Create the gold pairs the project's `gold_rate` calls for and it does not have yet.

    Sources are generated images that sit in a regular pair still served (not hidden) and are
    not already the original of a gold pair; degradations alternate over `GOLD_KINDS`, picked
    in a fixed order so that a re-run makes the same choices.
    """
    settings = project_settings(project)
    counts = dict(
        session.execute(
            select(Pair.is_gold, func.count())
            .where(Pair.project_id == project.id)
            .group_by(Pair.is_gold)
        ).all()
    )
    have = int(counts.get(True, 0))
    missing = gold_wanted(settings.gold_rate, int(counts.get(False, 0))) - have
    if missing <= 0:
        return []
    used = set(
        session.scalars(
            select(Pair.gold_expected).where(Pair.project_id == project.id, Pair.is_gold)
        )
    )
    in_pairs = (
        select(Pair.id)
        .where(
            Pair.project_id == project.id,
            Pair.is_gold == false(),
            Pair.hidden == false(),
            (Pair.image_a_id == Image.id) | (Pair.image_b_id == Image.id),
        )
        .exists()
    )
    sources = [
        img
        for img in session.scalars(
            select(Image)
            .where(Image.project_id == project.id, Image.model_version_id.is_not(None), in_pairs)
            .order_by(Image.created_at, Image.id)
        )
        if img.id not in used
    ]
    rng = random.Random(project.id * 1_000_003 + have)
    picked = rng.sample(sources, min(missing, len(sources)))
    made: list[Pair] = []
    for n, image in enumerate(picked):
        kind = GOLD_KINDS[(have + n) % len(GOLD_KINDS)]
        made += create_gold_pairs(
            session, store, project=project, images=[image], kind=kind, seed=have + n
        )
    return made


def mark_gold(session: Session, *, pair: Pair, expected: str) -> Pair:
    """Make an existing pair a gold pair whose right answer is `expected` (an image id or "tie")."""
    if expected not in (pair.image_a_id, pair.image_b_id, "tie"):
        raise ValueError(f"expected must be one of the pair's image ids or 'tie', not {expected!r}")
    pair.is_gold = True
    pair.gold_expected = expected
    session.flush()
    return pair
