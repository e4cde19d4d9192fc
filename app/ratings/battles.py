"""Battle records (FastChat arena format or prefloop vote exports) → comparison arrays.

Accepted input: a JSON list of records, or JSON Lines (one record per line). Each record is an
object with string fields `model_a` and `model_b` and either
- `winner` ∈ {"model_a", "model_b", "tie", "tie (bothbad)"} (FastChat; `judge`, `tstamp`,
  `question_id`, `anony` and any other fields are ignored), or
- `choice` ∈ {"left", "right", "tie", "both_bad", "skip"} (a prefloop vote, with `model_a` the
  model shown on the left): "both_bad" is a tie and "skip" is no data. prefloop's own JSONL
  export has these fields on every line.
A record comparing a model with itself (a same-model pair) carries no information about the
ranking: it is skipped and counted. Error messages name every bad record, numbered from 1
(`record N` in a JSON list, `line N` in JSON Lines).
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
SAME_MODEL = -2
# Bad records named in one error, at most.
MAX_PROBLEMS = 50
CHOICE_VALUES: dict[str, int] = {
    c.value: SKIP if c.outcome is None else int(c.outcome) for c in Choice
}


class BattleFormatError(ValueError):
    """The battle input cannot be read; `problems` names every offending record."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Battles:
    """Comparisons between named models; indices point into `models` (sorted)."""

    models: list[str]
    model_a: np.ndarray  # (V,) int64
    model_b: np.ndarray  # (V,) int64
    outcome: np.ndarray  # (V,) int8: OUTCOME_A, OUTCOME_B or OUTCOME_TIE
    n_skipped: int  # "skip" votes, which carry no data
    n_same_model: int = 0  # records comparing a model with itself

    def counts(self) -> PairCounts:
        """Aggregate into counts per model pair."""
        return aggregate_comparisons(self.model_a, self.model_b, self.outcome, len(self.models))


def _record_outcome(label: str, record: object) -> tuple[str, str, int]:
    if not isinstance(record, dict):
        raise BattleFormatError(f"{label}: expected an object, got {type(record).__name__}")
    names = []
    for key in ("model_a", "model_b"):
        if key not in record:
            raise BattleFormatError(f"{label}: missing field '{key}'")
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise BattleFormatError(f"{label}: '{key}' must be a non-empty string")
        names.append(value)
    if "winner" in record:
        field, table = "winner", WINNER_VALUES
    elif "choice" in record:
        field, table = "choice", CHOICE_VALUES
    else:
        raise BattleFormatError(f"{label}: missing field 'winner' (or 'choice')")
    value = record[field]
    if not isinstance(value, str) or value not in table:
        expected = ", ".join(repr(v) for v in table)
        raise BattleFormatError(f"{label}: unknown {field} {value!r}; expected one of {expected}")
    if names[0] == names[1]:
        return names[0], names[1], SAME_MODEL
    return names[0], names[1], table[value]


def _limited(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"and {len(problems) - MAX_PROBLEMS} more bad records"]


@dataclass(frozen=True)
class _Undecodable:
    """A JSON Lines line that is not JSON, kept in place so problems come in file order."""

    problem: str


def parse_battles(records: object, labels: list[str] | None = None) -> Battles:
    """Validate decoded JSON (a list of records) and turn it into comparison arrays.

    `labels` name the records in messages (default `record 1`, `record 2`, ...).
    """
    if not isinstance(records, list):
        raise BattleFormatError(
            f"expected a JSON list of battle records, got {type(records).__name__}"
        )
    if not records:
        raise BattleFormatError("no battle records")
    problems: list[str] = []
    parsed = []
    for k, record in enumerate(records):
        if isinstance(record, _Undecodable):
            problems.append(record.problem)
            continue
        try:
            parsed.append(_record_outcome(labels[k] if labels else f"record {k + 1}", record))
        except BattleFormatError as error:
            problems.extend(error.problems)
    if problems:
        raise BattleFormatError(_limited(problems))
    kept = [p for p in parsed if p[2] not in (SKIP, SAME_MODEL)]
    n_same = sum(p[2] == SAME_MODEL for p in parsed)
    if not kept:
        raise BattleFormatError(
            f"no usable battle records ({len(parsed) - n_same} skips, {n_same} same-model pairs)"
        )
    models = sorted({name for a, b, _ in kept for name in (a, b)})
    index = {name: k for k, name in enumerate(models)}
    return Battles(
        models=models,
        model_a=np.array([index[a] for a, _, _ in kept], dtype=np.int64),
        model_b=np.array([index[b] for _, b, _ in kept], dtype=np.int64),
        outcome=np.array([y for _, _, y in kept], dtype=np.int8),
        n_skipped=len(parsed) - len(kept) - n_same,
        n_same_model=n_same,
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
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(numbered) < 2:
            raise BattleFormatError(
                f"not valid JSON: {whole_error.msg} at line {whole_error.lineno} "
                f"column {whole_error.colno}"
            ) from None
        # JSON Lines (prefloop's JSONL export, FastChat dumps): every line a record.
        records: list[object] = []
        for lineno, line in numbered:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                records.append(
                    _Undecodable(
                        f"line {lineno}: not valid JSON ({error.msg}); the input is neither a "
                        "JSON list nor JSON Lines"
                    )
                )
            except RecursionError:
                records.append(_Undecodable(f"line {lineno}: nested too deeply"))
        return parse_battles(records, [f"line {n}" for n, _ in numbered])
    if isinstance(decoded, dict):
        return parse_battles([decoded])  # JSON Lines with a single line
    return parse_battles(decoded)


def load_battles(path: str | Path) -> Battles:
    """Read battle records from a file (JSON list or JSON Lines, UTF-8)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise BattleFormatError(f"cannot read the file: {reason}") from None
    return parse_battles_text(text)
