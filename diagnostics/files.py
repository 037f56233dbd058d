"""Atomic file writes: a file appears whole or not at all.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the target folder, then moves it
into place with ``os.replace``; readers never see a partial file and a failed write leaves any earlier
file as it was. New files get the mode ``open(path, "w")`` would give (``0o666`` minus the umask).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create ``path`` as ``write(tmp)`` leaves ``tmp`` (a fresh file next to it), then rename; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)  # a writer may recreate the file with its own mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``newline`` as for ``open``."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)

    return atomic_write(path, write)
