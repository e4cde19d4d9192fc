"""Content-addressed media store (files named by the sha256 of their bytes), and the atomic
writes every file and directory the platform produces goes through.

Temporary names start with `.tmp-` next to their target (the same filesystem, so the final
rename is atomic); backups skip them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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
            write_atomic(path, data)
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
        return write_atomic(path, data)


@contextmanager
def atomic_file(path: Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A file to write `path` through: it replaces `path` only once the block ends without an
    error, so readers see the old content or the new, never part; a failure leaves no file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write `path` whole or not at all (see `atomic_file`); str is written as UTF-8."""
    with atomic_file(path, mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path


def temp_dir_for(target: Path) -> Path:
    """A fresh, empty sibling directory to build `target` in before `replace_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def replace_dir(source: Path, target: Path) -> Path:
    """Move the finished directory `source` to `target`, replacing what is there.

    Rename, then delete: the old directory is renamed aside and removed only after the new one
    is in place, so `target` is never missing while an old tree is being deleted, and a crash
    in between leaves a complete copy (the new one, or the old one beside it).
    """
    if not target.exists():
        os.replace(source, target)
        return target
    old = target.parent / f".tmp-{target.name}-old-{uuid.uuid4().hex[:12]}"
    os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A directory to fill; it becomes `target` (see `replace_dir`) once the block ends
    without an error, and is removed otherwise."""
    tmp = temp_dir_for(target)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_store_of: tuple[object, MediaStore] | None = None


def get_media_store() -> MediaStore:
    global _store_of
    settings = get_settings()
    # Resolving the directory costs system calls, and the image route asks on every request:
    # once per settings object.
    if _store_of is None or _store_of[0] is not settings:
        _store_of = (settings, MediaStore(settings.resolved_media_dir))
    return _store_of[1]
