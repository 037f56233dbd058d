"""``LayerRecord``: one layer's NFA measurement, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["LayerRecord"]


@dataclass
class LayerRecord:
    """One layer's measurement. ``K``, ``nfm``, ``agop`` are set only with ``keep_matrices=True``.

    ``estimator="analytic"`` marks a layer whose output is the model output: its ``K`` is exactly the
    identity (see :mod:`diagnostics.output_layer`); it is returned (and saved) as ``torch.eye(k)``
    only when ``k <= max_k``, else ``K`` is ``None``."""

    layer: str
    step: int
    uc_nfa: float
    c_nfa: float
    rel_change: float
    kernel_alignment: float
    estimator: str
    m: int | None
    n_samples: int
    correlation: str = "pearson"
    agop_power: float = 1.0
    norms: dict[str, float] = field(default_factory=dict)
    K: Tensor | None = None
    nfm: Tensor | None = None
    agop: Tensor | None = None

    def to_row(self) -> dict[str, Any]:
        """Flat dict of the scalar fields (decomposition norms as ``nfm_init`` ... keys)."""
        row = {
            "step": self.step,
            "layer": self.layer,
            "uc_nfa": self.uc_nfa,
            "c_nfa": self.c_nfa,
            "rel_change": self.rel_change,
            "kernel_alignment": self.kernel_alignment,
            "estimator": self.estimator,
            "m": self.m,
            "n_samples": self.n_samples,
            "correlation": self.correlation,
            "agop_power": self.agop_power,
        }
        row.update(self.norms)
        return row
