"""Deprecated: the helpers that were here are public API now; import them from there.

- ``diagnostics.experiments``: command lines, training loops, result tables (``make_parser``, ``train_mse``,
  ``mean_std_table``, ...);
- ``diagnostics.datasets``: ``chain_monomial``, ``chain_monomial_data``;
- ``diagnostics.optional``: ``require``, ``install_hint``;
- ``diagnostics.files.atomic_write_text`` replaces ``write_text``; ``make_optimizer`` is
  ``SLOptimizer(torch.optim.SGD(...), model=model, speeds=promote(model, layer, C))``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from diagnostics.datasets import chain_monomial, chain_monomial_data  # noqa: F401
from diagnostics.experiments import *  # noqa: F401,F403
from diagnostics.experiments import __all__ as _experiments_all
from diagnostics.files import atomic_write_text
from diagnostics.optional import EXTRAS, install_hint, require  # noqa: F401

warnings.warn("examples/common.py is deprecated: import from diagnostics.experiments, diagnostics.datasets and "
              "diagnostics.optional instead", DeprecationWarning, stacklevel=2)

__all__ = [*_experiments_all, "chain_monomial", "chain_monomial_data", "install_hint", "require", "write_text",
           "make_optimizer"]


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Deprecated alias of ``diagnostics.files.atomic_write_text(path, text)``."""
    return atomic_write_text(path, text)


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
