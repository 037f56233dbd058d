"""``diagnostics.files``: a file appears whole or not at all, with the umask's mode."""

from __future__ import annotations

import os

import pytest

from diagnostics.files import atomic_write, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old\n")

    def half(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_new_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "sub" / "b.csv", "x,y\n", newline="")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o640
    assert path.read_bytes() == b"x,y\n"
