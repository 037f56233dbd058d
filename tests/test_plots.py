"""diagnostics.plots writes non-empty PNG files from flat metric rows (also as read back from CSV)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diagnostics import plot_matrices, plot_nfa_curves, plot_scalar_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(as_str: bool = False) -> list[dict]:
    rows = []
    for run in ("sgd", "slo"):
        for seed in (0, 1):
            for step in (0, 10, 20):
                for layer in ("0", "2"):
                    row = {"run": run, "seed": seed, "step": step, "layer": layer,
                           "uc_nfa": 0.5 + 0.01 * step + 0.01 * seed, "c_nfa": "" if step == 0 else 0.9,
                           "kind": "measured", "feature_quality": 0.3 + 0.02 * step, "test_mse": 3.0 / (1 + step)}
                    rows.append({k: str(v) for k, v in row.items()} if as_str else row)
    return rows


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.mark.parametrize("as_str", [False, True], ids=["numbers", "csv-strings"])
def test_plot_nfa_curves(tmp_path: Path, as_str: bool) -> None:
    path = plot_nfa_curves(_rows(as_str), tmp_path / "sub" / "nfa.png", title="t", linestyle_key="kind")
    assert _is_png(Path(path))


def test_plot_scalar_curves(tmp_path: Path) -> None:
    path = plot_scalar_curves(_rows(), tmp_path / "scalars.png", log_keys=("test_mse",))
    assert _is_png(Path(path))


def test_plot_matrices(tmp_path: Path) -> None:
    path = plot_matrices({"EGOP": torch.eye(6), "NFM": torch.randn(6, 6, dtype=torch.float64)}, tmp_path / "m.png")
    assert _is_png(Path(path))


def test_plot_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        plot_nfa_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="c_nfa"):
        plot_nfa_curves([{"step": 0, "layer": "0", "uc_nfa": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        plot_matrices({"v": torch.ones(3)}, tmp_path / "x.png")
