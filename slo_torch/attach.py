"""``attach``: Speed Limited Optimization on an existing optimizer, without wrapping it.

Registers a step pre-hook (and, for ``mode="update"``, a post-hook) on the optimizer instance. The
optimizer object, its class and its checkpoints are unchanged; ``handle.remove()`` undoes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layers import SpeedSpec
from .limiter import SpeedLimiter
from .readouts import LimiterReadouts
from .wrapping import deprecated_eps

__all__ = ["attach", "SLOHandle"]


class SLOHandle(LimiterReadouts):
    """Returned by :func:`attach`: read-outs of the limiter (as on ``SLOptimizer``) and ``remove()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, limiter: SpeedLimiter) -> None:
        self.optimizer = optimizer
        self.limiter = limiter
        self._skipped = False
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook)]
        if limiter.mode == "update":
            self._handles.append(optimizer.register_step_post_hook(self._post_hook))
        optimizer._slo_attached = True  # type: ignore[attr-defined]

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:  # step(None) and step(closure=None) mean no closure, as in torch
            raise RuntimeError(
                "attach() cannot speed-limit a step with a closure (the gradients do not exist yet when "
                "the hook runs); use SLOptimizer(optimizer, ...) instead"
            )
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        proceed = self.limiter.before_step(grad_scale, found_inf)
        self._skipped = not proceed
        if not proceed and (found_inf is None or not bool(found_inf)):
            self.limiter.skip_all_grads()  # non-finite gradient: make the step a no-op

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._skipped:
            self.limiter.after_step()

    @property
    def _limiter(self) -> SpeedLimiter:  # what LimiterReadouts reads
        return self.limiter

    def remove(self) -> None:
        """Detach: the optimizer steps as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.__dict__.pop("_slo_attached", None)


def attach(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None,
    speeds: SpeedSpec,
    mode: str = "auto",
    slo_eps: float = 0.0,
    per_tensor: bool = False,
    on_nonfinite: str = "skip",
    *,
    speed_unit: str = "frobenius",
    eps: float | None = None,
) -> SLOHandle:
    """Speed-limit ``optimizer`` in place: ``g_l <- C_l g_l / (||g_l||_F + slo_eps)`` before each step.

    Same arguments and maths as :class:`SLOptimizer` (``mode="grad"`` rescales ``p.grad`` in place;
    ``eps=`` is the deprecated name of ``slo_eps``). A non-finite gradient sets every gradient to
    ``None`` so the step changes neither parameters nor (for ``torch.optim`` optimizers) their state.
    Closures are not supported. Returns a handle; ``handle.remove()`` restores plain steps.
    ``speed_unit`` sets the target step norm ``lr * C_l * u_l`` as in :class:`SLOptimizer`.
    """
    from .optimizer import SLOptimizer

    if isinstance(optimizer, SLOptimizer):
        raise ValueError("This optimizer is already an SLOptimizer; attach() to a plain optimizer only")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_slo_attached", False):
        raise ValueError("A speed limit is already attached to this optimizer; call handle.remove() first")
    if getattr(optimizer, "_slo_wrapped", False):
        raise ValueError(
            "This optimizer is wrapped by an SLOptimizer, which speed-limits it already; step the "
            "SLOptimizer, or attach() to a plain optimizer"
        )
    if eps is not None:
        slo_eps = deprecated_eps(eps, slo_eps, "attach(..., eps=) is deprecated; use slo_eps=")
    limiter = SpeedLimiter(optimizer, model, speeds, mode, slo_eps, per_tensor, on_nonfinite, speed_unit)
    return SLOHandle(optimizer, limiter)
