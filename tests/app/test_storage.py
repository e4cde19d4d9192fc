"""The atomic writes every artifact goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.core.storage import atomic_dir, atomic_file, replace_dir, write_atomic


def test_write_atomic_replaces_whole_files_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    write_atomic(target, "one", mode=0o600)
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    write_atomic(target, "three", mode=0o600)
    assert target.read_text() == "three" and (os.stat(target).st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temp files left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "export.jsonl"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_replace_dir_swaps_in_the_new_tree_and_removes_the_old(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:
        assert not target.samefile(tmp)
        (tmp / "weights").write_text("v2")
        assert (target / "weights").read_text() == "v1"  # the old tree serves until the swap
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_directory_build_keeps_the_old_tree(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "a").write_text("kept")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("partial")
        raise ValueError("training diverged")
    assert (target / "a").read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == [
        "adapter"
    ]


def test_replace_dir_moves_into_a_free_place(tmp_path: Path) -> None:
    source = tmp_path / "built"
    source.mkdir()
    (source / "x").write_text("1")
    assert replace_dir(source, tmp_path / "final") == tmp_path / "final"
    assert (tmp_path / "final" / "x").read_text() == "1" and not source.exists()
