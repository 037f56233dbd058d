"""Read-outs shared by :class:`~slo_torch.SLOptimizer` and :class:`~slo_torch.SLOHandle`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .limiter import SpeedLimiter

__all__ = ["LimiterReadouts"]


class LimiterReadouts:
    """Read-outs of the :class:`SpeedLimiter` in ``self._limiter``, shared by ``SLOptimizer`` and ``SLOHandle``."""

    _limiter: SpeedLimiter

    @property
    def mode(self) -> str:
        """``"grad"`` or ``"update"``: the mode in force (``"auto"`` resolved for the optimizer's class)."""
        return self._limiter.mode

    @property
    def speed_unit(self) -> str:
        """``"frobenius"``, ``"rms"`` or ``"relative"``: each layer's target step norm is ``lr * C_l * u_l``."""
        return self._limiter.speed_unit

    @property
    def layer_names(self) -> list[str]:
        """Names of the speed-limited layers, in model order."""
        self._limiter.refresh()
        return self._limiter.layer_names

    @property
    def last_grad_norms(self) -> dict[str, Tensor]:
        """Per-layer gradient norms ``||g_l||_F`` of the last step taken, before normalisation (0-dim tensors)."""
        return self._limiter.last_grad_norms

    @property
    def last_update_norms(self) -> dict[str, Tensor]:
        """``mode="update"``: per-layer norms of the base optimizer's update, before rescaling."""
        return self._limiter.last_update_norms

    @property
    def nonfinite_steps(self) -> int:
        """Number of steps skipped (made no-ops) because of a non-finite gradient."""
        return self._limiter.nonfinite_steps

    @property
    def taken_steps(self) -> int:
        """Number of steps taken (not skipped); ``last_grad_norms`` belong to the last of them."""
        return self._limiter.taken_steps
