"""docker-compose.yml runs the very commands CI runs natively (no engine here to start it)."""

from __future__ import annotations

import importlib
import re
import shlex
import warnings
from pathlib import Path

import click
import pytest
import yaml

from app.cli import main as prefloop_cli
from app.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
GPU = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
SERVICES = COMPOSE["services"]


def _parse(group: click.Command, prog: str, args: list[str], obj: object = None) -> click.Command:
    """Parse args exactly as the CLI would (options validated), without running anything."""
    ctx = group.make_context(prog, list(args), obj=obj)
    command: click.Command = group
    while isinstance(command, click.Group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*ctx.protected_args, *ctx.args]
        if not rest:
            break
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None, f"unknown subcommand in {args}"
        command = sub
        ctx = command.make_context(name, rest, parent=ctx)
    return command


def test_expected_services() -> None:
    wanted = {"postgres", "redis", "prestart", "web", "worker-gpu", "worker-cpu", "beat", "flower"}
    assert wanted <= set(SERVICES)
    assert "healthcheck" in SERVICES["postgres"] and SERVICES["postgres"]["volumes"]
    redis_cmd = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    web_needs = SERVICES["web"]["depends_on"]["prestart"]["condition"]
    assert web_needs == "service_completed_successfully"


@pytest.mark.parametrize("name", sorted(s for s in SERVICES if s not in ("postgres", "redis")))
def test_service_command_is_a_real_command(name: str) -> None:
    argv = SERVICES[name]["command"]
    program, args = argv[0], argv[1:]
    if program == "prefloop":
        command = _parse(prefloop_cli, "prefloop", args)
        assert command.name in {"backup", "bootstrap", "migrate", "worker", "serve"}
    elif program == "uvicorn":
        uvicorn_cli = importlib.import_module("uvicorn.main").main
        ctx = uvicorn_cli.make_context("uvicorn", list(args))
        module, attr = ctx.params["app"].split(":")
        assert ctx.params["factory"] is True
        factory = getattr(importlib.import_module(module), attr)
        assert callable(factory)
    elif program == "celery":
        from celery.bin.base import CLIContext
        from celery.bin.celery import celery

        app_path = args[args.index("-A") + 1]
        app = importlib.import_module(app_path).celery_app
        obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
        command = _parse(celery, "celery", args, obj=obj)
        assert command.name in {"beat", "flower", "worker"}
        assert "prefloop.periodic" in {e["task"] for e in app.conf.beat_schedule.values()}
    else:
        pytest.fail(f"{name} runs {program!r}, not a prefloop, uvicorn or celery command")


def test_environment_names_only_real_settings() -> None:
    fields = {f"PREFLOOP_{name.upper()}" for name in Settings.model_fields}
    env = COMPOSE["x-prefloop"]["environment"]
    assert set(env) <= fields, set(env) - fields
    assert "PREFLOOP_SECRET_KEY" in env and ":?" in env["PREFLOOP_SECRET_KEY"]


def test_gpu_reservation_only_in_the_override() -> None:
    # A plain `docker compose up` must start on a machine without GPUs.
    assert "deploy" not in SERVICES["worker-gpu"]
    devices = GPU["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert set(GPU["services"]) == {"worker-gpu"}


def test_dockerfile_copies_what_the_commands_need() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    for path in ("app", "worker", "migrations", "templates", "static", "pyproject.toml"):
        assert f"COPY {path}" in dockerfile


def test_prestart_bootstraps_the_first_admin_from_the_env_file() -> None:
    prestart = SERVICES["prestart"]
    assert _parse(prefloop_cli, "prefloop", prestart["command"][1:]).name == "bootstrap"
    env = prestart["environment"]
    assert {"PREFLOOP_ADMIN_EMAIL", "PREFLOOP_ADMIN_PASSWORD"} <= set(env)
    # The rest of the wiring is the shared one.
    assert env["PREFLOOP_DATABASE_URL"] == COMPOSE["x-prefloop"]["environment"][
        "PREFLOOP_DATABASE_URL"
    ]
    for name in SERVICES:
        if name not in ("postgres", "redis"):
            assert {"path": ".env", "required": False} in SERVICES[name]["env_file"], name


def test_env_example_names_only_real_settings() -> None:
    fields = {f"PREFLOOP_{name.upper()}" for name in Settings.model_fields}
    lines = (REPO / ".env.example").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}
    assert {"PREFLOOP_SECRET_KEY", "PREFLOOP_ADMIN_EMAIL", "PREFLOOP_ADMIN_PASSWORD"} <= names
    # FLOWER_BASIC_AUTH is Flower's own setting (it reads FLOWER_* variables).
    assert names <= fields | {"FLOWER_BASIC_AUTH"}, names - fields
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_readme_user_commands_run_in_the_web_service() -> None:
    readme = (REPO / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("docker compose exec web ")]
    assert any(" user add " in line for line in lines), "README shows no `user add` in compose"
    for line in lines:
        argv = shlex.split(line.split("#", 1)[0])[4:]
        assert argv[0] == "prefloop", line
        assert _parse(prefloop_cli, "prefloop", argv[1:]).name in {"add", "list", "token"}


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1)


