"""Figures of NFA measurements: curves over training steps and matrix heatmaps.

Rows are flat dicts as returned by ``NFAMonitor.to_rows()`` (keys ``step``, ``layer``, ``uc_nfa``,
``c_nfa``, ...) plus any extra keys such as ``run`` and ``seed``; values may also be strings, as read
back from a CSV file. matplotlib is imported inside the functions (object API, no pyplot state), so
importing this module costs nothing and works without a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write
from .optional import install_hint

__all__ = ["plot_nfa_curves", "plot_scalar_curves", "plot_matrices"]

_LINESTYLES = ("-", "--", ":", "-.")
_MAX_COLUMNS = 4
#: Axis labels of the usual row keys; other keys are shown with ``_`` replaced by a space.
AXIS_LABELS = {"uc_nfa": "UC-NFA", "c_nfa": "C-NFA", "feature_quality": "feature quality", "test_mse": "test MSE",
               "train_mse": "train MSE", "train_loss": "train loss", "test_loss": "test loss",
               "train_acc": "train accuracy", "test_acc": "test accuracy", "rel_change": "relative change",
               "kernel_alignment": "kernel alignment", "correlation": "correlation"}


def _float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, torch.Tensor):
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _label(key: str) -> str:
    return AXIS_LABELS.get(key, key.replace("_", " "))


def _columns(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid for ``n`` panels: at most four columns, rows filled evenly."""
    rows = math.ceil(n / _MAX_COLUMNS)
    return rows, math.ceil(n / rows)


