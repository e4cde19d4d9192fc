"""The `prefloop` command line, run in-process against the test database."""

from __future__ import annotations

import json
import uuid

from click.testing import CliRunner

from app.cli import main


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name in ("serve", "migrate", "worker", "user", "version", "rate"):
        assert name in top.output
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
    for sub in ("add", "list", "token"):
        assert runner.invoke(main, ["user", sub, "--help"]).exit_code == 0


def test_user_add_list_token(pg_url: str) -> None:
    runner = CliRunner()
    email = f"lead-{uuid.uuid4().hex[:6]}@example.com"
    added = runner.invoke(main, ["user", "add", email, "--role", "lead", "--token"])
    assert added.exit_code == 0, added.output
    assert "created lead" in added.output and "token: pfl_" in added.output
    listed = runner.invoke(main, ["user", "list"])
    assert email in listed.output and "lead" in listed.output
    token = runner.invoke(main, ["user", "token", email])
    assert token.exit_code == 0 and token.output.strip().startswith("pfl_")
    again = runner.invoke(main, ["user", "add", email, "--role", "lead"])
    assert again.exit_code == 1 and "already exists" in again.output
    bad_role = runner.invoke(main, ["user", "add", "x@example.com", "--role", "boss"])
    assert bad_role.exit_code == 2 and "boss" in bad_role.output
    missing = runner.invoke(main, ["user", "token", "nobody@example.com"])
    assert missing.exit_code == 1 and "no user" in missing.output


def test_worker_rejects_unknown_queue() -> None:
    result = CliRunner().invoke(main, ["worker", "--queues", "gpu,fast"])
    assert result.exit_code == 2 and "fast" in result.output


def test_rate_through_the_main_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    battles = [{"model_a": "a", "model_b": "b", "winner": "model_a"}] * 8 + [
        {"model_a": "a", "model_b": "b", "winner": "model_b"}
    ] * 2
    path = tmp_path / "battles.json"
    path.write_text(json.dumps(battles))
    out = tmp_path / "ratings.json"
    result = CliRunner().invoke(main, ["rate", str(path), "--bootstrap", "50", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert rows["a"]["rating"] > rows["b"]["rating"]
    assert rows["a"]["rank"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text('[{"model_a": "a", "model_b": "b", "winner": "nobody"}]')
    failed = CliRunner().invoke(main, ["rate", str(bad)])
    assert failed.exit_code == 2 and "record 1" in failed.output


def test_version_prints_versions() -> None:
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0 and "prefloop 0.1.0" in result.output and "torch" in result.output


def test_worker_events_flag_reaches_celery(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from celery.bin.worker import worker as celery_worker

    import app.cli as cli
    from app.core.broker import celery_app

    seen: list[list[str]] = []
    monkeypatch.setattr(celery_app, "worker_main", seen.append)
    monkeypatch.setattr(cli, "_limit_torch_threads", lambda threads: None)
    for flags, expected in (([], False), (["--events"], True)):
        result = CliRunner().invoke(main, ["worker", "--queues", "cpu", *flags])
        assert result.exit_code == 0, result.output
        argv = seen.pop()
        ctx = celery_worker.make_context("worker", argv[1:], resilient_parsing=True)
        assert bool(ctx.params["task_events"]) is expected
