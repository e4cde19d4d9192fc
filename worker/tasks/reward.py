"""`train_reward` and `score_images`: a reward model from a vote snapshot, and image scores.

train_reward: freeze the project's votes (a snapshot, reused by a retried attempt), turn them
into soft-labelled pairs, train with `worker.reward_model.train_reward_model` on a
prompt-disjoint split, save to `reward_models/<id>/` in the media store (atomically) and record
a `RewardModel` row (version = the project's previous highest + 1). The images of the project's
open train pairs are scored on the way out, for active pair sampling (`app.pairs.active`).

score_images: one reward-model version's scores for the images of some model versions; the
per-image scores and per-model means go into the job result and the model's scores file.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.storage import MediaStore
from app.generators.models import ModelVersion
from app.images.models import Image
from app.jobs.kinds import ScoreImagesParams, TrainRewardParams
from app.pairs.active import latest_reward_model, record_image_scores, reward_model_dir
from app.pairs.models import Pair
from app.projects.models import Project, Prompt
from app.ratings.models import RewardModel
from app.ratings.snapshots import TrainingPair, create_snapshot, snapshot_for_job, snapshot_pairs
from worker.cache import LoadedCache
from worker.runner import ProjectJobContext

if TYPE_CHECKING:
    from worker.reward_model import PreferenceDataset
    from worker.reward_model import RewardModel as RewardNet

log = logging.getLogger("prefloop.worker.reward")

# Decoded training images are shrunk to this shorter side (above every CLIP input size), so a
# large dataset of 1024 px images fits in memory.
MAX_DECODE_SIDE = 448
# Reward models kept loaded per process (a CLIP one holds ~1 GB).
MODEL_CACHE_SIZE = 2


# --- images -------------------------------------------------------------------------------------


def decode_png(data: bytes, max_side: int = MAX_DECODE_SIDE) -> np.ndarray:
    """(H, W, 3) uint8 RGB; an image whose shorter side exceeds `max_side` is scaled down."""
    with PILImage.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    shorter = min(rgb.size)
    if shorter > max_side:
        scale = max_side / shorter
        rgb = rgb.resize(
            (round(rgb.width * scale), round(rgb.height * scale)), PILImage.Resampling.BICUBIC
        )
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)


def build_preference_dataset(
    pairs: Sequence[TrainingPair], read: Callable[[str], bytes]
) -> PreferenceDataset:
    """Winner as image0 with label0 = p (1 a clear win, 0.5 a tie); each image decoded once."""
    from worker.reward_model import PreferenceDataset, PreferenceRecord

    decoded: dict[str, np.ndarray] = {}

    def image(key: str) -> np.ndarray:
        if key not in decoded:
            decoded[key] = decode_png(read(key))
        return decoded[key]

    return PreferenceDataset(
        [
            PreferenceRecord(
                prompt=pair.prompt,
                image0=image(pair.winner_storage_key),
                image1=image(pair.loser_storage_key),
                label0=pair.p,
            )
            for pair in pairs
        ]
    )


# --- loading and scoring --------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_models: LoadedCache[tuple[int, str], RewardNet] = LoadedCache(MODEL_CACHE_SIZE)


def load_cached(store: MediaStore, row: RewardModel) -> RewardNet:
    """The saved model of a RewardModel row, loaded once per process (least recently used out)."""
    from worker.reward_model import load_reward_model

    key = (row.id, str(reward_model_dir(store, row)))
    return _models.get(key, lambda: load_reward_model(key[1], device=_device()))


def score_arrays(
    model: RewardNet, prompts: Sequence[str], images: Sequence[np.ndarray], batch_size: int = 64
) -> np.ndarray:
    from worker.reward_model import score_images

    return score_images(model, list(prompts), list(images), batch_size=batch_size)


def score_model_images(
    session: Session,
    store: MediaStore,
    reward_model_row: RewardModel,
    image_rows: Sequence[Image],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """{image id: reward score} for images of the reward model's project, each under its prompt."""
    if not image_rows:
        return {}
    model = load_cached(store, reward_model_row)
    prompt_ids = sorted({img.prompt_id for img in image_rows})
    texts = dict(
        session.execute(select(Prompt.id, Prompt.text).where(Prompt.id.in_(prompt_ids))).all()
    )
    scores: dict[str, float] = {}
    # Decode one batch at a time: memory stays flat however many images there are.
    for start in range(0, len(image_rows), batch_size):
        chunk = image_rows[start : start + batch_size]
        arrays = [decode_png(store.read(img.storage_key)) for img in chunk]
        values = score_arrays(model, [texts[img.prompt_id] for img in chunk], arrays, batch_size)
        scores.update({img.id: float(v) for img, v in zip(chunk, values, strict=True)})
    return scores


