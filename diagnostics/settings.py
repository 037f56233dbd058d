"""The options of one ``K`` measurement, passed as one object from ``measure()`` / ``ptk_covariance``
down to the sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import check_choice
from .probe import OutputFn, SampleMask

__all__ = ["EstimatorSettings", "ESTIMATORS", "check_estimator"]

ESTIMATORS = ("exact", "sketch")


def check_estimator(estimator: str, m: int) -> None:
    """Validate ``estimator`` and ``m`` with messages that say what to pass instead."""
    check_choice("estimator", estimator, ESTIMATORS, " (with m=...)")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (number of sketch projections) must be an int >= 1, got {m!r}")


@dataclass(frozen=True, eq=False)
class EstimatorSettings:
    """How ``K`` is estimated on a probe (see :func:`diagnostics.ptk_covariance` for each option).

    ``estimator``: ``"exact"`` or ``"sketch"`` with ``m`` random projections of kind ``sketch`` drawn
    from ``generator``; ``output_fn`` maps the model output to ``f``; ``chunk_size`` samples per forward
    pass; ``allow_unused`` gives ``K = 0`` for layers no call of which ``f`` uses; ``sample_mask`` selects the
    real tokens."""

    estimator: str = "exact"
    m: int = 8
    generator: torch.Generator | int | None = None
    sketch: str = "rademacher"
    output_fn: OutputFn | None = None
    chunk_size: int | None = None
    allow_unused: bool = False
    sample_mask: SampleMask = None

    def check(self) -> None:
        """Raise ``ValueError`` for an unknown ``estimator`` or a bad ``m``."""
        check_estimator(self.estimator, self.m)

