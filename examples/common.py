"""Helpers shared by the example scripts: models, seeding, data, atomic output files, tables.

The scripts in ``examples/`` import this module as ``from common import ...``; it works when a script
is run as ``python examples/<name>.py`` because the script's directory is then first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import random
import sys
import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from diagnostics.files import atomic_write_text

__all__ = [
    "bias_free_mlp",
    "hidden_layers",
    "scale_init_",
    "set_seed",
    "write_csv",
    "write_text",
    "mean_std",
    "mean_std_table",
    "settings_table",
    "progress",
    "chain_monomial",
    "chain_monomial_data",
    "minibatches",
    "mse",
    "markdown_table",
    "eval_schedule",
    "make_optimizer",
    "train_mse",
    "torch_device",
    "nfa_long_rows",
    "PhaseTimer",
    "write_run_info",
    "command_line",
    "make_parser",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "install_hint",
    "require",
    "check_ready",
]


# ----------------------------------------------------------------------------------------- models
def bias_free_mlp(d_in: int, width: int, depth: int, d_out: int) -> nn.Sequential:
    """``depth`` hidden layers ``Linear(bias=False) + ReLU`` of size ``width``, then a bias-free readout.

    The linear layers are the ``nn.Sequential`` entries ``"0", "2", ..., str(2 * depth)``;
    PyTorch's default initialisation is kept.
    """
    for name, value in (("d_in", d_in), ("width", width), ("d_out", d_out)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"bias_free_mlp: {name} must be a positive int, got {value!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"bias_free_mlp: depth (number of hidden layers) must be an int >= 0, got {depth!r}")
    mods: list[nn.Module] = []
    fan_in = d_in
    for _ in range(depth):
        mods += [nn.Linear(fan_in, width, bias=False), nn.ReLU()]
        fan_in = width
    mods.append(nn.Linear(fan_in, d_out, bias=False))
    return nn.Sequential(*mods)


def hidden_layers(depth: int) -> list[str]:
    """Module names of the hidden linear layers of ``bias_free_mlp(..., depth, ...)``: ``"0", "2", ...``
    (the readout, ``str(2 * depth)``, is left out)."""
    return [str(2 * i) for i in range(depth)]


@torch.no_grad()
def scale_init_(model: nn.Module, factor: float) -> nn.Module:
    """Multiply every parameter of ``model`` by ``factor`` in place (``factor = 0.1``: "small init")."""
    if not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"scale_init_: factor must be a finite positive number, got {factor!r}")
    for p in model.parameters():
        p.mul_(factor)
    return model


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy (when installed) and torch's default generator."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"set_seed: seed must be an int >= 0, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of the project
        return
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------------ data
def chain_monomial(x: torch.Tensor, r: int) -> torch.Tensor:
    """Chain-monomial target ``f*(x) = sum_{i=1}^{r} x_i x_{i+1}`` (first ``r + 1`` coordinates), shape (n,)."""
    if x.ndim != 2 or x.shape[1] < r + 1:
        raise ValueError(f"chain_monomial: need x of shape (n, d) with d >= r + 1 = {r + 1}, got {tuple(x.shape)}")
    if r < 1:
        raise ValueError(f"chain_monomial: r must be >= 1, got {r}")
    return (x[:, :r] * x[:, 1 : r + 1]).sum(dim=1)


def chain_monomial_data(
    n_train: int, n_test: int, d: int, r: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x ~ N(0, I_d)`` and ``y = f*(x)`` (shape (n, 1)) for a train and a test set, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=dtype)
    y = chain_monomial(x, r)[:, None]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def minibatches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of ``steps`` minibatches: reshuffled epochs, the last partial batch of an epoch dropped
    (full batch when ``batch_size >= n``)."""
    if batch_size < 1 or n < 1:
        raise ValueError(f"minibatches: need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[start : start + batch_size]
            done += 1


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error ``mean((f(x) - y)^2)`` of ``model`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return float(((model(x) - y) ** 2).mean())
    finally:
        model.train(was_training)


# -------------------------------------------------------------------------------------- training
def eval_schedule(steps: int, every: int) -> list[int]:
    """Steps at which to measure: ``0, every, 2·every, ...`` and always the last step ``steps``."""
    if steps < 0 or every < 1:
        raise ValueError(f"eval_schedule: need steps >= 0 and every >= 1, got steps={steps}, every={every}")
    return sorted({*range(0, steps + 1, every), steps})


def make_optimizer(
    model: nn.Module, optimizer: str, lr: float, C: float | None = None, layer: str = "0"
) -> torch.optim.Optimizer:
    """Plain SGD (``optimizer="sgd"``) or SLO over SGD (``"slo"``): ``promote(model, layer, C)`` gives
    ``layer`` the speed ``C`` and every other layer ``1/C``, so with SGD each layer moves ``lr·C_l`` per step."""
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if optimizer == "slo":
        if C is None:
            raise ValueError("make_optimizer: optimizer='slo' needs the speed C of the promoted layer (e.g. C=500)")
        from slo_torch import SLOptimizer, promote

        return SLOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model=model, speeds=promote(model, layer, C))
    raise ValueError(f"make_optimizer: unknown optimizer {optimizer!r}; use 'sgd' or 'slo'")


def train_mse(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    eval_steps: Sequence[int],
    on_eval: Callable[[int], None],
    desc: str = "",
) -> None:
    """Minibatch training on the MSE ``mean((f(x) - y)^2)``; calls ``on_eval(step)`` for every step in
    ``eval_steps`` (``0`` = before the first update, ``t`` = after ``t`` updates)."""
    wanted = set(eval_steps)
    if 0 in wanted:
        on_eval(0)
    batches = minibatches(X.shape[0], batch_size, steps, generator)
    for step, idx in enumerate(progress(batches, total=steps, desc=desc, leave=False), start=1):
        loss = ((model(X[idx]) - Y[idx]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in wanted:
            on_eval(step)


# ---------------------------------------------------------------------------------------- output
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


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    return atomic_write_text(path, text)


def _as_float(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def command_line(argv: Sequence[str]) -> str:
    """The command that ran a script, as ``python examples/<script>.py <args>`` (``argv = sys.argv``): the same
    text wherever the script was started from, so files that quote it do not change between runs."""
    return " ".join(["python", f"examples/{Path(argv[0]).name}", *argv[1:]])


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


def torch_device(text: str) -> torch.device:
    """argparse ``type``: a ``torch.device`` that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import argparse

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({exc}); use e.g. cpu or cuda") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: no such CUDA device here ({torch.cuda.device_count()} "
                                         "visible); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    return device


def nfa_long_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with one ``correlation`` value each and ``measure`` = UC-NFA or C-NFA (for one panel per layer with
    both curves); ``step`` is the row's ``step`` or, where it has none, its ``epoch``."""
    return [{"run": r["run"], "seed": r["seed"], "step": r.get("step", r.get("epoch")), "layer": r["layer"],
             "measure": name, "correlation": r[key]}
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


class PhaseTimer:
    """Wall and CPU seconds per named phase of a run (``with timer("train"): ...``), summed over its blocks;
    CUDA work is synchronised at the end of each block so that it is counted in its own phase. On a busy
    machine the CPU time of a one-thread run is close to what the phase takes on an idle core."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - wall
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def per_epoch(self, epochs: int) -> str:
        """``"train 1.23 s (CPU 1.1 s), ... per epoch"``: each phase's totals divided by ``epochs``."""
        n = max(1, epochs)
        return ", ".join(f"{name} {self.wall[name] / n:.3g} s (CPU {self.cpu[name] / n:.3g} s)"
                         for name in self.wall) + " per epoch"


def progress(iterable: Iterable[Any], **kw: Any) -> Iterable[Any]:
    """``tqdm(iterable, **kw)`` on a terminal, otherwise (or without tqdm) the plain iterable."""
    if not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the "examples" extra
        return iterable
    return tqdm(iterable, **kw)


# ---------------------------------------------------------------------------------- command line
#: Optional packages the examples use, and the extra of ``slo-torch`` that installs each.
EXTRAS = {"matplotlib": "examples", "tqdm": "examples", "scipy": "examples", "PIL": "examples",
          "sklearn": "examples", "transformers": "hf", "accelerate": "hf"}


def install_hint(module: str) -> str:
    """``"<module> is not installed: pip install \\"slo-torch[<extra>]\\""`` for an optional package."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    fix = f'pip install "slo-torch[{extra}]"' if extra else f"pip install {top}"
    return f"the optional package {top!r} is not installed; install it with: {fix}"


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``; if an optional package is missing, a ``ModuleNotFoundError``
    that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(install_hint(exc.name or module), name=exc.name) from exc


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default (except ``None``) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreConstAction):
            return action.help
        return super()._get_help_string(action)


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by the first paragraph of ``doc`` whose ``--help`` shows the defaults."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], formatter_class=_HelpFormatter)


def _number(kind: type, text: str, ok: Callable[[Any], bool], wanted: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
    if not (ok(value) and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type``: an integer ``>= 1``."""
    return _number(int, text, lambda v: v >= 1, "a positive integer (>= 1)")


def nonnegative_int(text: str) -> int:
    """argparse ``type``: an integer ``>= 0``."""
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number ``> 0``."""
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    """argparse ``type``: a finite number ``>= 0``."""
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def _output_dir_problem(path: Path, option: str) -> str | None:
    if path.exists():
        if not path.is_dir():
            return f"{option} {path} exists and is not a folder; pass a folder path (new or existing)"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{option} {path} is not writable; pass a folder you can write to"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{option} {path} cannot be created: {parent} is a file, not a folder; pass another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} {path} cannot be created: {parent} is not writable; pass a folder you can write to"
    return None


def check_ready(
    parser: argparse.ArgumentParser,
    out: str | os.PathLike[str] | None = None,
    modules: Iterable[str] = (),
    option: str = "--out",
) -> None:
    """Before any training: the output folder ``out`` can be created and written (nothing is created here) and
    the optional ``modules`` import; otherwise exit through ``parser.error`` (usage, the reason and the fix,
    status 2)."""
    problems = []
    if out is not None:
        problem = _output_dir_problem(Path(out), option)
        if problem:
            problems.append(problem)
    for module in modules:
        try:
            require(module)
        except ImportError as exc:
            problems.append(str(exc))
    if problems:
        parser.error("; ".join(problems))
