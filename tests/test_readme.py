"""The README's Python examples run as written.

Every ```python block of README.md is executed in a fresh interpreter, in a temporary working
directory. A block whose first line is ``# requires: <data>`` needs files that are not shipped and
is only checked for syntax.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ALARMING = re.compile(r"warn|error|unexpected|deprecat|\[transformers\]", re.I)  # what no reader should see


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index: int, tmp_path: Path) -> None:
    code = _blocks()[index]
    if code.startswith("# requires:"):
        compile(code, f"README block {index}", "exec")
        return
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{proc.stderr}"
    alarming = [line for line in proc.stderr.splitlines() if ALARMING.search(line)]
    assert not alarming, f"README block {index} printed warnings:\n{code}\n--- stderr ---\n{proc.stderr}"
