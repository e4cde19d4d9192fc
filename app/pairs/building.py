"""Building pairs: which images get compared.

Eval pairs: each new image meets one image of every other model version for the same prompt.
Train pairs: within one model version, images of different seeds. Stored in one canonical order,
so the (image_a_id, image_b_id) unique constraint also catches (b, a).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.images.models import Image
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.projects.service import project_settings


def canonical(x: str, y: str) -> tuple[str, str]:
    # One stored order, so the (image_a_id, image_b_id) unique constraint also catches (b, a).
    return (x, y) if x < y else (y, x)


def _seed_key(image: Image) -> tuple[int, int, str]:
    return (image.seed is None, image.seed or 0, image.id)


def _closeness(x: Image, other: Image) -> tuple[bool, int, int, str]:
    # The same seed first (common random numbers), then the lowest seed.
    return (other.seed != x.seed, *_seed_key(other))


def make_pairs(session: Session, *, project: Project, images: Sequence[Image]) -> list[Pair]:
    """Create the eval and train pairs that new images call for; returns the new pairs.

    Eval: each new image meets one image of every other model version for the same prompt,
    the same seed when there is one (common random numbers make the comparison fairer).
    Train: within one model version, images of different seeds, adjacent seeds first, up to
    `train_pairs_per_prompt` per prompt and model version. Existing pairs, in either order,
    are never created again.
    """
    new_ids = {img.id for img in images if img.project_id == project.id and img.model_version_id}
    created: list[Pair] = []
    for prompt_id in sorted({img.prompt_id for img in images if img.id in new_ids}):
        created += _pairs_for_prompt(session, project=project, prompt_id=prompt_id, new_ids=new_ids)
    session.flush()
    return created


def _pairs_for_prompt(
    session: Session, *, project: Project, prompt_id: int, new_ids: set[str]
) -> list[Pair]:
    from app.generators.models import ModelVersion  # generators imports pairs

    settings = project_settings(project)
    prompt = session.get(Prompt, prompt_id)
    if prompt is None or prompt.archived_at is not None:
        return []  # an archived prompt takes no new pairs
    pool = session.scalars(
        select(Image)
        .join(ModelVersion, ModelVersion.id == Image.model_version_id)
        .where(
            Image.project_id == project.id,
            Image.prompt_id == prompt_id,
            ModelVersion.archived_at.is_(None),
        )
        .order_by(Image.seed, Image.id)
    )
    by_model: dict[int, list[Image]] = defaultdict(list)
    for img in pool:
        by_model[img.model_version_id].append(img)  # type: ignore[index]
    existing: dict[tuple[str, str], str] = {
        canonical(a, b): purpose
        for a, b, purpose in session.execute(
            select(Pair.image_a_id, Pair.image_b_id, Pair.purpose).where(
                Pair.prompt_id == prompt_id
            )
        )
    }
    created: list[Pair] = []

    def add(x: Image, y: Image, purpose: str) -> None:
        a, b = canonical(x.id, y.id)
        existing[(a, b)] = purpose
        pair = Pair(
            project_id=project.id,
            prompt_id=prompt_id,
            image_a_id=a,
            image_b_id=b,
            purpose=purpose,
            is_gold=False,
            votes_wanted=settings.votes_per_pair,
            vote_count=0,
        )
        session.add(pair)
        created.append(pair)

    images = [img for imgs in by_model.values() for img in imgs]
    for x in sorted((img for img in images if img.id in new_ids), key=_seed_key):
        for model_id, others in by_model.items():
            if model_id == x.model_version_id:
                continue
            y = min(others, key=partial(_closeness, x))
            if canonical(x.id, y.id) not in existing:
                add(x, y, "eval")

    for imgs in by_model.values():
        if not any(img.id in new_ids for img in imgs):
            continue
        ids = {img.id for img in imgs}
        have = sum(
            1
            for (a, b), purpose in existing.items()
            if purpose == "train" and a in ids and b in ids
        )
        room = settings.train_pairs_per_prompt - have
        ordered = sorted(imgs, key=_seed_key)
        # Adjacent seeds first, then wider gaps: spreads the pairs over the images.
        combos = sorted(
            itertools.combinations(range(len(ordered)), 2), key=lambda ij: (ij[1] - ij[0], ij)
        )
        for i, j in combos:
            if room <= 0:
                break
            x, y = ordered[i], ordered[j]
            if x.seed == y.seed or (x.id not in new_ids and y.id not in new_ids):
                continue
            if canonical(x.id, y.id) in existing:
                continue
            add(x, y, "train")
            room -= 1
    return created
