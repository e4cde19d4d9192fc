"""Battle records (FastChat arena format or prefloop vote exports) → comparison arrays.

Accepted input: a JSON list of records, or JSON Lines (one record per line). Each record is an
object with string fields `model_a` and `model_b` and either
- `winner` ∈ {"model_a", "model_b", "tie", "tie (bothbad)"} (FastChat; `judge`, `tstamp`,
  `question_id`, `anony` and any other fields are ignored), or
- `choice` ∈ {"left", "right", "tie", "both_bad", "skip"} (a prefloop vote, with `model_a` the
  model shown on the left): "both_bad" is a tie and "skip" is no data.
Records are numbered from 0 in error messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.ratings.bradley_terry import PairCounts, aggregate_comparisons
from app.votes.vocabulary import Choice

SKIP = -1
# Both tables come from the vote vocabulary: FastChat's `winner` and prefloop's `choice`.
WINNER_VALUES: dict[str, int] = {
    c.fastchat_winner: int(c.outcome)
    for c in Choice
    if c.fastchat_winner is not None and c.outcome is not None
}
CHOICE_VALUES: dict[str, int] = {
    c.value: SKIP if c.outcome is None else int(c.outcome) for c in Choice
}


class BattleFormatError(ValueError):
    """The battle input cannot be read; the message names the offending record."""


@dataclass(frozen=True)
class Battles:
    """Comparisons between named models; indices point into `models` (sorted)."""

    models: list[str]
    model_a: np.ndarray  # (V,) int64
    model_b: np.ndarray  # (V,) int64
    outcome: np.ndarray  # (V,) int8: OUTCOME_A, OUTCOME_B or OUTCOME_TIE
    n_skipped: int  # "skip" votes, which carry no data

    def counts(self) -> PairCounts:
        """Aggregate into counts per model pair."""
        return aggregate_comparisons(self.model_a, self.model_b, self.outcome, len(self.models))


def _record_outcome(index: int, record: object) -> tuple[str, str, int]:
    if not isinstance(record, dict):
        raise BattleFormatError(f"record {index}: expected an object, got {type(record).__name__}")
    names = []
    for key in ("model_a", "model_b"):
        if key not in record:
            raise BattleFormatError(f"record {index}: missing field '{key}'")
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise BattleFormatError(f"record {index}: '{key}' must be a non-empty string")
        names.append(value)
    if names[0] == names[1]:
        raise BattleFormatError(f"record {index}: model_a and model_b are both {names[0]!r}")
    if "winner" in record:
        field, table = "winner", WINNER_VALUES
    elif "choice" in record:
        field, table = "choice", CHOICE_VALUES
    else:
        raise BattleFormatError(f"record {index}: missing field 'winner' (or 'choice')")
    value = record[field]
    if not isinstance(value, str) or value not in table:
        expected = ", ".join(repr(v) for v in table)
        raise BattleFormatError(
            f"record {index}: unknown {field} {value!r}; expected one of {expected}"
        )
    return names[0], names[1], table[value]


def parse_battles(records: object) -> Battles:
    """Validate decoded JSON (a list of records) and turn it into comparison arrays."""
    if not isinstance(records, list):
        raise BattleFormatError(
            f"expected a JSON list of battle records, got {type(records).__name__}"
        )
    if not records:
        raise BattleFormatError("no battle records")
    parsed = [_record_outcome(k, rec) for k, rec in enumerate(records)]
    kept = [p for p in parsed if p[2] != SKIP]
    if not kept:
        raise BattleFormatError("no usable battle records (all are skips)")
    models = sorted({name for a, b, _ in kept for name in (a, b)})
    index = {name: k for k, name in enumerate(models)}
    return Battles(
        models=models,
        model_a=np.array([index[a] for a, _, _ in kept], dtype=np.int64),
        model_b=np.array([index[b] for _, b, _ in kept], dtype=np.int64),
        outcome=np.array([y for _, _, y in kept], dtype=np.int8),
        n_skipped=len(parsed) - len(kept),
    )


def parse_battles_text(text: str) -> Battles:
    """Parse a JSON list or JSON Lines text of battle records."""
    if not text.strip():
        raise BattleFormatError("empty input: no battle records")
    try:
        decoded = json.loads(text)
    except RecursionError:
        raise BattleFormatError("not valid battle JSON: nested too deeply") from None
    except json.JSONDecodeError as whole_error:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise BattleFormatError(
                f"not valid JSON: {whole_error.msg} at line {whole_error.lineno} "
                f"column {whole_error.colno}"
            ) from None
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise BattleFormatError(
                    f"record {k}: not valid JSON ({error.msg}); the input is neither a JSON "
                    "list nor JSON Lines"
                ) from None
            except RecursionError:
                raise BattleFormatError(f"record {k}: nested too deeply") from None
        return parse_battles(records)
    return parse_battles(decoded)


def load_battles(path: str | Path) -> Battles:
    """Read battle records from a file (JSON list or JSON Lines, UTF-8)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise BattleFormatError(f"cannot read the file: {reason}") from None
    return parse_battles_text(text)
