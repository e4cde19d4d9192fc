"""`generate`: prompts × model versions × seeds → stored images (and pairs for annotators).

Each image is committed as soon as it exists, and an image already stored for the same
(prompt, model version, seed) is skipped, so a retried job continues where the last attempt
stopped instead of generating duplicates.

Seeds are drawn per prompt (`worker.seeds`, the training domain) unless the job names `seeds`,
which then apply to every prompt. Every model version gets the same seeds for a prompt, so
images of different versions compare on common random numbers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.generators.models import ModelVersion
from app.images.models import Image
from app.images.service import store_image
from app.jobs.kinds import GenerateParams
from app.projects.models import Project, Prompt
from worker.runner import JobCancelled, JobPartial, ProjectJobContext, TransientJobError
from worker.seeds import seeds_by_prompt


def spec_for(model: ModelVersion) -> Any:
    """The generation spec of a model version (its params as registered)."""
    from worker.generation import GeneratorSpec

    return GeneratorSpec.from_params(model.base, model.adapter, model.params)


def batch_size_for(spec: Any, requested: int | None) -> int:
    """The job's batch size, or one suited to the device and the image size."""
    from worker.generation import default_batch_size, get_pipeline, native_size

    if requested:
        return requested
    pipe = get_pipeline(spec)
    height, width = native_size(pipe)
    pixels = (spec.height or height) * (spec.width or width)
    base = default_batch_size(pipe.device)
    # Small images leave the device idle at the usual batch sizes: scale up to 64×64-ish work.
    return int(max(base, min(64, base * (256 * 256) // max(pixels, 1) // 8)))


def _prompts(ctx: ProjectJobContext[GenerateParams]) -> list[tuple[int, str]]:
    with ctx.session() as session:
        stmt = select(Prompt.id, Prompt.text).where(Prompt.project_id == ctx.project_id)
        if ctx.params.prompt_ids:
            stmt = stmt.where(Prompt.id.in_(ctx.params.prompt_ids))
        elif ctx.params.split != "all":
            stmt = stmt.where(Prompt.split == ctx.params.split)
        return [(pid, text) for pid, text in session.execute(stmt.order_by(Prompt.id))]


def _existing(
    ctx: ProjectJobContext[Any], model_id: int, prompt_ids: list[int]
) -> set[tuple[int, int]]:
    with ctx.session() as session:
        rows = session.execute(
            select(Image.prompt_id, Image.seed).where(
                Image.model_version_id == model_id, Image.prompt_id.in_(prompt_ids)
            )
        )
        return {(pid, seed) for pid, seed in rows if seed is not None}


def _store(
    ctx: ProjectJobContext[Any],
    model: ModelVersion,
    prompt_id: int,
    seed: int,
    image: Any,
    best_of: dict[str, Any] | None = None,
) -> bool:
    from worker.generation import png_bytes, provenance

    spec = spec_for(model)
    extra = {"best_of": best_of} if best_of else {}
    try:
        with ctx.session() as session:
            store_image(
                session,
                ctx.store,
                project_id=model.project_id,
                prompt_id=prompt_id,
                png=png_bytes(image),
                model_version_id=model.id,
                seed=seed,
                provenance={
                    **provenance(spec, seed),
                    "model_version": model.id,
                    "job": ctx.job_id,
                    **extra,
                },
            )
        return True
    except IntegrityError:
        # Another attempt stored this (prompt, model, seed) first: keep theirs.
        return False


def generate_images(
    ctx: ProjectJobContext[Any],
    models: list[ModelVersion],
    prompts: list[tuple[int, str]],
    seeds: Sequence[int] | Mapping[int, Sequence[int]],
    *,
    batch_size: int | None = None,
    progress: tuple[float, float] = (0.0, 1.0),
    failures: dict[int, str] | None = None,
) -> tuple[int, int]:
    """Generate every missing (prompt, model, seed) image; returns (created, skipped).

    `seeds`: the same seeds for every prompt, or {prompt id: its seeds}. Stops quietly between
    batches when the job is cancelled (the caller raises). With `failures`, a model that fails
    (will not load, or its sampler breaks) is recorded there as {model id: reason} and the other
    models go on; without it, the failure ends the call.
    """
    from worker.generation import iter_generate

    text_of = dict(prompts)
    per_prompt = (
        {pid: list(seeds[pid]) for pid in text_of}
        if isinstance(seeds, Mapping)
        else {pid: list(seeds) for pid in text_of}
    )
    wanted = [(pid, seed) for pid in text_of for seed in per_prompt[pid]]
    plan: list[tuple[ModelVersion, list[tuple[int, int]]]] = []
    skipped = 0
    for model in models:
        done = _existing(ctx, model.id, list(text_of))
        todo = [key for key in wanted if key not in done]
        skipped += len(wanted) - len(todo)
        plan.append((model, todo))
    total = sum(len(todo) for _, todo in plan)
    created = finished = 0
    last_report = 0.0
    low, high = progress
    ctx.log(f"{total} images to generate, {skipped} already stored")
    for model, todo in plan:
        if not todo or ctx.cancel_requested:
            continue
        ctx.log(f"model {model.name}: {len(todo)} images")
        items = [(text_of[pid], seed) for pid, seed in todo]
        ids = iter(todo)
        spec = spec_for(model)

        def sample(todo_items: Any, spec: Any = spec) -> Any:
            return iter_generate(
                spec,
                todo_items,
                batch_size=batch_size_for(spec, batch_size),
                should_cancel=lambda: ctx.cancel_requested,
            )

        try:
            for _prompt, seed, image, choice in sample_with_policy(ctx, model, sample, items):
                prompt_id, expected_seed = next(ids)
                assert seed == expected_seed
                created += _store(ctx, model, prompt_id, seed, image, choice)
                finished += 1
                # Throttled: a progress write per image would cost more than a small image.
                if time.monotonic() - last_report > 0.5 or finished == total:
                    last_report = time.monotonic()
                    fraction = low + (high - low) * finished / max(total, 1)
                    ctx.progress(fraction, f"{finished} of {total} images")
        except (JobCancelled, TransientJobError):
            raise
        except Exception as exc:
            if failures is None:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            failures[model.id] = reason
            ctx.log(f"model {model.name} failed, the others go on: {reason}")
    return created, skipped


def sample_with_policy(
    ctx: ProjectJobContext[Any], model: ModelVersion, sample: Any, items: list[tuple[str, int]]
) -> Any:
    """(prompt, seed, image, best-of choice or None) under the job's or the model's policy."""
    from worker.best_of import iter_best_of
    from worker.generation import SamplingPolicy

    job_policy = getattr(ctx.params, "best_of", None)
    source = (
        {"best_of": job_policy, "reward_model_id": ctx.params.reward_model_id}
        if job_policy
        else model.params
    )
    policy = SamplingPolicy.from_params(source)
    if not policy.active:
        return ((prompt, seed, image, None) for prompt, seed, image in sample(items))
    from worker.pairs_source import reward_model_row, reward_scorer

    row = reward_model_row(ctx, policy.reward_model_id)
    ctx.log(f"model {model.name}: best of {policy.best_of} by reward model {row.id}")
    return (
        (prompt, seed, image, {**choice, "reward_model_id": row.id})
        for prompt, seed, image, choice in iter_best_of(
            sample, reward_scorer(ctx, row), items, policy.best_of
        )
    )


def load_models(ctx: ProjectJobContext[Any], model_ids: list[int]) -> list[ModelVersion]:
    with ctx.session() as session:
        models = [session.get(ModelVersion, mid) for mid in model_ids]
    found = [m for m in models if m is not None]
    if len(found) != len(models):
        raise ValueError("a model version of this job was deleted")
    return found


# Prompts per round when pairs are made as we go: annotators can start after the first round.
PAIR_ROUND_PROMPTS = 8


def generate(ctx: ProjectJobContext[GenerateParams]) -> dict[str, Any]:
    params = ctx.params
    prompts = _prompts(ctx)
    if not prompts:
        raise ValueError(f"no prompts in split {params.split!r} of project {ctx.project_id}")
    seeds = seeds_by_prompt(
        [pid for pid, _ in prompts], params.images_per_prompt, "train", params.seeds
    )
    models = load_models(ctx, params.model_ids)
    make = params.make_pairs
    # With pairs wanted, work prompt-major in rounds and pair each round as soon as it exists.
    size = PAIR_ROUND_PROMPTS if make else len(prompts)
    rounds = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    created = skipped = pairs = 0
    # One model that will not load must not cost the others their images and pairs; one whose
    # check failed after the job was queued is not tried again.
    failures: dict[int, str] = {
        m.id: f"failed its check: {m.check_error}" for m in models if m.check_status == "failed"
    }
    for index, chunk in enumerate(rounds):
        span = (index / len(rounds), (index + 1) / len(rounds))
        working = [m for m in models if m.id not in failures]
        new, old = generate_images(
            ctx, working, chunk, seeds, batch_size=params.batch_size, progress=span,
            failures=failures,
        )  # fmt: skip
        created += new
        skipped += old
        if ctx.cancel_requested:
            raise JobCancelled()
        good = [m.id for m in models if m.id not in failures]
        if not good:
            break
        if make:
            chunk_seeds = {pid: seeds[pid] for pid, _ in chunk}
            pairs += _make_pairs(ctx, good, chunk_seeds)
    reasons = "; ".join(
        f"model {m.id} ({m.name}): {failures[m.id]}" for m in models if m.id in failures
    )
    if len(failures) == len(models):
        raise RuntimeError(reasons if len(models) > 1 else failures[models[0].id])
    gold = _top_up_gold(ctx)
    ctx.progress(1.0, f"{created} new images, {pairs} new pairs, {gold} new gold pairs")
    result: dict[str, Any] = {
        "images": created, "skipped": skipped, "pairs": pairs, "gold_pairs": gold,
    }  # fmt: skip
    if failures:
        result["failed_models"] = [
            {"model_id": model_id, "reason": reason} for model_id, reason in failures.items()
        ]
        raise JobPartial(result, f"{len(failures)} of {len(models)} models failed: {reasons}")
    return result


def _top_up_gold(ctx: ProjectJobContext[Any]) -> int:
    """Gold pairs for the project's `gold_rate`, now that the job's pairs exist."""
    from app.pairs.gold import top_up_gold

    with ctx.session() as session:
        project = session.get_one(Project, ctx.project_id)
        made = top_up_gold(session, ctx.store, project=project)
    if made:
        ctx.log(f"{len(made)} new gold pairs")
    return len(made)


def _make_pairs(
    ctx: ProjectJobContext[Any], model_ids: list[int], seeds: Mapping[int, list[int]]
) -> int:
    """Pairs for this job's images: {prompt id: the seeds generated for it}."""
    from app.pairs.building import make_pairs

    with ctx.session() as session:
        project = session.get_one(Project, ctx.project_id)
        candidates = session.scalars(
            select(Image).where(
                Image.model_version_id.in_(model_ids), Image.prompt_id.in_(list(seeds))
            )
        )
        images = [img for img in candidates if img.seed in seeds[img.prompt_id]]
        return len(make_pairs(session, project=project, images=images))
