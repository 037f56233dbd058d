"""The paper's chain-monomial claims hold on the main job's default preset (slow: about a minute).

Runs ``examples/chain_monomial.py --preset default`` and checks, on the first layer after training,
mean over the preset's seeds: standard-init SGD has its C-NFA well above its UC-NFA (the centered
alignment is masked by the initial weights), and small init and SLO both raise the UC-NFA and the
feature quality over standard-init SGD. Run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "chain_monomial.py"


@pytest.mark.slow
def test_default_preset_shows_the_papers_chain_monomial_claims(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "default", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["layer"] == "0"]
    last = max(int(r["step"]) for r in rows)
    final = {}
    for run in ("sgd", "small_init", "slo"):
        sel = [r for r in rows if r["run"] == run and int(r["step"]) == last]
        assert sel, f"no final rows for run {run!r}"
        final[run] = {k: statistics.mean(float(r[k]) for r in sel) for k in ("uc_nfa", "c_nfa", "feature_quality")}
    sgd, small, slo = final["sgd"], final["small_init"], final["slo"]
    assert sgd["c_nfa"] > sgd["uc_nfa"] + 0.2
    for better in (small, slo):
        assert better["uc_nfa"] > sgd["uc_nfa"] + 0.2
        assert better["feature_quality"] > sgd["feature_quality"] + 0.2
