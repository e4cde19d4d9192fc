"""Parsing FastChat battle records and prefloop vote exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.ratings.battles import (
    BattleFormatError,
    load_battles,
    parse_battles,
    parse_battles_text,
)
from app.ratings.bradley_terry import OUTCOME_A, OUTCOME_B, OUTCOME_TIE

FASTCHAT = [
    {
        "model_a": "sd15",
        "model_b": "sdxl",
        "winner": "model_b",
        "judge": "u1",
        "tstamp": 1.7e9,
        "question_id": "q1",
        "anony": True,
    },
    {"model_a": "sdxl", "model_b": "toy", "winner": "model_a"},
    {"model_a": "toy", "model_b": "sd15", "winner": "tie"},
    {"model_a": "toy", "model_b": "sdxl", "winner": "tie (bothbad)"},
]


def test_fastchat_records() -> None:
    battles = parse_battles(FASTCHAT)
    assert battles.models == ["sd15", "sdxl", "toy"]
    assert battles.model_a.tolist() == [0, 1, 2, 2]
    assert battles.model_b.tolist() == [1, 2, 0, 1]
    assert battles.outcome.tolist() == [OUTCOME_B, OUTCOME_A, OUTCOME_TIE, OUTCOME_TIE]
    counts = battles.counts()
    assert counts.n_items == 3 and counts.n_comparisons == 4


def test_vote_records_with_choice_and_skip() -> None:
    records = [
        {"model_a": "a", "model_b": "b", "choice": "left"},
        {"model_a": "a", "model_b": "b", "choice": "right"},
        {"model_a": "b", "model_b": "a", "choice": "both_bad"},
        {"model_a": "b", "model_b": "a", "choice": "skip"},
        {"model_a": "b", "model_b": "a", "choice": "tie"},
    ]
    battles = parse_battles(records)
    assert battles.outcome.tolist() == [OUTCOME_A, OUTCOME_B, OUTCOME_TIE, OUTCOME_TIE]
    assert battles.n_skipped == 1


def test_json_lines_and_files(tmp_path: Path) -> None:
    path = tmp_path / "battles.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in FASTCHAT) + "\n\n", encoding="utf-8")
    battles = load_battles(path)
    assert battles.outcome.shape == (4,)
    listed = tmp_path / "battles.json"
    listed.write_text(json.dumps(FASTCHAT), encoding="utf-8")
    np.testing.assert_array_equal(load_battles(listed).outcome, battles.outcome)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "no battle records"),
        ({"model_a": "a"}, "expected a JSON list"),
        ([FASTCHAT[0], "x"], "record 2: expected an object, got str"),
        ([FASTCHAT[0], {"model_b": "b", "winner": "tie"}], "record 2: missing field 'model_a'"),
        ([{"model_a": "a", "model_b": 3, "winner": "tie"}], "record 1: 'model_b' must be"),
        ([{"model_a": "a", "model_b": "a", "winner": "tie"}], "(0 skips, 1 same-model pairs)"),
        ([{"model_a": "a", "model_b": "b"}], "record 1: missing field 'winner'"),
        (
            [FASTCHAT[0]] * 17 + [{"model_a": "a", "model_b": "b", "winner": "foo"}],
            "record 18: unknown winner 'foo'; expected one of 'model_a', 'model_b', 'tie'",
        ),
        ([{"model_a": "a", "model_b": "b", "choice": "left!"}], "record 1: unknown choice"),
        ([{"model_a": "a", "model_b": "b", "winner": None}], "record 1: unknown winner None"),
        ([{"model_a": "a", "model_b": "b", "choice": "skip"}], "(1 skips, 0 same-model pairs)"),
    ],
)
def test_bad_records_name_the_record(records: object, message: str) -> None:
    with pytest.raises(BattleFormatError) as error:
        parse_battles(records)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty input"),
        ("   \n", "empty input"),
        ("[{", "not valid JSON"),
        ('{"model_a": "a", "model_b": "b", "winner": "tie"}\n{oops}', "line 2: not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_text(text: str, message: str) -> None:
    with pytest.raises(BattleFormatError, match=message):
        parse_battles_text(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(BattleFormatError, match="cannot read the file"):
        load_battles(tmp_path / "missing.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BattleFormatError, match="cannot read the file"):
        load_battles(binary)


def test_every_bad_record_is_named_and_same_model_pairs_are_counted() -> None:
    records = [
        {"model_a": "a", "model_b": "b", "choice": "left"},
        {"model_a": "a", "model_b": "a", "choice": "left"},
        {"model_a": "a", "model_b": "b", "choice": "sideways"},
        {"model_a": "b", "model_b": "b", "winner": "tie"},
        7,
        {"model_a": "b", "model_b": "a", "choice": "skip"},
    ]
    with pytest.raises(BattleFormatError) as error:
        parse_battles(records)
    assert error.value.problems == [
        "record 3: unknown choice 'sideways'; expected one of 'left', 'right', 'tie', "
        "'both_bad', 'skip'",
        "record 5: expected an object, got int",
    ]
    battles = parse_battles([r for r in records if r not in (records[2], 7)])
    assert battles.n_same_model == 2 and battles.n_skipped == 1
    assert battles.models == ["a", "b"] and battles.outcome.tolist() == [OUTCOME_A]
