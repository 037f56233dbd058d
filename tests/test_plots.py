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


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every matplotlib Figure saved during the test (they are still written to disk)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _layer_rows(n_layers: int) -> list[dict]:
    """Three runs whose curves all sit at 1.0 in the last layer (as a readout's NFA does)."""
    return [{"run": run, "seed": 0, "step": step, "layer": str(layer),
             "uc_nfa": 1.0 if layer == n_layers - 1 else 0.1 * i + 0.01 * step, "c_nfa": 0.5}
            for i, run in enumerate(("sgd", "small_init", "slo")) for step in (1, 2, 3) for layer in range(n_layers)]


def _columns(fig) -> int:
    return max(ax.get_subplotspec().get_gridspec().ncols for ax in fig.axes if ax.get_subplotspec() is not None)


def test_nfa_curves_one_figure_legend_labels_and_wrapping(tmp_path: Path, saved_figures: list) -> None:
    plot_nfa_curves(_layer_rows(6), tmp_path / "nfa.png", x_label="epoch")
    (fig,) = saved_figures
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 12 and _columns(fig) <= 4
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend inside a panel, over the curves
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["sgd", "small_init", "slo"]
    assert len({h.get_color() for h in legend.legend_handles}) == 3  # every series distinguishable
    assert {ax.get_xlabel() for ax in panels} == {"epoch"}
    assert {ax.get_ylabel() for ax in panels} == {"UC-NFA", "C-NFA"}


def test_numeric_groups_are_named_in_the_legend(tmp_path: Path, saved_figures: list) -> None:
    rows = [{"init_scale": s, "kind": k, "step": t, "layer": "0", "c_nfa": 0.5} for s in (1.0, 0.1)
            for k in ("measured", "predicted") for t in (1, 2)]
    plot_nfa_curves(rows, tmp_path / "e.png", metrics=("c_nfa",), group_key="init_scale", linestyle_key="kind")
    labels = [t.get_text() for t in saved_figures[0].legends[0].get_texts()]
    assert labels == ["init scale 1.0 / measured", "init scale 1.0 / predicted", "init scale 0.1 / measured",
                      "init scale 0.1 / predicted"]


def test_scalar_curves_wrap_and_label(tmp_path: Path, saved_figures: list) -> None:
    keys = ("train_loss", "test_loss", "train_acc", "test_acc", "feature_quality")
    rows = [{"run": r, "step": t, **{k: 0.5 + t for k in keys}} for r in ("sgd", "slo") for t in (0, 1)]
    plot_scalar_curves(rows, tmp_path / "s.png", keys=keys, x_label="epoch")
    (fig,) = saved_figures
    assert _columns(fig) <= 4 and len(fig.legends) == 1
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_visible()] == [
        "train loss", "test loss", "train accuracy", "test accuracy", "feature quality"]


def test_matrices_have_integer_ticks(tmp_path: Path, saved_figures: list) -> None:
    plot_matrices({"EGOP": torch.eye(20), "NFM": torch.eye(20)}, tmp_path / "m.png", index_name="x")
    fig = saved_figures[0]
    for ax in fig.axes[:2]:
        lo, hi = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
        assert ax.xaxis.get_major_formatter()(0, 0) == "$x_{1}$"  # matrix index 0 is x_1


def test_output_layer_gets_no_panel_and_a_note(tmp_path: Path, saved_figures: list) -> None:
    """A layer whose K is known to be the identity (estimator "analytic": NFA 1 by construction) is not drawn;
    the legend's heading says why; panels carry the given layer names and one y-range per metric."""
    rows = [{**r, "estimator": "analytic" if r["layer"] == "2" else "exact"} for r in _layer_rows(3)]
    plot_nfa_curves(rows, tmp_path / "nfa.png", layer_names={"0": "layer 0 (first)", "2": "layer 2 (readout)"})
    (fig,) = saved_figures
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["UC-NFA - layer 0 (first)", "UC-NFA - layer 1",
                                                 "C-NFA - layer 0 (first)", "C-NFA - layer 1"]
    note = fig.legends[0].get_title().get_text()
    assert "layer 2 (readout)" in note and "1 by construction" in note
    assert panels[0].get_ylim() == panels[1].get_ylim() and panels[2].get_ylim() == panels[3].get_ylim()
    assert len({ax.get_xlim() for ax in panels}) == 1


def test_every_layer_analytic_is_still_drawn(tmp_path: Path, saved_figures: list) -> None:
    rows = [{**r, "estimator": "analytic"} for r in _layer_rows(2)]
    plot_nfa_curves(rows, tmp_path / "nfa.png")
    assert len([ax for ax in saved_figures[0].axes if ax.get_visible()]) == 4


def test_band_is_named_in_the_legend_and_single_runs_get_a_colour_per_metric(tmp_path: Path,
                                                                              saved_figures: list) -> None:
    plot_nfa_curves(_rows(), tmp_path / "seeds.png")
    labels = [t.get_text() for t in saved_figures[0].legends[0].get_texts()]
    assert labels == ["sgd", "slo", "band: mean ± 1 std over 2 seeds"]
    single = [{k: v for k, v in r.items() if k not in ("run", "seed")} for r in _rows() if r["run"] == "sgd"
              and r["seed"] == 0]
    plot_nfa_curves(single, tmp_path / "one.png")
    legend = saved_figures[1].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["UC-NFA", "C-NFA"]
    assert len({h.get_color() for h in legend.legend_handles}) == 2


def test_experiment_rows_keep_the_estimator_so_the_output_layer_gets_no_panel(tmp_path: Path,
                                                                               saved_figures: list) -> None:
    # the image examples' path: NFAMonitor records -> nfa_row -> nfa_long_rows -> one panel per measured layer
    from torch import nn

    from diagnostics import NFAMonitor
    from diagnostics.experiments import nfa_long_rows, nfa_row

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    mon = NFAMonitor(model)
    rows = [nfa_row({"run": "sgd", "seed": 0, "step": step}, rec, lr=0.1)
            for step in (0, 1) for rec in mon.measure(torch.randn(8, 5), step=step).values()]
    assert {r["layer"]: r["estimator"] for r in rows} == {"0": "exact", "2": "analytic"}
    plot_nfa_curves(nfa_long_rows(rows), tmp_path / "nfa.png", metrics=("correlation",), linestyle_key="measure")
    (fig,) = saved_figures
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["correlation - layer 0"]