def open_train_pair_images(session: Session, project_id: int) -> list[Image]:
    """Images of the project's non-gold train pairs that still want votes."""
    open_pairs = select(Pair.image_a_id, Pair.image_b_id).where(
        Pair.project_id == project_id,
        Pair.purpose == "train",
        Pair.is_gold.is_(False),
        Pair.vote_count < Pair.votes_wanted,
    )
    ids = {i for row in session.execute(open_pairs) for i in row}
    if not ids:
        return []
    return list(session.scalars(select(Image).where(Image.id.in_(sorted(ids))).order_by(Image.id)))


# --- train_reward -------------------------------------------------------------------------------


def _row_summary(row: RewardModel) -> dict[str, Any]:
    metrics = row.metrics or {}
    return {
        "reward_model_id": row.id,
        "version": row.version,
        "snapshot_id": row.snapshot_id,
        "backbone": row.backbone,
        "path": row.path,
        "val_accuracy": metrics.get("val_accuracy"),
        "tie_threshold": metrics.get("tie_threshold"),
        "log_loss": metrics.get("log_loss"),
        "ece": metrics.get("ece"),
        "test_accuracy": metrics.get("test_accuracy"),
        "test_log_loss": metrics.get("test_log_loss"),
        "test_ece": metrics.get("test_ece"),
        "best_step": metrics.get("best_step"),
        "steps_run": metrics.get("steps_run"),
        "train_pairs": metrics.get("n_train"),
        "val_pairs": metrics.get("n_val"),
        "test_pairs": metrics.get("n_test"),
        "pairs": metrics.get("pairs"),
        "tie_pairs": metrics.get("tie_pairs"),
        "votes": metrics.get("votes"),
        "scored_images": metrics.get("scored_images"),
    }


def train_reward(ctx: ProjectJobContext[TrainRewardParams]) -> dict[str, Any]:
    from worker.reward_model import save_reward_model, train_reward_model

    params = ctx.params
    project_id = ctx.project_id
    with ctx.session() as session:
        done = session.scalar(select(RewardModel).where(RewardModel.job_id == ctx.job_id))
        if done is not None:  # an earlier attempt committed its model: nothing left to do
            return _row_summary(done)
        snapshot = snapshot_for_job(session, ctx.job_id) or create_snapshot(
            session, project_id=project_id, job_id=ctx.job_id
        )
        snapshot_id, vote_count = snapshot.id, snapshot.vote_count
        # Only prompts of the project's train split: val and test prompts judge the generators
        # this reward model may score, so it must not have learned from their votes.
        pairs = snapshot_pairs(session, snapshot_id, tie_policy=params.tie_policy, split="train")
    ctx.log(f"snapshot {snapshot_id}: {vote_count} votes, {len(pairs)} train-split pairs")
    needed = 3 if params.test_fraction > 0 else 2
    if len({p.prompt for p in pairs}) < needed:
        raise ValueError(
            f"snapshot {snapshot_id} gives {len(pairs)} usable pairs on train-split prompts over "
            f"fewer than {needed} prompts; prompt-disjoint train, validation and test sets need "
            f"at least {needed}"
        )
    ctx.progress(0.02, f"loading {len(pairs)} pairs")
    dataset = build_preference_dataset(pairs, ctx.store.read)
    ctx.check_cancelled()
    ctx.truncate_metrics(0)  # a retried attempt trains from scratch: drop the old series

    def on_progress(step: int, total: int, point: dict[str, float]) -> None:
        ctx.metrics(
            step,
            {
                "train_loss": point["train_loss"],
                "val_loss": point["val_loss"],
                "val_accuracy": point["val_accuracy"],
                "val_log_loss": point["val_log_loss"],
                "val_ece": point["val_ece"],
            },
        )
        ctx.progress(0.05 + 0.85 * step / total, f"step {step}/{total}")
        ctx.check_cancelled()

    trained = train_reward_model(dataset, params, on_progress)
    ctx.progress(0.92, "scoring open train-pair images")
    with ctx.session() as session:
        to_score = open_train_pair_images(session, project_id)
        prompts = dict(
            session.execute(
                select(Prompt.id, Prompt.text).where(
                    Prompt.id.in_(sorted({img.prompt_id for img in to_score}))
                )
            ).all()
        )
    image_scores: dict[str, float] = {}
    for start in range(0, len(to_score), params.batch_size):
        chunk = to_score[start : start + params.batch_size]
        values = score_arrays(
            trained.model,
            [prompts[img.prompt_id] for img in chunk],
            [decode_png(ctx.store.read(img.storage_key)) for img in chunk],
            params.batch_size,
        )
        image_scores.update({img.id: float(v) for img, v in zip(chunk, values, strict=True)})

    metrics = {
        "val_accuracy": trained.val_accuracy,
        "tie_threshold": trained.tie_threshold,
        "log_loss": trained.val_log_loss,
        "ece": trained.val_ece,
        "val_loss": trained.val_loss,
        "test_accuracy": trained.test_accuracy,
        "test_log_loss": trained.test_log_loss,
        "test_ece": trained.test_ece,
        "test_loss": trained.test_loss,
        "best_step": trained.best_step,
        "steps_run": trained.steps_run,
        "stopped_early": trained.stopped_early,
        "restart_val_losses": trained.restart_val_losses,
        "n_train": trained.n_train,
        "n_val": trained.n_val,
        "n_test": trained.n_test,
        "pairs": len(pairs),
        "tie_pairs": sum(p.is_tie for p in pairs),
        "votes": vote_count,
        "tie_policy": params.tie_policy,
        "scored_images": len(image_scores),
    }
    with ctx.session() as session:
        # The project row lock serialises concurrent trainings, so versions stay distinct.
        session.execute(select(Project.id).where(Project.id == project_id).with_for_update())
        previous = session.scalar(
            select(func.max(RewardModel.version)).where(RewardModel.project_id == project_id)
        )
        row = RewardModel(
            project_id=project_id,
            version=int(previous or 0) + 1,
            snapshot_id=snapshot_id,
            job_id=ctx.job_id,
            backbone=params.backbone,
            path="",
            metrics=metrics,
        )
        session.add(row)
        session.flush()
        row.path = f"reward_models/{row.id}"
        # Written before the row commits: a listed model always has its files.
        save_reward_model(trained.model, reward_model_dir(ctx.store, row), params, metrics)
        record_image_scores(session, row.id, image_scores)
        session.flush()
        summary = _row_summary(row)
    log.info(
        "reward.trained job_id=%s reward_model_id=%s val_accuracy=%.3f test_accuracy=%s",
        ctx.job_id,
        summary["reward_model_id"],
        trained.val_accuracy,
        "n/a" if trained.test_accuracy is None else f"{trained.test_accuracy:.3f}",
    )
    return summary