def test_image_has_pg_dump_of_the_compose_servers_major_version() -> None:
    server_major = SERVICES["postgres"]["image"].split(":")[1].split(".")[0]
    assert _dockerfile_arg("PG_MAJOR") == server_major
    dockerfile = (REPO / "Dockerfile").read_text()
    assert '"postgresql-client-${PG_MAJOR}"' in dockerfile
    # Debian's own client is older than the compose server; the PostgreSQL apt repo has it.
    assert "apt.postgresql.org" in dockerfile


def test_backup_service_is_opt_in_and_keeps_backups_in_a_volume() -> None:
    backup = SERVICES["backup"]
    assert backup["profiles"] == ["backup"]  # not started by a plain `docker compose up`
    assert "backups:/backups" in backup["volumes"] and "media:/data" in backup["volumes"]
    assert "backups" in COMPOSE["volumes"]
    command = _parse(prefloop_cli, "prefloop", backup["command"][1:])
    assert command.name == "backup"
    assert backup["command"][-2:] == ["--under", "/backups"]


def _stages() -> dict[str, str]:
    """Dockerfile stage name -> its text."""
    text = (REPO / "Dockerfile").read_text()
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].split(" AS ")[1].strip(): part for part in parts}


def test_web_image_is_slim_and_workers_get_torch() -> None:
    stages = _stages()
    assert {"web", "worker", "build"} <= set(stages)
    assert list(stages)[-1] == "worker"  # the default target has everything
    chain = ["base", "web-deps", "web"]
    assert all(name in stages for name in chain)
    for name in chain:
        assert "torch" not in stages[name].replace("no torch", ""), name
        assert "worker >" not in stages[name], name
    assert "torch" in stages["worker-deps"] and "prefloop-requirements.py worker" in (
        stages["worker-deps"]
    )
    for name, service in SERVICES.items():
        if name in ("postgres", "redis"):
            continue
        target = service["build"]["target"]
        assert target == ("worker" if name.startswith("worker-") else "web"), name
    assert GPU["services"]["worker-gpu"]["build"]["target"] == "worker"


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    stages = _stages()
    for name in ("web-deps", "worker-deps"):
        copies = re.findall(r"^COPY (.+)$", stages[name], flags=re.MULTILINE)
        assert all(c.split()[0] in {"pyproject.toml", "constraints.txt"} for c in copies), copies
    for name in ("web", "worker"):
        text = stages[name]
        # The code arrives as the built wheel, installed without touching dependencies.
        assert "COPY --from=build /wheels" in text and "pip install --no-deps" in text
        assert "-e " not in text


def test_dockerignore_keeps_history_data_and_secrets_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "prefloop-data", "artifacts", ".env", "**/__pycache__"} <= ignored


def test_model_volumes() -> None:
    hf_home = re.search(r"HF_HOME=(\S+)", (REPO / "Dockerfile").read_text())
    assert hf_home and hf_home.group(1) == "/cache/huggingface"
    for name in ("worker-gpu", "worker-cpu"):
        volumes = SERVICES[name]["volumes"]
        assert f"hub-cache:{hf_home.group(1)}" in volumes and "models:/data/models" in volumes
    # The web checks registered model paths, so it sees the same model root.
    assert "models:/data/models" in SERVICES["web"]["volumes"]
    assert SERVICES["web"]["environment"]["PREFLOOP_DATA_DIR"] == "/data"
    assert {"hub-cache", "models"} <= set(COMPOSE["volumes"])


def test_flower_needs_a_password_and_sees_task_events() -> None:
    import flower.options  # noqa: F401 - defines Flower's options
    from tornado.options import options

    command = SERVICES["flower"]["command"]
    [auth] = [arg for arg in command if arg.startswith("--basic-auth=")]
    assert auth == "--basic-auth=${FLOWER_BASIC_AUTH:?set FLOWER_BASIC_AUTH=user:password in .env}"
    # As compose interpolates it, Flower's own parser reads a login.
    options.parse_command_line(["flower", "--basic-auth=ops:pw", "--port=5555"], final=False)
    assert options.basic_auth == ["ops:pw"]
    for name in ("worker-gpu", "worker-cpu"):
        args = SERVICES[name]["command"][1:]
        command = _parse(prefloop_cli, "prefloop", args)
        assert command.name == "worker" and "--events" in args


def test_web_does_not_believe_forwarded_headers_from_any_peer() -> None:
    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default; the app decides instead
    # (PREFLOOP_TRUSTED_PROXIES), so the login throttle and the audit see the real client.
    command = SERVICES["web"]["command"]
    assert command[0] == "uvicorn" and "--no-proxy-headers" in command
    from uvicorn.main import main as uvicorn_main

    ctx = uvicorn_main.make_context("uvicorn", list(command[1:]))
    assert ctx.params["proxy_headers"] is False
