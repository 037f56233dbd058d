"""Helpers shared across the package: argument-choice checks, the dtype of running sums, eval mode."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = ["check_choice", "accumulation_dtype", "eval_mode"]


def _alternatives(choices: Sequence[str]) -> str:
    """``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_choice(what: str, value: Any, choices: Sequence[str], hint: str = "") -> None:
    """Raise ``ValueError("unknown <what> <value>; use 'a' or 'b'<hint>")`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; use {_alternatives(choices)}{hint}")


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """dtype of running sums and correlations: float64, float32 on MPS (which has no float64).

    Summing thousands of float32 partial Grams in float32 loses ~1e-5 relative accuracy at 20000
    samples; the per-block Grams themselves stay in the working dtype."""
    return torch.float32 if device.type == "mps" else torch.float64


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; afterwards (also on error) every submodule is given back its own
    previous mode through ``train(mode)`` calls, parents before children (``model.train(was_training)``
    alone would not restore mixed modes), so that modules whose ``train()`` does work (merging adapters,
    clearing caches built in eval mode) run it: their state afterwards is the state before."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:  # pre-order: a parent's call sets its subtree, children then differ
            if m is model or m.training != training:
                m.train(training)

