"""Argument checks shared by the package: one place for each kind of check and its message."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["check_choice", "check_eps", "check_model", "check_speed"]


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value``; ``ValueError`` naming ``name`` and the valid choices unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid choices: {tuple(choices)}")
    return value  # type: ignore[return-value]


def check_eps(eps: object, name: str = "slo_eps") -> float:
    """Return ``eps`` as a float; ``ValueError`` unless it is a finite real number ``>= 0`` (not a bool)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Invalid {name}: {eps!r}; {name} must be a finite number >= 0")
    return float(eps)


def check_model(model: object) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module`` (or ``None``)."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module that owns the optimized parameters (model=model), got "
            f"{type(model).__name__}"
        )


def check_speed(speed: object, where: str) -> float:
    """Return ``speed`` as a float; ``ValueError`` unless it is a finite real number ``>= 0``.

    Python and NumPy numbers and one-element tensors are accepted.
    """
    if isinstance(speed, torch.Tensor):
        if speed.numel() != 1:
            raise ValueError(
                f"Invalid speed for {where}: a tensor of shape {tuple(speed.shape)}; a speed is a number "
                "or a one-element tensor"
            )
        speed = speed.item()
    if isinstance(speed, bool) or not isinstance(speed, numbers.Real):
        raise ValueError(f"Invalid speed for {where}: {speed!r}; speeds must be finite numbers >= 0")
    speed = float(speed)
    if not math.isfinite(speed) or speed < 0:
        raise ValueError(f"Invalid speed for {where}: {speed}; speeds must be finite numbers >= 0")
    return speed
