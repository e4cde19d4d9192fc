"""The `rate` command: leaderboard JSON, table, options and refusal of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import worker.rate as rate_module
from app.ratings.battles import MAX_PROBLEMS, parse_battles
from app.ratings.bradley_terry import fit_bradley_terry
from app.ratings.leaderboard import leaderboard
from app.ratings.scale import elo_scale
from worker.rate import rate_command

WINNERS = ["model_a", "model_b", "tie", "tie (bothbad)"]


def synthetic_battles(n_battles: int = 400, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = ["alpha", "beta", "gamma", "delta"]
    strength = np.array([1.0, 0.3, 0.0, -1.0])
    records = []
    for _ in range(n_battles):
        a, b = rng.choice(4, size=2, replace=False)
        u = rng.random()
        p_a = 1 / (1 + math.exp(-(strength[a] - strength[b])))
        winner = "tie" if u < 0.15 else ("model_a" if rng.random() < p_a else "model_b")
        records.append({"model_a": names[a], "model_b": names[b], "winner": winner})
    return records


def write(tmp_path: Path, records: object, name: str = "battles.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(rate_command, list(args))


def assert_clean_refusal(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_writes_leaderboard_json_and_prints_table(tmp_path: Path) -> None:
    records = synthetic_battles()
    out = tmp_path / "ratings.json"
    result = run(str(write(tmp_path, records)), "--bootstrap", "60", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [set(row) for row in rows] == [{"model", "rating", "ci_low", "ci_high", "rank"}] * 4
    assert [row["model"] for row in rows] == ["alpha", "beta", "gamma", "delta"]
    fit = fit_bradley_terry(parse_battles(records).counts())
    expected = dict(zip(parse_battles(records).models, elo_scale(fit.scores), strict=True))
    for row in rows:
        assert row["rating"] == pytest.approx(expected[row["model"]])
        assert row["ci_low"] <= row["rating"] <= row["ci_high"]
    assert rows[0]["rank"] == 1 and rows[-1]["rank"] > 1
    assert "alpha" in result.stdout and "rating" in result.stdout
    assert f"wrote 4 ratings to {out}" in result.stdout


def test_without_out_json_goes_to_stdout_and_table_to_stderr(tmp_path: Path) -> None:
    result = run(str(write(tmp_path, synthetic_battles())), "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 4
    assert "rank" in result.stderr and "alpha" in result.stderr


def test_options_ties_prior_bootstrap_and_seed(tmp_path: Path) -> None:
    path = str(write(tmp_path, synthetic_battles()))

    def ratings(*extra: str) -> list[dict]:
        result = run(path, *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    half = ratings("--bootstrap", "0")
    davidson = ratings("--bootstrap", "0", "--ties", "davidson")
    strong = ratings("--bootstrap", "0", "--prior", "500")
    assert all(row["ci_low"] is None and row["ci_high"] is None for row in half)
    assert [row["rank"] for row in half] == [1, 2, 3, 4]
    assert half[0]["rating"] != pytest.approx(davidson[0]["rating"], abs=1e-3)
    spread = lambda rows: rows[0]["rating"] - rows[-1]["rating"]  # noqa: E731
    assert spread(strong) < 0.5 * spread(half)  # a strong prior pulls ratings to 1000
    same = ratings("--bootstrap", "30", "--seed", "3")
    assert ratings("--bootstrap", "30", "--seed", "3") == same
    assert ratings("--bootstrap", "30", "--seed", "4") != same


def test_progress_bar_for_long_bootstraps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rate_module, "PROGRESS_MIN_WORK", 1)
    result = run(str(write(tmp_path, synthetic_battles())), "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    assert "bootstrap" in result.stderr
    quiet = run(str(write(tmp_path, synthetic_battles())), "--bootstrap", "0")
    assert "bootstrap" not in quiet.stderr


def test_disconnected_battles_warn_on_stderr(tmp_path: Path) -> None:
    records = [
        {"model_a": "a", "model_b": "b", "winner": "model_a"},
        {"model_a": "c", "model_b": "d", "winner": "model_b"},
    ]
    result = run(str(write(tmp_path, records)), "--bootstrap", "10")
    assert result.exit_code == 0, result.output
    assert "2 connected components: {a, b} {c, d}" in result.stderr
    assert all(math.isfinite(row["rating"]) for row in json.loads(result.stdout))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json at all", "not valid JSON"),
        ('{"model_a": "x"}', "record 1: missing field 'model_b'"),
        ("5", "expected a JSON list"),
        ("[]", "no battle records"),
        ('[{"model_a": "x", "model_b": "y", "winner": "foo"}]', "record 1: unknown winner 'foo'"),
        ('[{"model_a": "x", "model_b": "y", "winner": "tie"}, 5]', "record 2: expected an object"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    assert_clean_refusal(run(str(path)), fragment)


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert_clean_refusal(run(str(tmp_path / "nope.json")), "cannot read the file")


def test_unwritable_out_exits_2(tmp_path: Path) -> None:
    path = str(write(tmp_path, synthetic_battles(50)))
    target = tmp_path / "no-such-dir" / "out.json"
    assert_clean_refusal(run(path, "--bootstrap", "0", "--out", str(target)), "cannot write")


def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    path = str(write(tmp_path, synthetic_battles(50)))
    for args in (["--ties", "thirds"], ["--prior", "0"], ["--bootstrap", "-1"]):
        result = run(path, *args)
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_leaderboard_function_matches_bootstrap_ranks() -> None:
    battles = parse_battles(synthetic_battles())
    rows = leaderboard(battles.counts(), battles.models, n_bootstrap=50, seed=1).rows
    assert [r.rating for r in rows] == sorted((r.rating for r in rows), reverse=True)
    uppers = {r.model: r.ci_high for r in rows}
    for row in rows:
        above = sum(other.ci_low > uppers[row.model] for other in rows)
        assert row.rank == 1 + above


# ---------------------------------------------------------------- properties

model_names = st.sampled_from(["a", "b", "c", "d", "e"])
battle_records = st.fixed_dictionaries(
    {"model_a": model_names, "model_b": model_names, "winner": st.sampled_from(WINNERS)}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
garbage_records = st.one_of(
    battle_records,
    json_values,
    st.dictionaries(
        st.sampled_from(["model_a", "model_b", "winner", "choice"]),
        json_values | model_names | st.sampled_from(WINNERS + ["left", "skip"]),
    ),
)


def check_outcome(result: Result) -> None:
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        rows = json.loads(result.stdout)
        assert rows and all(
            math.isfinite(row[key]) for row in rows for key in ("rating", "ci_low", "ci_high")
        )
    else:
        assert isinstance(result.exception, SystemExit)
        # One line per bad record (at most MAX_PROBLEMS and a count of the rest).
        lines = result.stderr.strip().splitlines()
        assert 1 <= len(lines) <= MAX_PROBLEMS + 1
        assert all(line.startswith("Error: ") for line in lines), lines


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=st.lists(battle_records, min_size=0, max_size=30))
def test_random_battle_lists_rate_or_refuse(tmp_path: Path, records: list[dict]) -> None:
    check_outcome(run(str(write(tmp_path, records)), "--bootstrap", "10"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.lists(garbage_records, max_size=6),
        json_values.map(json.dumps),
        st.text(max_size=40),
        st.binary(max_size=40),
    )
)
def test_garbage_input_never_crashes(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "garbage.json"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif isinstance(payload, str):
        path.write_text(payload, encoding="utf-8")
    else:
        path.write_text(json.dumps(payload), encoding="utf-8")
    check_outcome(run(str(path), "--bootstrap", "10"))


def test_reads_prefloops_jsonl_export_skipping_same_model_pairs(tmp_path: Path) -> None:
    # Lines as app.exports.service.vote_record writes them (other fields trimmed).
    def line(a: str, b: str, choice: str) -> str:
        return json.dumps(
            {"vote_id": 1, "pair_purpose": "arena", "is_gold": False, "model_a": a,
             "model_b": b, "choice": choice, "left": {"model": a}, "right": {"model": b}}
        )  # fmt: skip

    lines = [line("m1", "m2", "left")] * 6 + [line("m1", "m2", "right")] * 2
    lines += [line("m1", "m1", "tie"), line("m2", "m2", "left"), line("m1", "m2", "skip")]
    path = tmp_path / "votes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.json"
    result = run(str(path), "--bootstrap", "0", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "skipped 2 same-model pairs" in result.stderr
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["m1", "m2"]
    # 6 wins to 2 with the default prior: m1 ahead.
    assert rows[0]["rating"] > rows[1]["rating"]


def test_every_bad_jsonl_record_is_named_by_its_line(tmp_path: Path) -> None:
    good = json.dumps({"model_a": "a", "model_b": "b", "choice": "left"})
    path = tmp_path / "votes.jsonl"
    path.write_text(
        "\n".join([good, '{"model_a": "a", "model_b": "b", "choice": "up"}', good, "",
                   "{not json", good, '{"model_a": "a", "choice": "left"}'])  # fmt: skip
    )
    result = run(str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert "line 2: unknown choice 'up'" in lines[0]
    assert "line 5: not valid JSON" in lines[1]
    assert "line 7: missing field 'model_b'" in lines[2]
