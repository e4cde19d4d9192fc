"""A built wheel, installed non-editable in a fresh venv away from the checkout, serves the app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, free_port, wait_for

# Everything a checkout holds that a build must not see (or that is only slow to copy).
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "artifacts",
    "prefloop-data",
    "node_modules",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".whl",
    ".gl",
    "data",
)


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )  # type: ignore[call-overload]
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result  # type: ignore[no-any-return]


@pytest.mark.slow
def test_wheel_installs_and_serves_without_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    wheels = tmp_path / "wheels"
    # No build isolation and no index: the build uses this venv's setuptools, offline.
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(source),
        ],
    )
    [wheel] = wheels.glob("prefloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in (
        "app/_shared/templates/base.html",
        "app/_shared/static/vendor/htmx.min.js",
        "app/_shared/migrations/env.py",
        "worker/toy/weights/toy-v1/model_index.json",
    ):
        assert shipped in names, shipped
    shutil.rmtree(source)  # nothing below may read the checkout copy

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    # Dependencies come from this test's own environment, appended after the venv's packages.
    venv_site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    (venv_site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_") and k != "PYTHONPATH"
    }
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    where = _run(
        [
            str(python),
            "-c",
            "import app, worker.toy as t; print(app.__file__); print(t.TOY_MODELS['toy'])",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert all(line.startswith(str(venv_site)) for line in where), where

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        [
            str(venv / "bin" / "prefloop"),
            "serve",
            "--no-worker",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        health = wait_for(lambda: httpx.get(f"{base}/healthz", timeout=2), 90, what="/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["database"] == "ok"
        login = httpx.get(f"{base}/login", timeout=5)  # a template
        assert login.status_code == 200 and "<form" in login.text
        htmx = httpx.get(f"{base}/static/vendor/htmx.min.js", timeout=5)  # a static file
        assert htmx.status_code == 200 and len(htmx.content) > 1000
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        log.close()
    assert (tmp_path / "data" / "prefloop.db").exists()  # migrated from the shipped migrations
