"""What a web-only install needs, and what the constraints file pins."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import pytest

from tests.support import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
ML = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"}
TEST_ONLY = {"httpx", "pyyaml", "choix", "datasets", "flower", "pytest"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_web_runtime_needs_no_ml_or_test_packages() -> None:
    runtime = _names(PROJECT["dependencies"])
    assert not runtime & (ML | TEST_ONLY), runtime & (ML | TEST_ONLY)
    extras = PROJECT["optional-dependencies"]
    assert _names(extras["worker"]) >= ML
    assert _names(extras["test"]) >= TEST_ONLY


@pytest.mark.slow
def test_the_web_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from app.main import create_app\n"
        "create_app()\n"
        "import app.cli, app.serve, app.core.broker, worker.tasks.run, app.exports.importers\n"
        f"print(sorted(m for m in {sorted(ML)!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_app_imports_nothing_from_the_worker() -> None:
    # The layering runs one way: worker/ builds on app/; the web never needs the worker's code.
    found = []
    for path in sorted((REPO / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names]
    assert [f for f in found if f.split()[-1].split(".")[0] == "worker"] == []
    assert any(f.endswith(" app.core.broker") for f in found)  # the walk sees lazy imports


def test_constraints_pin_every_declared_dependency() -> None:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in lines
        if line and not line.startswith("#")
    }
    assert all("==" in line for line in lines if line and not line.startswith("#"))
    declared = _names(PROJECT["dependencies"]) | {
        n for reqs in PROJECT["optional-dependencies"].values() for n in _names(reqs)
    }
    declared = {n.replace("_", "-") for n in declared if not n.startswith("prefloop")}
    assert declared <= pins, declared - pins


def test_installers_use_the_constraints() -> None:
    run = (REPO / "tests" / "run").read_text()
    assert "-c constraints.txt" in run and "'.[worker,test]'" in run
    assert '"$VENV/bin/mypy"' in run  # the type check runs in both lanes
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.count("-c constraints.txt") >= 2  # the web and the worker layers
    assert "tests/run" in (REPO / ".ci" / "run").read_text()
