"""Build step only (metadata: pyproject.toml): ship the top-level shared folders in the wheel."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# Kept at the repository's top level for people and tools; app.core.resources finds the copies.
SHARED = ("templates", "static", "migrations")


class BuildPyWithShared(build_py):
    def run(self) -> None:
        super().run()
        # An editable install reads the checkout's folders directly.
        if getattr(self, "editable_mode", False):
            return
        for name in SHARED:
            target = Path(self.build_lib) / "app" / "_shared" / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithShared})
