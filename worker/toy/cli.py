"""`prefloop toy …`: train and evaluate the toy text-to-image model."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_OUT = Path("toy-model")


def _parse_snapshots(values: tuple[str, ...]) -> dict[int, Path]:
    snapshots: dict[int, Path] = {}
    for value in values:
        step, sep, path = value.partition("=")
        if not sep or not step.isdigit() or not path:
            raise click.BadParameter(f"expected STEP=DIR, got {value!r}", param_hint="--snapshot")
        snapshots[int(step)] = Path(path)
    return snapshots


@click.group("toy")
def toy_group() -> None:
    """The toy world's text-to-image model (coloured shapes, 32×32)."""


@toy_group.command("train")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--minutes", type=float, default=60.0, show_default=True, help="Wall-clock budget.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--dataset-size", type=int, default=20_000, show_default=True, hidden=True)
@click.option("--max-steps", type=int, default=4000, show_default=True, help="UNet steps.")
@click.option("--vae-steps", type=int, default=3000, show_default=True, help="VAE steps.")
@click.option(
    "--snapshot",
    "snapshots",
    multiple=True,
    hidden=True,
    help="STEP=DIR: also save the model as it is after STEP UNet steps.",
)
def train_command(
    out: Path,
    minutes: float,
    seed: int,
    threads: int,
    device: str,
    dataset_size: int,
    max_steps: int,
    vae_steps: int,
    snapshots: tuple[str, ...],
) -> None:
    """Train the toy model from scratch and save it as a diffusers directory."""
    from worker.toy.train import ToyTrainConfig, train_toy_model

    cfg = ToyTrainConfig(
        minutes=minutes,
        seed=seed,
        threads=threads,
        device=device,
        dataset_size=dataset_size,
        unet_max_steps=max_steps,
        vae_max_steps=vae_steps,
        snapshots=_parse_snapshots(snapshots),
    )
    path = train_toy_model(out, cfg)
    click.echo(f"saved {path}")


@toy_group.command("evaluate")
@click.argument("model", default="toy")
@click.option("-n", "n", type=int, default=200, show_default=True, help="Prompts to generate.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the toy's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads.")
def evaluate_command(model: str, n: int, steps: int | None, seed: int, threads: int) -> None:
    """Generate for sampled prompts and report how often each prompted attribute shows."""
    import torch

    from worker.toy import resolve_toy
    from worker.toy.evaluate import DEFAULT_STEPS, evaluate_alignment
    from worker.toy.model import load_pipeline

    torch.set_num_threads(max(1, threads))
    path = resolve_toy(model) or Path(model)
    if not (path / "model_index.json").is_file():
        raise click.BadParameter(f"no toy model at {path}", param_hint="MODEL")
    report = evaluate_alignment(load_pipeline(path), n=n, seed=seed, steps=steps or DEFAULT_STEPS)
    click.echo(report.summary())


@toy_group.command("train-recogniser")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Weights file (default: the shipped one).")  # fmt: skip
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps (default: as shipped).")  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="torch CPU threads.")  # fmt: skip
def train_recogniser_command(out: Path | None, steps: int | None, seed: int, threads: int) -> None:
    """Train the shape/colour recogniser behind reward backpropagation's fidelity term."""
    import torch

    from worker.toy.recogniser import DEFAULT_STEPS, WEIGHTS, save_recogniser, train_recogniser

    torch.set_num_threads(threads)
    total = DEFAULT_STEPS if steps is None else steps
    with click.progressbar(length=total, label="training the recogniser") as bar:
        model = train_recogniser(total, seed=seed, on_step=lambda _step, _loss: bar.update(1))
    click.echo(f"saved {save_recogniser(model, out or WEIGHTS)}")
