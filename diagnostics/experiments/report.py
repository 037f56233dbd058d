"""Results of experiment scripts: CSV rows, markdown tables (mean ± std over seeds), the run's settings and
``run.json``. Every file is written atomically (:mod:`diagnostics.files`)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text
from .cli import command_line

__all__ = [
    "write_csv",
    "markdown_table",
    "mean_std",
    "mean_std_table",
    "settings_table",
    "namespace_settings",
    "nfa_long_rows",
    "nfa_row",
    "last_rows",
    "write_run_info",
    "finish_run",
]


def _cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if value is None:
        return ""
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` (flat dicts) as CSV, atomically; columns = all keys in order of first appearance."""
    fields: dict[str, None] = {}
    for row in rows:
        fields.update(dict.fromkeys(row))

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _cell(v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue(), newline="")


def _as_float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def write_run_info(out: str | os.PathLike[str], argv: Sequence[str], wall_s: float) -> Path:
    """Write what changes from run to run (wall time, machine, versions) to ``out/run.json``, atomically, and
    print it as one line. ``results.md`` holds only what the command determines, so re-running a committed
    result leaves the repository unchanged (``.gitignore`` covers ``run.json``)."""
    import platform

    info = {"command": command_line(argv), "wall_s": round(wall_s, 1), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    path = atomic_write_text(Path(out) / "run.json", json.dumps(info, indent=1) + "\n")
    print(f"wall time {wall_s:.0f} s on {os.cpu_count()} {platform.machine()} CPU core(s), "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__} (written to {path})")
    return path


def nfa_long_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with one ``correlation`` value each and ``measure`` = UC-NFA or C-NFA (for one panel per layer with
    both curves); ``step`` is the row's ``step`` or, where it has none, its ``epoch``; the row's ``estimator``
    is kept where it has one (the plots leave out the analytic output layer, 1 by construction)."""
    return [{"run": r["run"], "seed": r["seed"], "step": r.get("step", r.get("epoch")), "layer": r["layer"],
             **({"estimator": r["estimator"]} if "estimator" in r else {}), "measure": name, "correlation": r[key]}
            for r in rows for key, name in (("uc_nfa", "UC-NFA"), ("c_nfa", "C-NFA"))]


def markdown_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table from a header and rows of cells (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value) of a non-empty sequence."""
    if not values:
        raise ValueError("mean_std: need at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def settings_table(settings: Mapping[str, Any]) -> str:
    """The two-column markdown table ``| setting | value |`` of a run's settings."""
    return markdown_table(["setting", "value"], [[k, v] for k, v in settings.items()])


def mean_std_table(
    rows: Sequence[Mapping[str, Any]],
    group_keys: Sequence[str],
    value_keys: Sequence[str],
    digits: int = 3,
) -> str:
    """Markdown table: one line per distinct value of ``group_keys`` (first-seen order), each value key as
    ``mean ± std`` over that group's rows (sample std, ``n - 1``; only the mean for a single row; missing
    or non-numeric values are skipped), plus the count ``n`` of rows."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        missing = [k for k in group_keys if k not in row]
        if missing:
            raise ValueError(f"mean_std_table: row lacks group key(s) {missing}; available keys: {sorted(row)}")
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    body = []
    for key, members in groups.items():
        cells: list[Any] = list(key)
        for vk in value_keys:
            vals = [v for v in (_as_float(m.get(vk)) for m in members) if math.isfinite(v)]
            if not vals:
                cells.append("n/a")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.{digits}f}")
            else:
                mean, std = mean_std(vals)
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        cells.append(len(members))
        body.append(cells)
    return markdown_table([*group_keys, *value_keys, "n"], body)


def nfa_row(head: Mapping[str, Any], record: Any, **values: float) -> dict[str, Any]:
    """``head``, the record's ``layer`` and ``estimator``, then its ``uc_nfa``, ``c_nfa``, ``rel_change``,
    ``kernel_alignment`` and ``values``, each rounded to 5 significant digits."""
    numbers = dict(uc_nfa=record.uc_nfa, c_nfa=record.c_nfa, rel_change=record.rel_change,
                   kernel_alignment=record.kernel_alignment, **values)
    return {**head, "layer": record.layer, "estimator": record.estimator,
            **{k: float(f"{v:.5g}") for k, v in numbers.items()}}


def last_rows(rows: Sequence[Mapping[str, Any]], step_key: str = "step") -> list[Mapping[str, Any]]:
    """The rows at the last ``step_key`` of their own (run, seed): a run that stopped early ends where it stopped."""
    end: dict[tuple[Any, Any], Any] = {}
    for r in rows:
        end[r["run"], r["seed"]] = max(end.get((r["run"], r["seed"]), 0), r[step_key])
    return [r for r in rows if r[step_key] == end[r["run"], r["seed"]]]


def namespace_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as a settings dict (paths and devices as text), for :func:`settings_table`."""
    return {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}


def finish_run(out: str | os.PathLike[str], text: str, argv: Sequence[str], wall_s: float) -> None:
    """Write ``text`` to ``out/results.md``, print it, then :func:`write_run_info`."""
    atomic_write_text(Path(out) / "results.md", text)
    print(text)
    write_run_info(out, argv, wall_s)
