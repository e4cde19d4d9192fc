"""The toy recogniser: the differentiable fidelity term of the RL reward."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from worker.rl_train import ToyRecogniserScorer
from worker.toy.cli import toy_group
from worker.toy.recogniser import (
    default_recogniser,
    fidelity_log_likelihood,
    load_recogniser,
    named_labels,
    train_recogniser,
    training_batch,
)
from worker.toy.world import COLOURS, SHAPES, degrade, render


def test_fidelity_log_likelihood_by_hand() -> None:
    shape_logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    colour_logits = torch.zeros(2, 6)
    colour_logits[0, 2] = math.log(5.0)
    # Image 0 names shape 1 and colour 2; image 1 names neither.
    value = fidelity_log_likelihood(
        shape_logits, colour_logits, torch.tensor([1, -1]), torch.tensor([2, -1])
    )
    # p(shape 1) = 3 / 6, p(colour 2) = 5 / 10: the mean of the two log-probabilities.
    expected = (math.log(3 / 6) + math.log(5 / 10)) / 2
    torch.testing.assert_close(value, torch.tensor([expected, 0.0]))
    # Only the colour named: its log-probability alone.
    only_colour = fidelity_log_likelihood(
        shape_logits[:1], colour_logits[:1], torch.tensor([-1]), torch.tensor([2])
    )
    torch.testing.assert_close(only_colour, torch.tensor([math.log(0.5)]))


def test_named_labels_follow_the_prompt() -> None:
    shapes, colours = named_labels(["a red circle", "a square on the left", "something"])
    assert shapes.tolist() == [SHAPES.index("circle"), SHAPES.index("square"), -1]
    assert colours.tolist() == [COLOURS.index("red"), -1, -1]


def test_the_shipped_recogniser_reads_renders_it_never_saw() -> None:
    rng = np.random.default_rng(2024)  # training draws from seed 0
    images, shapes, colours = training_batch(rng, 400)
    with torch.no_grad():
        shape_logits, colour_logits = default_recogniser()(images)
    assert (shape_logits.argmax(1) == shapes).float().mean() >= 0.95
    assert (colour_logits.argmax(1) == colours).float().mean() >= 0.98


def test_the_fidelity_term_prefers_the_named_attributes_and_has_gradients() -> None:
    scorer = ToyRecogniserScorer()
    rng = np.random.default_rng(7)
    red_circle = degrade(render("a large red circle on a gray background", rng), rng)
    blue_square = degrade(render("a large blue square on a gray background", rng), rng)
    pixels = torch.from_numpy(np.stack([red_circle, blue_square])).permute(0, 3, 1, 2) / 255.0
    pixels.requires_grad_(True)
    scores = scorer.differentiable(["a red circle", "a red circle"], pixels)  # (2,)
    assert scores[0] > scores[1] + 2.0  # log-probabilities: right beats wrong by e² or more
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad[1].abs().sum() > 0
    # Without gradients it gives the same values (the probe and policy-gradient path).
    torch.testing.assert_close(scorer(["a red circle"] * 2, pixels.detach()), scores.detach())
    # Images of another size are resized to the recogniser's 32 × 32.
    big = torch.nn.functional.interpolate(pixels.detach(), size=(64, 64), mode="nearest")
    assert scorer(["a red circle"] * 2, big)[0] > scorer(["a red circle"] * 2, big)[1]


def test_training_lowers_the_loss_and_the_cli_writes_a_loadable_recogniser(
    tmp_path: Path,
) -> None:
    losses: list[float] = []
    train_recogniser(steps=40, batch=32, on_step=lambda _s, loss: losses.append(loss))
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.3
    out = tmp_path / "recogniser.safetensors"
    result = CliRunner().invoke(
        toy_group, ["train-recogniser", "--steps", "2", "--out", str(out), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert isinstance(load_recogniser(out), torch.nn.Module)
    # Zero steps is a mistake, not "the default": refused by name, nothing written.
    zero = tmp_path / "zero.safetensors"
    refused = CliRunner().invoke(
        toy_group, ["train-recogniser", "--steps", "0", "--out", str(zero)]
    )
    assert refused.exit_code == 2 and "--steps" in refused.output and not zero.exists()
    with pytest.raises(FileNotFoundError, match="train-recogniser"):
        load_recogniser(tmp_path / "missing.safetensors")
