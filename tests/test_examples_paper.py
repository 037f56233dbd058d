"""The paper-experiment scripts run end to end on their smoke presets and write their outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _start(script: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), "--preset", "smoke", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=600)  # generous: a busy shared machine runs 10x slower
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two smoke runs of chain_monomial.py, started together (they must agree exactly)."""
    a, b = tmp_path_factory.mktemp("chain_a"), tmp_path_factory.mktemp("chain_b")
    procs = [_start("chain_monomial.py", a), _start("chain_monomial.py", b)]
    for p in procs:
        _finish(p)
    return a, b


def test_chain_monomial_writes_metrics_results_and_plots(chain_runs: tuple[Path, Path]) -> None:
    out, _ = chain_runs
    rows = _read_csv(out / "metrics.csv")
    for col in ("run", "seed", "step", "layer", "uc_nfa", "c_nfa", "feature_quality", "test_mse"):
        assert col in rows[0], col
    assert {r["run"] for r in rows} == {"sgd", "small_init", "slo"}
    assert {r["layer"] for r in rows} == {"0", "2", "4"}
    final = [r for r in rows if r["step"] == "300"]
    assert final and all(0.0 <= float(r["test_mse"]) < 100 for r in final)
    assert all(abs(float(r["c_nfa"])) <= 1.0 + 1e-9 for r in final)
    assert all(-1.0 <= float(r["feature_quality"]) <= 1.0 for r in final)
    # SLO promotes layer "0" (speed C, the others 1/C): it alone moves away from its init
    moved = {r["layer"]: float(r["rel_change"]) for r in final if r["run"] == "slo"}
    assert moved["0"] > 100 * max(moved["2"], moved["4"])
    assert (out / "results.md").stat().st_size > 1000
    for png in ("nfa_curves.png", "feature_quality_test_mse.png", "nfm_vs_egop.png"):
        assert (out / png).stat().st_size > 1000


def test_chain_monomial_is_deterministic(chain_runs: tuple[Path, Path]) -> None:
    """Re-running a committed result rewrites its files byte for byte: run-dependent facts go to run.json."""
    a, b = chain_runs
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        if path.name == "results.md":  # it quotes the command, whose --out differs
            assert path.read_text().replace(str(a), str(b)) == (b / path.name).read_text()
        elif path.name != "run.json":
            assert path.read_bytes() == (b / path.name).read_bytes(), path.name
    assert "wall" not in (a / "results.md").read_text()
    info = json.loads((a / "run.json").read_text())
    assert info["wall_s"] > 0 and info["command"].endswith(f"--out {a}")


def test_chain_monomial_promotes_any_layer_over_adamw(tmp_path: Path) -> None:
    """--promote-layer 2 --base-optimizer adamw: every run uses AdamW and SLO (update mode, chosen for AdamW)
    moves layer 2 alone; the report tabulates the promoted layer."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "chain_monomial.py"), "--preset", "smoke", "--steps", "100",
         "--promote-layer", "2", "--base-optimizer", "adamw", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _read_csv(tmp_path / "metrics.csv")
    assert list(dict.fromkeys(r["run"] for r in rows)) == ["adamw", "small_init", "slo"]
    final = [r for r in rows if r["step"] == "100"]
    moved = {r["layer"]: float(r["rel_change"]) for r in final if r["run"] == "slo"}
    assert moved["2"] > 100 * max(moved["0"], moved["4"])
    text = (tmp_path / "results.md").read_text()
    assert "## Final values, promoted layer 2" in text and "| slo | slo over adamw | 0.001 | 1.0 | layer 2: 500" in text
    assert "raises layer 2's UC-NFA over standard-init AdamW" in text


def test_early_time_and_random_kernel_smoke(tmp_path: Path) -> None:
    procs = [_start("early_time.py", tmp_path / "early"), _start("random_kernel.py", tmp_path / "random")]
    for p in procs:
        _finish(p)

    early = _read_csv(tmp_path / "early" / "metrics.csv")
    assert {"init_scale", "seed", "step", "layer", "kind", "c_nfa"} <= set(early[0])
    assert {r["kind"] for r in early} == {"measured", "predicted"}
    predicted: dict[tuple[str, str, str], set[str]] = {}
    for r in early:
        if r["kind"] == "predicted":  # one prediction at init per (scale, seed, layer), repeated at every step
            predicted.setdefault((r["init_scale"], r["seed"], r["layer"]), set()).add(r["c_nfa"])
    assert predicted and all(len(v) == 1 and -1.0 <= float(next(iter(v))) <= 1.0 for v in predicted.values())
    assert (tmp_path / "early" / "results.md").stat().st_size > 0
    assert (tmp_path / "early" / "early_cnfa.png").stat().st_size > 1000

    rand = _read_csv(tmp_path / "random" / "metrics.csv")
    assert {"run", "seed", "step", "layer", "kernel", "uc_nfa", "c_nfa"} <= set(rand[0])
    assert {r["kernel"] for r in rand} == {"true", "random"}
    pairs = {(r["run"], r["seed"], r["step"], r["layer"]) for r in rand if r["kernel"] == "random"}
    assert pairs == {(r["run"], r["seed"], r["step"], r["layer"]) for r in rand if r["kernel"] == "true"}
    assert all(-1.0 <= float(r["uc_nfa"]) <= 1.0 for r in rand if r["kernel"] == "random")
    assert (tmp_path / "random" / "results.md").stat().st_size > 0
    assert (tmp_path / "random" / "random_kernel.png").stat().st_size > 1000
