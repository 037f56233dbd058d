"""Command lines of experiment scripts: a parser whose ``--help`` shows the defaults, argparse types that
reject bad numbers with the reason, and up-front checks (output folder, optional packages) before any training."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..optional import require

__all__ = [
    "make_parser",
    "preset_parser",
    "parse_checked",
    "preset_settings",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "torch_device",
    "check_ready",
    "command_line",
    "exit_on",
]

S = TypeVar("S")


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


def torch_device(text: str) -> torch.device:
    """argparse ``type``: a ``torch.device`` that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
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


def command_line(argv: Sequence[str]) -> str:
    """The command that ran a script, as ``python examples/<script>.py <args>`` (``argv = sys.argv``): the same
    text wherever the script was started from, so files that quote it do not change between runs."""
    return " ".join(["python", f"examples/{Path(argv[0]).name}", *argv[1:]])



def preset_parser(doc: str | None, presets: Mapping[str, Any], out: str) -> argparse.ArgumentParser:
    """:func:`make_parser` with ``--preset`` (a key of ``presets``, default ``"default"``), ``--out`` (default
    ``out``) and ``--threads`` (torch CPU threads, default 1)."""
    ap = make_parser(doc)
    ap.add_argument("--preset", choices=sorted(presets), default="default", help="settings (see PRESETS)")
    ap.add_argument("--out", type=Path, default=Path(out), help="output folder")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch CPU threads (the networks are small: 1 is fastest)")
    return ap


def parse_checked(ap: argparse.ArgumentParser, argv: Sequence[str] | None,
                  modules: Iterable[str] = ("matplotlib",)) -> argparse.Namespace:
    """``ap.parse_args(argv)`` for a :func:`preset_parser`, then :func:`check_ready` on ``args.out`` and
    ``modules``; then ``torch.set_num_threads(args.threads)``."""
    args = ap.parse_args(argv)
    check_ready(ap, args.out, modules=modules)
    torch.set_num_threads(args.threads)
    return args


def preset_settings(presets: Mapping[str, S], args: argparse.Namespace, fields: Iterable[str] = ()) -> S:
    """``presets[args.preset]`` with each of ``fields`` replaced by the argument of that name where one was
    given (a list becomes a tuple)."""
    changes = {f: tuple(v) if isinstance(v, list) else v for f in fields if (v := getattr(args, f)) is not None}
    return replace(presets[args.preset], **changes)


@contextmanager
def exit_on(*errors: type[BaseException]) -> Iterator[None]:
    """Turn one of ``errors`` into ``error: <message>`` on stderr and exit status 2 (e.g. a missing data folder)."""
    try:
        yield
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