def _figure(nrows: int, ncols: int, panel: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ModuleNotFoundError(f"diagnostics.plots needs matplotlib; {install_hint('matplotlib')}",
                                  name=exc.name) from exc

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _panels(n_blocks: int, n_per_block: int, panel: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, list[list[Any]]]:
    """A figure with ``n_blocks`` blocks of ``n_per_block`` panels each (a block starts on a new row), at most
    four columns; returns the figure and the axes per block. Unused grid cells are hidden."""
    rows, cols = _columns(n_per_block)
    fig, axes = _figure(n_blocks * rows, cols, panel)
    blocks = []
    for b in range(n_blocks):
        cells = [axes[b * rows + k // cols][k % cols] for k in range(rows * cols)]
        for ax in cells[n_per_block:]:
            ax.set_visible(False)
        blocks.append(cells[:n_per_block])
    return fig, blocks


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG atomically (see ``diagnostics.files.atomic_write``)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _seed_count(rows: Sequence[Mapping[str, Any]]) -> int:
    """Number of distinct ``seed`` values among ``rows`` (0 where no row has one)."""
    return len({r["seed"] for r in rows if "seed" in r})


def _finish(fig: Any, title: str | None, path: str | os.PathLike[str], band_seeds: int = 0,
            note: str | None = None) -> Path:
    """One figure-level legend below the panels (every labelled series once, none hidden behind curves; with
    ``band_seeds`` > 0 a grey entry says what the shaded bands are), an optional ``note`` as the legend's
    heading, the title, then save."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if band_seeds:
        from matplotlib.patches import Patch

        entries[f"band: mean ± 1 std over {band_seeds} seeds"] = Patch(color="grey", alpha=0.3, linewidth=0)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncols=min(len(entries), _MAX_COLUMNS), fontsize=8, title=note, title_fontsize=8)
    elif note:
        fig.supxlabel(note, fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _check_rows(rows: Sequence[Mapping[str, Any]], needed: Sequence[str], fn: str) -> None:
    if not rows:
        raise ValueError(f"{fn}: no rows to plot; pass a non-empty list of dicts (e.g. NFAMonitor.to_rows())")
    missing = [k for k in needed if not any(k in r for r in rows)]
    if missing:
        raise ValueError(f"{fn}: no row has key(s) {missing}; keys present: {sorted(set().union(*rows))}")


def _curves(
    ax: Any,
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    group_key: str | None,
    colours: Mapping[Any, Any],
    linestyle_key: str | None,
    styles: Mapping[Any, str],
    colour: Any = None,
) -> bool:
    """Draw ``metric`` against ``step`` for each (group, style) on ``ax``: mean line, +- std band over seeds.
    ``colour`` (optional) is used where ``colours`` has no entry for the group. Returns whether a band
    was drawn.

    Several rows with the same (group, style, seed, step) (e.g. one scalar repeated for every layer)
    count once: the first finite value is used.
    """
    banded = False
    series: dict[tuple[Any, Any], dict[float, dict[Any, float]]] = {}
    for r in rows:
        value = _float(r.get(metric))
        step = _float(r.get("step"))
        if not (math.isfinite(value) and math.isfinite(step)):
            continue
        key = (r.get(group_key) if group_key else None, r.get(linestyle_key) if linestyle_key else None)
        series.setdefault(key, {}).setdefault(step, {}).setdefault(r.get("seed"), value)
    for (group, style), by_step in series.items():
        steps = sorted(by_step)
        vals = [list(by_step[s].values()) for s in steps]
        mean = [sum(v) / len(v) for v in vals]
        std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0 for v, m in zip(vals, mean)]
        label = " / ".join(_series_name(k, x) for k, x in ((group_key, group), (linestyle_key, style))
                           if x is not None) or _label(metric)
        line_colour = colours.get(group, colour)
        ax.plot(steps, mean, color=line_colour, linestyle=styles.get(style, "-"), label=label, linewidth=1.4)
        if any(s > 0 for s in std):
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line_colour, alpha=0.2, linewidth=0)
            banded = True
    return banded


def _series_name(key: str | None, value: Any) -> str:
    """``sgd`` for a name, ``init_scale 0.1`` for a number (a bare number says nothing in a legend)."""
    return f"{_label(key)} {value}" if key and math.isfinite(_float(value)) else str(value)


def _pad_flat_axis(ax: Any) -> None:
    """Give a panel whose data is constant (e.g. a correlation that is 1 by construction) a readable y-range."""
    lo, hi = ax.dataLim.intervaly
    if math.isfinite(lo) and math.isfinite(hi) and hi - lo < 1e-6 * max(1.0, abs(hi)):
        pad = 0.05 * max(1.0, abs(hi))
        ax.set_ylim(lo - pad, hi + pad)


def _palettes(
    rows: Sequence[Mapping[str, Any]], group_key: str | None, linestyle_key: str | None
) -> tuple[dict[Any, Any], dict[Any, str]]:
    groups = _unique(r.get(group_key) for r in rows) if group_key else [None]
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    kinds = _unique(r.get(linestyle_key) for r in rows) if linestyle_key else [None]
    styles = {k: _LINESTYLES[i % len(_LINESTYLES)] for i, k in enumerate(kinds)}
    return colours, styles


def _analytic_layers(rows: Sequence[Mapping[str, Any]], layers: Sequence[str]) -> list[str]:
    """The layers whose every row has ``estimator == "analytic"``: the model's output layer, ``K = I``
    (:mod:`diagnostics.output_layer`), so UC-NFA = C-NFA = 1 by construction."""
    return [layer for layer in layers
            if all(r.get("estimator") == "analytic" for r in rows if str(r.get("layer", "")) == layer)]


def _share_y(block: Sequence[Any]) -> None:
    """One y-range for the panels of ``block`` (the union of their data), padded when the data is flat."""
    spans = [ax.dataLim.intervaly for ax in block if ax.has_data()]
    spans = [(lo, hi) for lo, hi in spans if math.isfinite(lo) and math.isfinite(hi)]
    if not spans:
        return
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    pad = 0.05 * (hi - lo) if hi - lo >= 1e-6 * max(1.0, abs(hi)) else 0.05 * max(1.0, abs(hi))
    for ax in block:
        ax.set_ylim(lo - pad, hi + pad)


def plot_nfa_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    metrics: Sequence[str] = ("uc_nfa", "c_nfa"),
    group_key: str = "run",
    title: str | None = None,
    linestyle_key: str | None = None,
    x_label: str = "step",
    layer_names: Mapping[str, str] | None = None,
) -> Path:
    """One block of panels per metric, one panel per layer (at most four columns), each metric against ``step``.

    One colour per value of ``group_key`` (ignored when no row has that key; then one colour per metric), one
    line style per value of ``linestyle_key`` (optional); where rows carry a ``seed`` key the line is the mean
    over seeds with a +- one-std band (the legend says so). The panels of one metric share one y-range, all
    panels one step range.
    A layer whose rows all have ``estimator == "analytic"`` (the model's output layer: ``K = I``, both
    correlations 1 by construction) gets no panel; a note heading the legend names it. ``layer_names`` maps a
    layer to its panel name (default ``layer <name>``). One legend for the whole figure; ``x_label`` names the
    ``step`` axis (e.g. "epoch"). Returns the PNG path.
    """
    _check_rows(rows, ["step", *metrics], "plot_nfa_curves")
    gk = group_key if any(group_key in r for r in rows) else None
    names = dict(layer_names or {})
    all_layers = _unique(str(r.get("layer", "")) for r in rows)
    constant = _analytic_layers(rows, all_layers)
    if len(constant) == len(all_layers):  # nothing else to draw: show them rather than an empty figure
        constant = []
    layers = [layer for layer in all_layers if layer not in constant]
    colours, styles = _palettes(rows, gk, linestyle_key)
    fig, blocks = _panels(len(metrics), len(layers))
    banded = False
    for i, (metric, block) in enumerate(zip(metrics, blocks)):
        for layer, ax in zip(layers, block):
            banded |= _curves(ax, [r for r in rows if str(r.get("layer", "")) == layer], metric, gk,
                              colours if gk else {}, linestyle_key, styles, colour=f"C{i % 10}")
            name = names.get(layer, f"layer {layer}")
            ax.set_title(f"{_label(metric)} - {name}" if layer else _label(metric), fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel(_label(metric))
            ax.grid(alpha=0.3)
        _share_y(block)
    spans = [ax.dataLim.intervalx for block in blocks for ax in block if ax.has_data()]
    if spans:  # one step axis for all panels (a C-NFA starts one measurement after its UC-NFA)
        lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
        pad = 0.03 * (hi - lo) if hi > lo else 0.5
        for ax in (ax for block in blocks for ax in block):
            ax.set_xlim(lo - pad, hi + pad)
    note = None
    if constant:
        which = ", ".join(names.get(layer, f"layer {layer}") for layer in constant)
        note = (f"No panel for {which}: the model's output layer, whose K is the identity, so its UC-NFA and "
                "C-NFA are 1 by construction.")
    return _finish(fig, title, path, band_seeds=_seed_count(rows) if banded else 0, note=note)


def plot_scalar_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    keys: Sequence[str] = ("feature_quality", "test_mse"),
    group_key: str = "run",
    log_keys: Sequence[str] = (),
    title: str | None = None,
    x_label: str = "step",
) -> Path:
    """One panel per key (at most four columns), the key against ``step``, one colour per ``group_key`` value,
    mean +- std over seeds; keys in ``log_keys`` get a log y-axis. A value repeated on several rows of the same
    (group, seed, step) - e.g. one row per layer - counts once. One legend for the whole figure; ``x_label``
    names the ``step`` axis. Returns the PNG path."""
    _check_rows(rows, ["step", *keys], "plot_scalar_curves")
    gk = group_key if any(group_key in r for r in rows) else None
    colours, styles = _palettes(rows, gk, None)
    fig, (block,) = _panels(1, len(keys))
    banded = False
    for key, ax in zip(keys, block):
        banded |= _curves(ax, rows, key, gk, colours, None, styles)
        _pad_flat_axis(ax)
        ax.set_title(_label(key), fontsize=9)
        ax.set_xlabel(x_label)
        ax.set_ylabel(_label(key))
        if key in log_keys:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    return _finish(fig, title, path, band_seeds=_seed_count(rows) if banded else 0)


def plot_matrices(
    mats: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    cmap: str = "viridis",
    index_name: str | None = None,
) -> Path:
    """Heatmaps of 2-D matrices (at most four per row), titled by their keys, each with its own colour bar and
    integer ticks; with ``index_name="x"`` the ticks read ``x_1, x_2, ...`` (1-based) instead of 0, 1, ..."""
    if not mats:
        raise ValueError("plot_matrices: pass a non-empty dict {title: 2-D tensor}")
    for name, m in mats.items():
        if torch.as_tensor(m).ndim != 2:
            raise ValueError(f"plot_matrices: matrix {name!r} must be 2-D, got shape {tuple(torch.as_tensor(m).shape)}")
    fig, (block,) = _panels(1, len(mats), panel=(4.2, 3.6))  # first: says how to install matplotlib if missing
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ticks = FuncFormatter(lambda v, _: f"${index_name}_{{{int(v) + 1}}}$" if index_name else f"{int(v)}")
    for ax, (name, m) in zip(block, mats.items()):
        arr = torch.as_tensor(m).detach().to("cpu", torch.float64).numpy()
        im = ax.imshow(arr, cmap=cmap, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            axis.set_major_formatter(ticks)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)
