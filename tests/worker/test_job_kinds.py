"""The job-kind registry and the worker agree: every kind runs a handler, every handler is a kind,
and every option the worker supports can be asked for through the API's params models."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any, get_args, get_type_hints

import pytest
from pydantic import ValidationError

import worker.tasks
from app.generators.schemas import GenerationParams, SchedulerName
from app.jobs.kinds import (
    KINDS,
    DPOTrainingParams,
    RewardTrainingParams,
    TrainDPOParams,
    TrainRewardParams,
)
from worker import dpo_train, reward_model
from worker.generation import DTYPES, SCHEDULER_NAMES, GeneratorSpec
from worker.runner import JobContext, ProjectJobContext, resolve_handler


def _worker_handlers() -> dict[str, Any]:
    """Every public function in worker.tasks whose only parameter is a job context."""
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(worker.tasks.__path__):
        module = importlib.import_module(f"worker.tasks.{info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__ or name.startswith("_"):
                continue
            params = list(inspect.signature(fn).parameters)
            if params != ["ctx"]:
                continue
            hint = get_type_hints(fn, vars(module)).get("ctx")
            origin = getattr(hint, "__origin__", hint)
            if inspect.isclass(origin) and issubclass(origin, JobContext):
                found[f"{module.__name__}:{name}"] = fn
    return found


def test_every_kind_names_a_handler_and_every_handler_is_a_kind() -> None:
    handlers = _worker_handlers()
    by_kind = {name: resolve_handler(kind) for name, kind in KINDS.items()}
    assert {kind.handler for kind in KINDS.values()} == set(handlers)
    for name, kind in KINDS.items():
        assert by_kind[name] is handlers[kind.handler]


def test_each_handler_takes_its_kinds_params_model_and_context() -> None:
    for kind in KINDS.values():
        fn = resolve_handler(kind)
        hint = get_type_hints(fn, vars(importlib.import_module(fn.__module__)))["ctx"]
        context, (params,) = hint.__origin__, get_args(hint)
        assert params is kind.params, kind.name
        # Project jobs see an int project_id; system jobs a plain context.
        assert (context is ProjectJobContext) == kind.needs_project, kind.name


def test_every_scheduler_and_dtype_the_worker_supports_is_accepted_by_the_api() -> None:
    assert set(get_args(SchedulerName)) == set(SCHEDULER_NAMES)
    for name in SCHEDULER_NAMES:
        assert GenerationParams(scheduler=name).scheduler == name
    for dtype in DTYPES:
        assert GenerationParams(dtype=dtype).dtype == dtype
    with pytest.raises(ValidationError):
        GenerationParams(scheduler="heun_xl")  # type: ignore[arg-type]


def test_the_worker_samples_with_the_api_defaults() -> None:
    spec = GeneratorSpec.from_params("toy", None, {})
    assert spec.model_dump(exclude={"base", "adapter"}) == GenerationParams().model_dump()
    stored = GenerationParams(scheduler="unipc", steps=7).model_dump()
    assert GeneratorSpec.from_params("toy", None, stored).scheduler == "unipc"


def test_trainers_read_the_job_params_models() -> None:
    # No second config class: the trainers' config types are the params models themselves.
    assert dpo_train.DPOConfig is DPOTrainingParams
    assert issubclass(TrainDPOParams, DPOTrainingParams)
    assert reward_model.RewardTrainConfig is RewardTrainingParams
    assert issubclass(TrainRewardParams, RewardTrainingParams)
    # Every option a trainer reads is a field of the job's params, settable through the API.
    assert set(DPOTrainingParams.model_fields) <= set(TrainDPOParams.model_fields)
    assert set(RewardTrainingParams.model_fields) <= set(TrainRewardParams.model_fields)
    params = TrainDPOParams(model_id=1, weight_decay=0.0, keep_last=3, explode_loss=9.0)
    assert (params.weight_decay, params.keep_last, params.explode_loss) == (0.0, 3, 9.0)


def test_dpo_training_settings_survive_a_json_round_trip() -> None:
    # The row stores the model's JSON; the worker re-validates it into the same model.
    params = TrainDPOParams(model_id=4, loss="ipo", tie_policy="drop", learning_rate=3e-4)
    again = TrainDPOParams.model_validate(params.model_dump(mode="json"))
    assert again == params and not again.soft_labels
