"""Where the templates, static files and migrations are, in a checkout and in an installed wheel.

They live at the repository's top level (templates/, static/, migrations/). A built wheel carries
copies inside the package, as app/_shared/<name> (setup.py's build step puts them there), so a
non-editable install needs no source tree.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHARED = ("templates", "static", "migrations")


def shared_dir(name: str) -> Path:
    """The folder holding one of SHARED: the installed copy if there is one, else the checkout's."""
    if name not in SHARED:
        raise ValueError(f"unknown shared folder {name!r}; expected one of {', '.join(SHARED)}")
    packaged = Path(str(files("app"))) / "_shared" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / name
