"""Speed Limited Optimization (SLO) for PyTorch.

Per layer ``l`` (a module's own parameters), before the wrapped optimizer steps:
``g_l <- C_l * g_l / (||g_l||_F + eps)``, so plain SGD moves each layer exactly ``lr * C_l`` per
step (Beaglehole, Mitliagkas, Agarwala, *Feature learning as alignment*, TMLR 2024).
"""

from .functional import layer_sq_norms, scale_layers_, slo_coefficients, slo_rescale_
from .layers import Layer, promote, promote_lowest, resolve_layers
from .optimizer import SLOHandle, SLOptimizer, attach

__all__ = [
    "SLOptimizer",
    "attach",
    "SLOHandle",
    "promote",
    "promote_lowest",
    "resolve_layers",
    "Layer",
    "slo_rescale_",
    "slo_coefficients",
    "layer_sq_norms",
    "scale_layers_",
]
