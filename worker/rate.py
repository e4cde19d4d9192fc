"""`prefloop rate`: an arena leaderboard (Elo-like ratings, bootstrap intervals) from battles."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from worker.battles import BattleFormatError, Battles, load_battles
from worker.bradley_terry import (
    DEFAULT_PRIOR,
    TIE_MODES,
    DisconnectedComparisonsWarning,
    TieMode,
    bootstrap_bradley_terry,
    elo_scale,
    fit_bradley_terry,
    ranks_from_intervals,
)

DEFAULT_BOOTSTRAP = 1000
# Show the bootstrap progress bar from about this much work (resamples × model pairs).
PROGRESS_MIN_WORK = 200_000


@dataclass(frozen=True)
class LeaderboardRow:
    """One model on the Elo-like scale (rating = 400·s/ln 10 + 1000)."""

    model: str
    rating: float
    ci_low: float | None
    ci_high: float | None
    rank: int


def leaderboard(
    battles: Battles,
    *,
    ties: TieMode = "half",
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    prior: float = DEFAULT_PRIOR,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> list[LeaderboardRow]:
    """Rows sorted by rating, best first.

    With n_bootstrap ≥ 1 the interval is the 2.5–97.5 % bootstrap percentile range and the rank
    counts the models whose interval lies wholly above; with 0 there is no interval and the
    rank counts the models with a higher point rating.
    """
    counts = battles.counts()
    if n_bootstrap > 0:
        boot = bootstrap_bradley_terry(
            counts,
            n_bootstrap,
            ties=ties,
            prior=prior,
            seed=seed,
            on_progress=on_progress,
            item_names=battles.models,
        )
        ratings = elo_scale(boot.fit.scores)
        lows: list[float | None] = list(elo_scale(boot.lower))
        highs: list[float | None] = list(elo_scale(boot.upper))
        ranks = boot.ranks
    else:
        fit = fit_bradley_terry(counts, ties=ties, prior=prior, item_names=battles.models)
        ratings = elo_scale(fit.scores)
        lows = highs = [None] * len(battles.models)
        ranks = ranks_from_intervals(ratings, ratings)
    rows = [
        LeaderboardRow(
            model=name,
            rating=float(ratings[k]),
            ci_low=None if lows[k] is None else float(lows[k]),
            ci_high=None if highs[k] is None else float(highs[k]),
            rank=int(ranks[k]),
        )
        for k, name in enumerate(battles.models)
    ]
    return sorted(rows, key=lambda row: (-row.rating, row.model))


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

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DisconnectedComparisonsWarning)
        if n_bootstrap * battles.counts().n_pairs >= PROGRESS_MIN_WORK:
            with click.progressbar(
                length=n_bootstrap, label="bootstrap", file=click.get_text_stream("stderr")
            ) as bar:
                state = {"done": 0}

                def advance(done: int) -> None:
                    bar.update(done - state["done"])
                    state["done"] = done

                rows = leaderboard(
                    battles,
                    ties=ties,
                    n_bootstrap=n_bootstrap,
                    prior=prior,
                    seed=seed,
                    on_progress=advance,
                )
        else:
            rows = leaderboard(battles, ties=ties, n_bootstrap=n_bootstrap, prior=prior, seed=seed)
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)

    if not all(math.isfinite(row.rating) for row in rows):
        click.echo("Error: the fit produced non-finite ratings", err=True)
        raise SystemExit(1)
    payload = json.dumps([asdict(row) for row in rows], indent=2)
    table = format_table(rows)
    if out is None:
        click.echo(table, err=True)
        click.echo(payload)
        return
    target = Path(out)
    partial = target.with_name(target.name + ".partial")
    try:
        partial.write_text(payload + "\n", encoding="utf-8")
        partial.replace(target)  # readers never see a half-written file
    except OSError as error:
        click.echo(f"Error: cannot write {out}: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(table)
    click.echo(f"wrote {len(rows)} ratings to {out}")
