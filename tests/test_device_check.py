"""``benchmarks/device_check.sh`` on a machine without CUDA: it says so, writes nothing and exits 0 at once."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA path runs the whole check")
def test_device_check_without_cuda_exits_at_once(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    t0 = time.perf_counter()
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(report)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and not report.exists()
    assert time.perf_counter() - t0 < 60  # one Python start that imports torch; no test or benchmark runs
