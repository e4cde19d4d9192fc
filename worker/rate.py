"""`prefloop rate`: an arena leaderboard (Elo-like ratings, bootstrap intervals) from battles."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import click

from app.core.storage import write_atomic
from app.ratings.battles import BattleFormatError, load_battles
from app.ratings.bradley_terry import DEFAULT_PRIOR, TIE_MODES, TieMode
from app.ratings.leaderboard import Leaderboard, LeaderboardRow, leaderboard

DEFAULT_BOOTSTRAP = 1000
# Show the bootstrap progress bar from about this much work (resamples × model pairs).
PROGRESS_MIN_WORK = 200_000


def format_table(rows: list[LeaderboardRow]) -> str:
    """A plain-text table of the leaderboard."""
    width = max([len("model")] + [len(row.model) for row in rows])
    lines = [f"{'rank':>4}  {'model':<{width}}  {'rating':>8}  {'95% interval':>19}"]
    for row in rows:
        interval = "" if row.ci_low is None else f"[{row.ci_low:8.1f}, {row.ci_high:8.1f}]"
        lines.append(f"{row.rank:>4}  {row.model:<{width}}  {row.rating:8.1f}  {interval:>19}")
    return "\n".join(lines)


@click.command("rate")
@click.argument("battles_file", metavar="BATTLES.json", type=click.Path(dir_okay=False))
@click.option(
    "--ties",
    type=click.Choice(TIE_MODES),
    default="half",
    show_default=True,
    help="half: a tie is half a win for each side (arena); davidson: Davidson's tie model.",
)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(min=0),
    default=DEFAULT_BOOTSTRAP,
    show_default=True,
    help="Bootstrap resamples for the 95% intervals and ranks; 0 for point ratings only.",
)
@click.option(
    "--prior",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_PRIOR,
    show_default=True,
    help="Gaussian prior strength λ (penalty λ/2·Σ s²); keeps unbeaten models finite.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the JSON here and print the table on stdout. Without it the JSON goes to "
    "stdout and the table to stderr.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap random seed.")
def rate_command(
    battles_file: str,
    ties: TieMode,
    n_bootstrap: int,
    prior: float,
    out: str | None,
    seed: int,
) -> None:
    """Rate models from battle records (a JSON list or JSON Lines).

    \b
    Records, FastChat battles or prefloop votes (model_a shown on the left):
      {"model_a", "model_b", "winner": "model_a|model_b|tie|tie (bothbad)"}
      {"model_a", "model_b", "choice": "left|right|tie|both_bad|skip"}

    prefloop's own JSONL export (`prefloop export --format jsonl`) is read as it is; same-model
    pairs in it are skipped and counted.

    Output: JSON [{"model", "rating", "ci_low", "ci_high", "rank"}], ratings on the Elo-like
    scale 400·s/ln 10 + 1000. Bad input exits with status 2 and names every bad record
    (numbered from 1).
    """
    try:
        battles = load_battles(battles_file)
    except BattleFormatError as error:
        for problem in error.problems:
            click.echo(f"Error: {battles_file}: {problem}", err=True)
        raise SystemExit(2) from None
    if battles.n_same_model:
        click.echo(
            f"Note: skipped {battles.n_same_model} same-model pairs (a model against itself "
            "says nothing about the ranking)",
            err=True,
        )

    counts = battles.counts()

    def rate(on_progress: Callable[[int], None] | None = None) -> Leaderboard:
        return leaderboard(
            counts,
            battles.models,
            ties=ties,
            n_bootstrap=n_bootstrap,
            prior=prior,
            seed=seed,
            on_progress=on_progress,
        )

    if n_bootstrap * counts.n_pairs >= PROGRESS_MIN_WORK:
        # sys.stderr, not click.get_text_stream: click's wrapper of the latter is typed `object`.
        with click.progressbar(length=n_bootstrap, label="bootstrap", file=sys.stderr) as bar:
            state = {"done": 0}

            def advance(done: int) -> None:
                bar.update(done - state["done"])
                state["done"] = done

            board = rate(advance)
    else:
        board = rate()
    for message in board.warnings:
        click.echo(f"Warning: {message}", err=True)
    rows = board.rows

    if not all(math.isfinite(row.rating) for row in rows):
        click.echo("Error: the fit produced non-finite ratings", err=True)
        raise SystemExit(1)
    payload = json.dumps([row.public() for row in rows], indent=2)
    table = format_table(rows)
    if out is None:
        click.echo(table, err=True)
        click.echo(payload)
        return
    try:
        write_atomic(Path(out), payload + "\n")  # readers never see a half-written file
    except OSError as error:
        click.echo(f"Error: cannot write {out}: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(table)
    click.echo(f"wrote {len(rows)} ratings to {out}")