# --- score_images -------------------------------------------------------------------------------


def score_images_job(ctx: ProjectJobContext[ScoreImagesParams]) -> dict[str, Any]:
    params = ctx.params
    project_id = ctx.project_id
    with ctx.session() as session:
        if params.reward_model_id is not None:
            row = session.get(RewardModel, params.reward_model_id)
        else:
            row = latest_reward_model(session, project_id)
        if row is None or row.project_id != project_id:
            raise ValueError("no reward model of this project to score with")
        stmt = select(Image).where(
            Image.project_id == project_id, Image.model_version_id.is_not(None)
        )
        if params.model_ids:
            stmt = stmt.where(Image.model_version_id.in_(params.model_ids))
        if params.split != "all":
            stmt = stmt.join(Prompt, Prompt.id == Image.prompt_id).where(
                Prompt.split == params.split
            )
        images = list(session.scalars(stmt.order_by(Image.id)))
        names = dict(
            session.execute(
                select(ModelVersion.id, ModelVersion.name).where(
                    ModelVersion.project_id == project_id
                )
            ).all()
        )
    ctx.progress(0.05, f"scoring {len(images)} images with reward model v{row.version}")
    scores: dict[str, float] = {}
    step = max(1, params.batch_size) * 8
    for start in range(0, len(images), step):
        ctx.check_cancelled()
        chunk = images[start : start + step]
        with ctx.session() as session:
            scores.update(
                score_model_images(session, ctx.store, row, chunk, batch_size=params.batch_size)
            )
        ctx.progress(0.05 + 0.9 * len(scores) / max(1, len(images)), f"{len(scores)} scored")
    with ctx.session() as session:
        record_image_scores(session, row.id, scores)

    by_model: dict[int, list[float]] = defaultdict(list)
    for img in images:
        # The query above keeps only images with a model, so model_version_id is never None.
        by_model[img.model_version_id].append(scores[img.id])  # type: ignore[index]
    models: list[dict[str, Any]] = [
        {
            "model_id": model_id,
            "name": names.get(model_id),
            "images": len(values),
            "mean": float(np.mean(values)),
            "std": float(np.std(values)),
        }
        for model_id, values in sorted(by_model.items())
    ]
    models.sort(key=lambda m: -m["mean"])
    return {
        "reward_model_id": row.id,
        "version": row.version,
        "images": len(scores),
        "models": models,
        "scores": scores,
    }
