"""Content-addressed media store: files are named by the sha256 of their bytes."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from app.core.config import get_settings

_KEY_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.[a-z0-9]{1,8}$")


class MediaStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, data: bytes, *, ext: str = "png") -> tuple[str, str]:
        """Store bytes; returns (sha256, key). Writing the same bytes twice stores one file."""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{digest[:2]}/{digest[2:4]}/{digest}.{ext}"
        path = self.root / key
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: a reader never sees a half-written file, a crash leaves no partial file.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        return digest, key

    def path_for(self, key: str) -> Path:
        """The file for a key; refuses anything that is not a well-formed content key."""
        if not _KEY_RE.match(key):
            raise FileNotFoundError(key)
        return self.root / key

    def read(self, key: str) -> bytes:
        return self.path_for(key).read_bytes()

    def write_file(self, relative: str, data: bytes) -> Path:
        """Write a named artifact (job outputs) under the media root, atomically."""
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"artifact path escapes the media store: {relative!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return path


def get_media_store() -> MediaStore:
    return MediaStore(get_settings().resolved_media_dir)
