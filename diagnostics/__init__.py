"""Neural feature alignment (NFA) diagnostics for PyTorch models.

Per linear layer ``h = W x (+ b)``: the PTK feature covariance ``K`` (exact or sketched), the NFM
``W^T W``, the AGOP ``W^T K W``, and their correlations (UC-NFA, C-NFA) over training.
"""

from .attention import AttentionProjectionAdapter
from .hooks import LayerHooks
from .io import Snapshot, load_snapshot, write_snapshot
from .blocks import resolve_blocks
from .layers import LayerAdapter, find_linear_layers, register_adapter
from .correlation import matrix_correlation
from .lora import LoraAdapter
from .monitor import NFAMonitor
from .nfa import (
    agop,
    c_nfa,
    kernel_alignment,
    nfa_correlation,
    nfa_decomposition,
    nfm,
    psd_power,
    relative_change,
    uc_nfa,
)
from .ptk import layer_jacobians, ptk_covariance
from .records import LayerRecord
from .plots import plot_matrices, plot_nfa_curves, plot_scalar_curves
from .theory import early_cnfa_prediction, egop, feature_quality, randomize_kernel

__all__ = [
    "NFAMonitor",
    "LayerRecord",
    "resolve_blocks",
    "ptk_covariance",
    "layer_jacobians",
    "nfm",
    "agop",
    "psd_power",
    "matrix_correlation",
    "nfa_correlation",
    "uc_nfa",
    "c_nfa",
    "relative_change",
    "kernel_alignment",
    "nfa_decomposition",
    "find_linear_layers",
    "LayerAdapter",
    "AttentionProjectionAdapter",
    "LoraAdapter",
    "register_adapter",
    "LayerHooks",
    "load_snapshot",
    "write_snapshot",
    "Snapshot",
    "early_cnfa_prediction",
    "randomize_kernel",
    "egop",
    "feature_quality",
    "plot_nfa_curves",
    "plot_scalar_curves",
    "plot_matrices",
]
