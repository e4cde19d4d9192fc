"""The job kinds, each defined once: its params model, submission check, queue and handler.

The params model is the only definition of a kind's options and their defaults: the API
validates submissions with it, the stored row holds its JSON, and the worker's handler receives
the model itself (re-validated from the row), so there is no second config class to drift.
Handlers are named by import path so that the web process never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session


class JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A seed as images store it (images.seed is a signed 32-bit column; worker.seeds draws below it).
Seed = Annotated[int, Field(ge=0, lt=2**31)]
# The selftest's whole run: a diagnostic, not a way to hold a worker.
SELFTEST_MAX_SECONDS = 60.0


def distinct_ids(value: list[int] | None) -> list[int] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError("must not repeat an id")
    return value


class SelftestParams(JobParams):
    """A diagnostic: proves that a worker picks jobs up, reports progress and writes media."""

    steps: int = Field(default=3, ge=1, le=1000)
    sleep: float = Field(default=0.2, ge=0, le=10, description="seconds per step")
    queue: Literal["gpu", "cpu"] = "cpu"
    # For testing the failure paths: raise a transient error on every attempt.
    fail: bool = False

    @model_validator(mode="after")
    def _bounded(self) -> SelftestParams:
        if self.steps * self.sleep > SELFTEST_MAX_SECONDS:
            raise ValueError(f"steps × sleep must be at most {SELFTEST_MAX_SECONDS:g} seconds")
        return self


class GenerateParams(JobParams):
    """Prompts × model versions × images per prompt, with deterministic seeds."""

    model_ids: list[int] = Field(min_length=1, max_length=50)
    images_per_prompt: int = Field(default=2, ge=1, le=64)
    # "all" generates for every prompt of the project.
    split: Literal["train", "val", "test", "all"] = "train"
    # Seeds used for every prompt; by default each prompt gets its own (worker.seeds, training
    # range). Either way every model gets the same seeds: paired comparisons.
    seeds: list[Seed] | None = Field(default=None, max_length=64)
    prompt_ids: list[int] | None = Field(default=None, max_length=100_000)
    make_pairs: bool = True
    batch_size: int | None = Field(default=None, ge=1, le=256)
    # Best-of-N for this job (None: each model's own sampling policy): N candidates per image,
    # the reward model (default: the latest) keeps the best.
    best_of: int | None = Field(default=None, ge=1, le=64)
    reward_model_id: int | None = None

    _distinct = field_validator("model_ids", "seeds", "prompt_ids")(distinct_ids)


class CheckModelParams(JobParams):
    """Loads a newly registered model version and samples one image: ready, or failed and why."""

    model_id: int
    # Enough denoising steps to run every part of the sampler; the image itself is thrown away.
    steps: int = Field(default=2, ge=1, le=50)


def check_check_model(
    session: Session, project_id: int, params: CheckModelParams
) -> list[dict[str, Any]]:
    # A failed or archived model may be checked again (that is how a fixed model comes back).
    return check_model_ids(session, project_id, [params.model_id], usable=False)


class FitRatingsParams(JobParams):
    """Leaderboard of model versions from evaluation votes, plus annotator quality."""

    ties: Literal["half", "davidson"] = "half"
    bootstrap: int = Field(default=1000, ge=0, le=20_000)
    # Below about 1e-6 the fit's regulariser underflows and the worker's optimiser fails.
    prior: float = Field(default=0.01, ge=1e-6, le=100)
    seed: Seed = 0


P = TypeVar("P", bound=JobParams)
# A check that needs the database (ids belong to the project...): returns error dicts.
# Submission checks run for project jobs only (system jobs have none), so project_id is an int.
Checker = Callable[[Session, int, P], list[dict[str, Any]]]


def check_model_ids(
    session: Session, project_id: int, wanted: list[int], *, usable: bool = True
) -> list[dict[str, Any]]:
    """The ids are models of the project; with `usable`, none failed its check or is archived
    (raised as `ModelUnusable`, a conflict with the model's state rather than bad input)."""
    from app.generators.models import ModelVersion
    from app.generators.service import refuse_unusable

    found = list(
        session.scalars(
            select(ModelVersion).where(
                ModelVersion.id.in_(wanted), ModelVersion.project_id == project_id
            )
        )
    )
    missing = [i for i in wanted if i not in {m.id for m in found}]
    if missing:
        return [{"loc": ["params", "model_ids"], "msg": f"not models of this project: {missing}"}]
    if usable:
        refuse_unusable(found)
    return []


def check_generate(
    session: Session, project_id: int, params: GenerateParams
) -> list[dict[str, Any]]:
    errors = check_model_ids(session, project_id, params.model_ids)
    seeds = params.seeds
    if seeds is not None and len(seeds) != params.images_per_prompt:
        errors.append({"loc": ["params", "seeds"], "msg": "needs exactly images_per_prompt seeds"})
    if (params.best_of or 1) > 1 or params.reward_model_id is not None:
        errors.extend(check_reward_model(session, project_id, params.reward_model_id))
    return errors


# The CLIP behind `"backbone": "clip"`: ViT-L/14, the family HPS and ImageReward build on.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
# Learning rates when none is named: the from-scratch toy backbone trains at 3e-3; PickScore
# fine-tunes CLIP at 1e-6.
DEFAULT_REWARD_LR = {"toyconv": 3e-3, "clip": 1e-6}


def check_reward_model(
    session: Session, project_id: int, reward_model_id: int | None
) -> list[dict[str, Any]]:
    """The named reward model belongs to the project, or (none named) the project has one."""
    from app.pairs.active import latest_reward_model
    from app.ratings.models import RewardModel

    if reward_model_id is None:
        if latest_reward_model(session, project_id) is None:
            return [
                {
                    "loc": ["params", "reward_model_id"],
                    "msg": "the project has no reward model yet; run train_reward first",
                }
            ]
        return []
    row = session.get(RewardModel, reward_model_id)
    if row is None or row.project_id != project_id:
        return [{"loc": ["params", "reward_model_id"], "msg": "not a reward model of this project"}]
    return []


class RewardTrainingParams(JobParams):
    """The settings of one reward-model training run: what `worker.reward_model` reads."""

    # "toyconv" (small convnet, for the toy world), "clip" (openai/clip-vit-large-patch14) or a
    # CLIP hub id / local directory.
    backbone: str = Field(default="toyconv", min_length=1, max_length=500)
    # None: cosine for CLIP (PickScore's logit), an MLP for toyconv.
    head: Literal["cosine", "mlp"] | None = None
    steps: int = Field(default=1500, ge=1, le=200_000)
    batch_size: int = Field(default=64, ge=1, le=4096, description="PickScore: 128")
    # None: 3e-3 for toyconv, 1e-6 (PickScore) for CLIP.
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    # None: 1e-2 for toyconv, 1e-4 for CLIP.
    weight_decay: float | None = Field(default=None, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    val_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of prompts held out")
    # None: about ten validation points per run, at most every 100 steps.
    eval_every: int | None = Field(default=None, ge=1)
    patience: int = Field(
        default=5, ge=1, description="evaluations without a better validation loss before stopping"
    )
    # Prompts held out from training and validation alike: the accuracy the job reports.
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="share of prompts for test")
    # toyconv only: "spatial" keeps where things are (coordinates, per-position word maps);
    # "pooled" is the earlier position-blind backbone, kept as a baseline.
    toy_arch: Literal["spatial", "pooled"] = "spatial"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # Fresh initialisations trained on the same split, the one with the best validation loss
    # kept. None: 3 for toyconv, 1 for CLIP. A small model from scratch sometimes memorises
    # pairs before it finds the rule: on prompted-position votes one initialisation in three
    # stayed at chance (test 0.50) where the others reached 0.78.
    restarts: int | None = Field(default=None, ge=1, le=16)
    embed_dim: int = Field(default=32, ge=1, le=4096, description="toyconv only")
    conv_channels: int = Field(default=16, ge=1, le=1024, description="toyconv only")
    # None: 64 for CLIP; 16 for toyconv (a small toy head has less room to memorise images
    # than to learn the rule).
    head_hidden: int | None = Field(default=None, ge=1, le=8192)

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str) -> str:
        value = value.strip()
        if value in ("toyconv", "clip") or value.startswith(("/", "./")):
            return value
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value):
            raise ValueError("must be 'toyconv', 'clip', a CLIP hub id (org/name) or a path")
        return value

    @property
    def family(self) -> Literal["toyconv", "clip"]:
        return "toyconv" if self.backbone == "toyconv" else "clip"

    @property
    def clip_model(self) -> str | None:
        """The CLIP hub id or directory a clip backbone loads."""
        if self.family != "clip":
            return None
        return DEFAULT_CLIP_MODEL if self.backbone == "clip" else self.backbone

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_REWARD_LR[self.family]

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, min(100, self.steps // 10))

    @property
    def resolved_head(self) -> str:
        return self.head or ("cosine" if self.family == "clip" else "mlp")

    def resolved_head_hidden(self) -> int:
        if self.head_hidden is not None:
            return self.head_hidden
        return 64 if self.family == "clip" else 16

    def resolved_restarts(self) -> int:
        if self.restarts is not None:
            return self.restarts
        return 1 if self.family == "clip" else 3

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.family == "clip" else 1e-2

    @model_validator(mode="after")
    def _leaves_training_prompts(self) -> RewardTrainingParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave prompts to train on")
        return self


class TrainRewardParams(RewardTrainingParams):
    """A reward model r(prompt, image) from a snapshot of the project's votes."""

    # soft: a tie is a (0.5, 0.5) target, as PickScore trains; drop: ties are left out.
    tie_policy: Literal["drop", "soft"] = "soft"


class ScoreImagesParams(JobParams):
    """Reward scores of model versions' images (per image, and each model's mean)."""

    reward_model_id: int | None = Field(default=None, description="default: the latest version")
    model_ids: list[int] | None = Field(default=None, min_length=1, max_length=50)
    split: Literal["train", "val", "test", "all"] = "all"
    batch_size: int = Field(default=64, ge=1, le=1024)

    _distinct = field_validator("model_ids")(distinct_ids)


def check_train_reward(
    session: Session, project_id: int, params: TrainRewardParams
) -> list[dict[str, Any]]:
    from app.ratings.snapshots import usable_vote_counts

    decisive, prompts = usable_vote_counts(session, project_id)
    if decisive == 0 or prompts < 2:
        return [
            {
                "loc": ["params"],
                "msg": "no usable votes: training needs left/right votes on non-gold pairs of "
                f"at least two prompts (found {decisive} over {prompts} prompts)",
            }
        ]
    return []


def check_score_images(
    session: Session, project_id: int, params: ScoreImagesParams
) -> list[dict[str, Any]]:
    from app.pairs.active import latest_reward_model
    from app.ratings.models import RewardModel

    errors = check_model_ids(session, project_id, params.model_ids or [])
    wanted = params.reward_model_id
    if wanted is None:
        if latest_reward_model(session, project_id) is None:
            errors.append({"loc": ["params"], "msg": "the project has no reward model yet"})
    else:
        row = session.get(RewardModel, wanted)
        if row is None or row.project_id != project_id:
            errors.append(
                {"loc": ["params", "reward_model_id"], "msg": "not a reward model of this project"}
            )
    return errors


# Layers a LoRA adapts (worker.lora resolves them per UNet class): attention projections only,
# or the convolutions too, or every linear/conv layer of the UNet.
LoraTargets = Literal["attention", "attention+conv", "all"]

# The default Diffusion-DPO recipe: what `train_dpo` runs when a lead gives only `model_id`.
# DPOTrainingParams defaults to it and the README states it (a test checks both); the sweep that
# chose it is benchmarks/dpo_recipe.py on the toy model (figures in the README).
DPO_RECIPE: dict[str, Any] = {
    "lora_targets": "attention+conv",
    "lora_rank": 8,
    "beta": 2000.0,
    "learning_rate": 1e-3,
    "steps": 300,
    "batch_size": 8,
}


class DPOTrainingParams(JobParams):
    """The hyper-parameters of one Diffusion-DPO run: what `worker.dpo_train` reads."""

    # β in the paper convention, softplus((β/2)(Δθ − Δref)) (see worker.dpo). 5000 is the
    # paper's value for SD 1.5 with per-sample errors averaged over C·H·W (the diffusers
    # example's 2500 is the same objective). It suits the toy model too (toy-v1, LoRA rank 8,
    # lr 1e-4, 8 pairs per step, right- vs wrong-colour pairs, 120 steps): held-out implicit
    # accuracy 0.965 with the winners' denoising error unchanged. β = 50 or 500 learn the ranking
    # as fast but make the winners worse too: too weak a pull towards the reference.
    beta: float = Field(default=DPO_RECIPE["beta"], gt=0)
    beta_convention: Literal["paper", "diffusers"] = "paper"
    # "sigmoid" is Diffusion-DPO; "hinge" and "ipo" are the variants; "sft" trains the plain
    # denoising loss on winners only (the paper's baseline) while still logging the DPO margins.
    loss: Literal["sigmoid", "hinge", "ipo", "sft"] = "sigmoid"
    steps: int = Field(default=DPO_RECIPE["steps"], ge=1, le=100_000, description="optimizer steps")
    # The paper uses 1e-8 × effective batch for the full UNet; LoRA tolerates larger rates (the
    # diffusers example sweeps 1e-5 … 5e-4). On the toy model 1e-4 suits LoRA for colour; moving
    # shapes needs more (DPO_RECIPE).
    learning_rate: float = Field(default=DPO_RECIPE["learning_rate"], gt=0, le=1.0)
    weight_decay: float = Field(default=1e-2, ge=0, le=1.0, description="AdamW")
    # 0 trains the full UNet against a frozen copy; > 0 trains a LoRA on `lora_targets`
    # (alpha = rank, so the saved adapter loads unchanged in plain diffusers). Attention alone
    # cannot move a shape on the toy UNet (its attention has no position signal).
    lora_rank: int = Field(
        default=DPO_RECIPE["lora_rank"], ge=0, le=256, description="0 = full fine-tuning"
    )
    lora_targets: LoraTargets = DPO_RECIPE["lora_targets"]
    batch_size: int = Field(
        default=DPO_RECIPE["batch_size"], ge=1, le=1024, description="pairs per micro-batch"
    )
    grad_accum: int = Field(default=1, ge=1, le=1024, description="micro-batches per step")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up, then constant")
    max_grad_norm: float = Field(default=1.0, ge=0, description="0: no clipping")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # Share of pairs whose prompt is replaced by the empty prompt (the paper: 0.2), which keeps
    # the unconditional branch used by classifier-free guidance in training.
    empty_prompt_prob: float = Field(default=0.0, ge=0, le=1)
    # soft: a pair's label P(w ≻ l) (0.5 for a tie) trains as a soft label; drop: ties are left
    # out, as in the original code. None in a job: the project's setting.
    tie_policy: Literal["drop", "soft"] | None = None
    checkpoint_every: int = Field(default=50, ge=1)
    keep_last: int = Field(default=2, ge=1, le=100, description="checkpoints kept on disk")
    # softplus starts at ln 2 ≈ 0.69; a mean loss this high means the policy ranks pairs far
    # worse than the reference, which in practice is a blown-up run (noise images).
    explode_loss: float = Field(default=50.0, gt=0)
    seed: Seed = 0

    @property
    def soft_labels(self) -> bool:
        return self.tie_policy != "drop"


class PairDataParams(JobParams):
    """Which pairs a method trains on (`worker.pairs_source`): votes, reward-labelled, or both."""

    data: Literal["votes", "reward", "votes+reward"] = "votes"
    # The labeller of on-policy pairs; default: the project's latest reward model.
    reward_model_id: int | None = None
    reward_candidates: int = Field(default=8, ge=2, le=64, description="samples per train prompt")
    reward_pairs_per_prompt: int = Field(default=1, ge=1, le=32)
    # Keep a best-vs-worst pair only when the reward model's P(best ≻ worst) reaches this.
    reward_threshold: float = Field(default=0.75, ge=0.5, lt=1.0)


class ChildJobParams(JobParams):
    """What every job that trains a child of `model_id` says about the child and its run."""

    model_id: int
    # A soft time limit: checkpoint and re-queue after this long; the next attempt resumes.
    time_limit_minutes: float | None = Field(default=None, gt=0)
    name: str | None = Field(default=None, max_length=200)
    # After success: evaluate child vs parent and enter the child into the arena.
    closed_loop: bool = True
    arena_images_per_prompt: int = Field(default=2, ge=1, le=16)


class TrainDPOParams(DPOTrainingParams, PairDataParams, ChildJobParams):
    """Diffusion-DPO on the project's votes, producing a child of `model_id`."""


class EvaluateParams(JobParams):
    """Parent vs child on held-out prompts with the same seeds, judged by a reward model."""

    model_ids: list[int] = Field(min_length=2, max_length=2, description="[parent, child]")
    split: Literal["train", "val", "test", "all"] = "test"
    # By default each prompt gets its own evaluation seeds (worker.seeds, a range no training
    # image uses); `seeds` applies the same ones to every prompt instead.
    seeds: list[Seed] | None = Field(default=None, min_length=1, max_length=64)
    images_per_prompt: int = Field(default=4, ge=1, le=64)
    reward_model_id: int | None = None

    _distinct = field_validator("model_ids", "seeds")(distinct_ids)


def check_train_dpo(
    session: Session, project_id: int, params: TrainDPOParams
) -> list[dict[str, Any]]:
    from app.ratings.snapshots import usable_vote_counts

    errors = check_model_ids(session, project_id, [params.model_id])
    if errors:
        return errors
    # A LoRA on a model that already has an adapter is merged into a whole-pipeline child.
    data = params.data
    if data != "votes":
        errors.extend(check_reward_model(session, project_id, params.reward_model_id))
    decisive, _ = usable_vote_counts(session, project_id)
    if decisive == 0 and data != "reward":
        errors.append({"loc": ["params"], "msg": "the project has no votes to train on yet"})
    return errors


def check_evaluate(
    session: Session, project_id: int, params: EvaluateParams
) -> list[dict[str, Any]]:
    from app.ratings.models import RewardModel

    errors = check_model_ids(session, project_id, params.model_ids)
    rm_id = params.reward_model_id
    if rm_id is not None:
        row = session.get(RewardModel, rm_id)
        if row is None or row.project_id != project_id:
            errors.append(
                {"loc": ["params", "reward_model_id"], "msg": "not a reward model of this project"}
            )
    elif (
        session.scalar(select(RewardModel.id).where(RewardModel.project_id == project_id).limit(1))
        is None
    ):
        errors.append(
            {
                "loc": ["params", "reward_model_id"],
                "msg": "the project has no reward model yet; run train_reward first",
            }
        )
    return errors


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobKind(Generic[P]):
    name: str
    params: type[P]
    queue: str
    # "module:function" of the worker's handler; it receives the validated params model.
    handler: str
    check: Checker[P] | None = None
    # Project jobs' handlers get a context whose project_id is an int.
    needs_project: bool = True

    def queue_for(self, params: P) -> str:
        return str(getattr(params, "queue", self.queue))


KINDS: dict[str, JobKind[Any]] = {}


def register_kind(kind: JobKind[Any]) -> JobKind[Any]:
    KINDS[kind.name] = kind
    return kind


register_kind(
    JobKind(
        "selftest",
        SelftestParams,
        queue="cpu",
        handler="worker.tasks.selftest:selftest",
        needs_project=False,
    )
)
register_kind(
    JobKind(
        "generate",
        GenerateParams,
        queue="gpu",
        handler="worker.tasks.generate:generate",
        check=check_generate,
    )
)
register_kind(
    JobKind(
        "check_model",
        CheckModelParams,
        queue="gpu",
        handler="worker.tasks.check:check_model",
        check=check_check_model,
    )
)
register_kind(
    JobKind(
        "fit_ratings", FitRatingsParams, queue="cpu", handler="worker.tasks.ratings:fit_ratings"
    )
)
register_kind(
    JobKind(
        "train_reward",
        TrainRewardParams,
        queue="gpu",
        handler="worker.tasks.reward:train_reward",
        check=check_train_reward,
    )
)
register_kind(
    JobKind(
        "score_images",
        ScoreImagesParams,
        queue="gpu",
        handler="worker.tasks.reward:score_images_job",
        check=check_score_images,
    )
)
register_kind(
    JobKind(
        "train_dpo",
        TrainDPOParams,
        queue="gpu",
        handler="worker.tasks.dpo:train_dpo",
        check=check_train_dpo,
    )
)
register_kind(
    JobKind(
        "evaluate",
        EvaluateParams,
        queue="gpu",
        handler="worker.tasks.evaluate:evaluate",
        check=check_evaluate,
    )
)


# The default online-RL recipe: what `train_rl` runs when a lead gives only `model_id` and a
# reward model. RLTrainingParams defaults to it and the README states it (a test checks both);
# chosen with benchmarks/rl_loop.py on the toy model (figures in the README). `train_timesteps`
# None trains every sampled denoising step.
RL_RECIPE: dict[str, Any] = {
    "objective": "reward_backprop",
    "steps": 60,
    "prompts_per_step": 8,
    "group_size": 8,
    "train_timesteps": None,
    "timestep_weighting": "uniform",
    "minibatches": 1,
    "learning_rate": 3e-4,
    "kl_coef": 0.01,
    "lora_targets": "attention+conv",
    "lora_rank": 8,
    "fidelity_weight": None,
}
# What fidelity_weight None means on a toy model: the recogniser's log-likelihood of the named
# shape and colour at this weight beside the reward model's score (measured with rl_loop: it kept
# "larger" at 88 % while its fidelity loss went from 8.9 points to 0.9).
TOY_FIDELITY_WEIGHT = 1.0


class RLTrainingParams(JobParams):
    """The hyper-parameters of one online RL run with a KL anchor to the parent (reward
    backpropagation through the sampling chain, or GRPO / DDPO policy gradients): what
    `worker.rl_train` reads. Defaults: RL_RECIPE and the guard's limits."""

    # "reward_backprop": the reward model's own gradient through the whole sampling chain
    # (AlignProp, DRaFT); needs a differentiable reward (a reward model, no fidelity weight).
    # "policy_gradient": GRPO/DDPO on the sampled chains' log-probabilities (any reward). On
    # the toy battery backprop moved spatial preferences (left 97 %, centered 72 %) where
    # policy gradients stayed at 50–58 % (README, "The default RL recipe").
    objective: Literal["policy_gradient", "reward_backprop"] = RL_RECIPE["objective"]
    steps: int = Field(
        default=RL_RECIPE["steps"], ge=1, le=100_000, description="sample → score → update rounds"
    )
    prompts_per_step: int = Field(default=RL_RECIPE["prompts_per_step"], ge=1, le=1024)
    # G images per prompt (Flow-GRPO: 24 on SD3.5; DDPO: no groups).
    group_size: int = Field(default=RL_RECIPE["group_size"], ge=1, le=256)
    sample_steps: int = Field(default=10, ge=1, le=1000, description="denoising steps sampled")
    # DDIM stochasticity while training (DDPO: 1.0); the policy gradient needs η > 0.
    eta: float = Field(default=1.0, gt=0, le=1)
    # Classifier-free guidance while sampling and training; None: the model's own setting.
    guidance_scale: float | None = Field(default=None, ge=0)
    # K of the T denoising steps trained per trajectory, drawn at random per trajectory
    # (Flow-GRPO's denoising reduction); None: all T (DDPO). On the toy model a random 4 of 10
    # with 4 minibatches lowered the reward where every step and one update raised it.
    train_timesteps: int | None = Field(default=RL_RECIPE["train_timesteps"], ge=1, le=1000)
    # How the trained transitions of a trajectory weigh in the policy loss. A transition's
    # log-prob gradient scales as 1/σ_t, so with "uniform" the last, nearly noise-free steps
    # (σ ≈ 0.02–0.04 of 10 DDIM steps) carry 10–15× the gradient of the early ones that decide
    # the layout; "sigma" weighs each by σ_t / mean σ, evening them out (TempFlow-GRPO's
    # noise-aware weighting, in spirit).
    timestep_weighting: Literal["uniform", "sigma"] = RL_RECIPE["timestep_weighting"]
    ppo_epochs: int = Field(default=1, ge=1, le=100, description="passes over each batch")
    # Optimizer steps per pass; with 1 (the default) each batch gets one exactly on-policy
    # update, so the clip range never binds.
    minibatches: int = Field(default=RL_RECIPE["minibatches"], ge=1, le=1024)
    clip_range: float = Field(default=1e-3, gt=0, le=1, description="PPO ε on the ratio")
    adv_clip_max: float = Field(default=5.0, gt=0, description="advantages clipped to ±this")
    advantage: Literal["group", "prompt"] = "group"  # GRPO groups or DDPO per-prompt baseline
    kl_coef: float = Field(
        default=RL_RECIPE["kl_coef"], ge=0, description="weight of KL(π_θ ‖ π_parent)"
    )
    learning_rate: float = Field(default=RL_RECIPE["learning_rate"], gt=0, le=1.0)
    weight_decay: float = Field(default=1e-4, ge=0, le=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    lora_rank: int = Field(
        default=RL_RECIPE["lora_rank"], ge=0, le=256, description="0 = full fine-tuning"
    )
    lora_targets: LoraTargets = RL_RECIPE["lora_targets"]
    # Weight of the prompt-fidelity term in the training reward: the toy recogniser's mean
    # log-probability of the prompt's named shape and colour (toy models only; differentiable,
    # so both objectives can use it). The guard's fidelity is still read by the toy reader.
    # None: TOY_FIDELITY_WEIGHT on a toy model, 0 on others (no recogniser for them).
    fidelity_weight: float | None = Field(default=RL_RECIPE["fidelity_weight"], ge=0)
    # Reward-hacking guard, on the probe set.
    eval_every: int = Field(default=10, ge=1)
    max_fidelity_drop: float = Field(default=0.05, ge=0, le=1)
    max_reward_divergence: float = Field(default=1.5, gt=0)
    checkpoint_every: int = Field(default=10, ge=1)
    keep_last: int = Field(default=2, ge=1, le=100)
    seed: Seed = 0

    @model_validator(mode="after")
    def _consistent(self) -> RLTrainingParams:
        if self.train_timesteps is not None and self.train_timesteps > self.sample_steps:
            raise ValueError("train_timesteps must not exceed sample_steps")
        if self.advantage == "group" and self.group_size < 2:
            raise ValueError("group advantages need group_size ≥ 2")
        if (self.prompts_per_step * self.group_size) % self.minibatches:
            raise ValueError("minibatches must divide prompts_per_step × group_size")
        return self

    def fidelity_weight_for(self, toy: bool) -> float:
        """The fidelity term's weight for a toy model or another."""
        if self.fidelity_weight is not None:
            return self.fidelity_weight
        return TOY_FIDELITY_WEIGHT if toy else 0.0

    @property
    def timesteps_per_trajectory(self) -> int:
        """K: the denoising steps trained per sampled trajectory."""
        return self.sample_steps if self.train_timesteps is None else self.train_timesteps


class TrainRLParams(RLTrainingParams, ChildJobParams):
    """Online RL from the project's reward model, producing a child of `model_id`."""

    reward_model_id: int | None = Field(default=None, description="default: the latest")
    # A second, independently trained reward model watching for reward hacking on held-out
    # prompts; default: the newest other reward model of the project (none: fidelity only).
    guard_reward_model_id: int | None = None
    # Training reward = reward_weight · reward model + fidelity_weight · prompt fidelity.
    reward_weight: float = Field(default=1.0, ge=0)
    probe_prompts: int = Field(default=16, ge=1, le=1024)


def check_train_rl(
    session: Session, project_id: int, params: TrainRLParams
) -> list[dict[str, Any]]:
    from app.generators.models import ModelVersion
    from app.pairs.active import latest_reward_model
    from app.projects.models import Prompt
    from app.ratings.models import RewardModel

    errors = check_model_ids(session, project_id, [params.model_id])
    model = session.get(ModelVersion, params.model_id)
    if model is not None and model.adapter and params.lora_rank > 0:
        errors.append(
            {
                "loc": ["params", "lora_rank"],
                "msg": f"model {model.id} already has an adapter; train it with lora_rank 0 "
                "(full fine-tuning) to build on it",
            }
        )
    for key in ("reward_model_id", "guard_reward_model_id"):
        wanted = getattr(params, key)
        row = session.get(RewardModel, wanted) if wanted is not None else None
        if wanted is not None and (row is None or row.project_id != project_id):
            errors.append({"loc": ["params", key], "msg": "not a reward model of this project"})
    if (
        params.reward_model_id is None
        and params.reward_weight > 0
        and latest_reward_model(session, project_id) is None
    ):
        errors.append(
            {"loc": ["params"], "msg": "the project has no reward model yet; run train_reward"}
        )
    if params.reward_weight == 0 and params.fidelity_weight == 0:
        errors.append({"loc": ["params", "reward_weight"], "msg": "every scorer weight is 0"})
    has_train_prompt = session.scalar(
        select(Prompt.id).where(Prompt.project_id == project_id, Prompt.split == "train").limit(1)
    )
    if has_train_prompt is None:
        errors.append({"loc": ["params"], "msg": "the project has no train-split prompts"})
    return errors


register_kind(
    JobKind(
        "train_rl",
        TrainRLParams,
        queue="gpu",
        handler="worker.tasks.rl:train_rl",
        check=check_train_rl,
    )
)


class TrainLoopParams(TrainDPOParams):
    """Iterative DPO: rounds of (relabel, DPO with the previous child as reference, evaluate).

    Each round's DPO takes every `TrainDPOParams` field from here; its child is a model version
    that enters the arena (`closed_loop`).
    """

    data: Literal["votes", "reward", "votes+reward"] = "votes+reward"
    rounds: int = Field(default=3, ge=1, le=20)
    # Before a round: retrain the reward model when votes arrived since the latest one was made.
    retrain_reward: bool = True
    # None: "toyconv" for toy models, "clip" otherwise.
    reward_backbone: str | None = Field(default=None, min_length=1, max_length=500)
    # Stop when the child's held-out mean reward beats its reference's by no more than this...
    min_reward_gain: float = 0.0
    # ...or when prompt fidelity (toy models) fell more than this below the first model's.
    max_fidelity_drop: float = Field(default=0.02, ge=0, le=1)
    # Held-out samples per prompt: enough that one image more or less is not a fidelity "drop".
    eval_images_per_prompt: int = Field(default=4, ge=1, le=16)


def check_train_loop(
    session: Session, project_id: int, params: TrainLoopParams
) -> list[dict[str, Any]]:
    from app.ratings.snapshots import usable_vote_counts

    errors = check_model_ids(session, project_id, [params.model_id])
    if errors:
        return errors
    if params.reward_model_id is not None:
        errors.extend(check_reward_model(session, project_id, params.reward_model_id))
    decisive, prompts = usable_vote_counts(session, project_id)
    if decisive == 0:
        errors.append({"loc": ["params"], "msg": "the project has no votes to train on yet"})
    elif not params.retrain_reward:
        errors.extend(check_reward_model(session, project_id, params.reward_model_id))
    elif prompts < 2 and check_reward_model(session, project_id, None):
        errors.append(
            {
                "loc": ["params"],
                "msg": "the first reward model needs votes on at least two prompts "
                f"(found {prompts})",
            }
        )
    return errors


register_kind(
    JobKind(
        "train_loop",
        TrainLoopParams,
        queue="gpu",
        handler="worker.tasks.loop:train_loop",
        check=check_train_loop,
    )
)
