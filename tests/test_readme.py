"""The README's Python examples run as written.

Every ```python block of README.md is executed in a fresh interpreter, in a temporary working
directory. A block whose first line is ``# requires: <data>`` needs files that are not shipped and
is only checked for syntax.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ALARMING = re.compile(r"warn|error|unexpected|deprecat|\[transformers\]", re.I)  # what no reader should see


def _blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples() -> None:
    assert len(_blocks()) >= 3


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, subprocess.CompletedProcess]:
    """Every runnable block in its own fresh interpreter and working directory, two at a time (the blocks are
    independent; most of each run is importing torch, which uses one core)."""

    def run(index: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _blocks()[index]], cwd=tmp_path_factory.mktemp(f"block{index}"),
                              capture_output=True, text=True, timeout=600)

    runnable = [i for i, code in enumerate(_blocks()) if not code.startswith("# requires:")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runnable, pool.map(run, runnable)))


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index: int, block_runs: dict[int, subprocess.CompletedProcess]) -> None:
    code = _blocks()[index]
    if code.startswith("# requires:"):
        compile(code, f"README block {index}", "exec")
        return
    proc = block_runs[index]
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{proc.stderr}"
    alarming = [line for line in proc.stderr.splitlines() if ALARMING.search(line)]
    assert not alarming, f"README block {index} printed warnings:\n{code}\n--- stderr ---\n{proc.stderr}"
