"""The options of one ``K`` measurement, passed as one object from ``measure()`` / ``ptk_covariance``
down to the sums."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from .common import check_choice
from .probe import OutputFn, SampleMask

__all__ = ["EstimatorSettings", "ESTIMATORS", "check_estimator", "legacy_settings"]

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


_NAMES = {f.name for f in fields(EstimatorSettings)}


def legacy_settings(
    where: str, settings: Any, args: Sequence[Any], kwargs: dict[str, Any], order: Sequence[str]
) -> tuple[EstimatorSettings, dict[str, Any]]:
    """``(settings, other options)`` of a call that may still pass the options one by one (deprecated):
    ``settings`` is then the first of them (``order`` names the positional ones, starting with it)."""
    if isinstance(settings, EstimatorSettings):
        if args or kwargs:
            raise TypeError(f"{where}() takes an EstimatorSettings or the options one by one, not both")
        return settings, {}
    if settings is None and not args and not kwargs:
        return EstimatorSettings(), {}
    warnings.warn(
        f"passing the estimator options to {where} one by one is deprecated; pass an EstimatorSettings",
        DeprecationWarning,
        stacklevel=3,
    )
    positional = (settings, *args) if settings is not None or args else ()
    if len(positional) > len(order):
        raise TypeError(f"{where}() takes at most {len(order)} estimator options by position, got {len(positional)}")
    given = dict(zip(order, positional))
    for key in kwargs:
        if key not in order:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        if key in given:
            raise TypeError(f"{where}() got multiple values for argument {key!r}")
    given.update(kwargs)
    options = {k: v for k, v in given.items() if k in _NAMES}
    return EstimatorSettings(**options), {k: v for k, v in given.items() if k not in _NAMES}
