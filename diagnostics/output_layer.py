"""Layers whose output is the model output (an LM head, a classifier readout): ``K = I`` exactly.

When the tensor ``f`` that ``output_fn`` returns is the very tensor a selected layer handed on (the
same object, not modified in place since, and the layer's only call in the forward pass), then
``g_{alpha,c} = df_c(x_alpha)/dh = e_c`` for every row ``alpha`` and output ``c`` of that row, so
``K_unnorm = sum_c G_c^T G_c = N I`` and ``K = K_unnorm / N = I`` (``k x k``; never formed, no
backward pass needed). Outputs and rows that a mask excludes are excluded together, so ``K = I`` holds
with masks as well. The NFM is ``W^T W`` and the AGOP ``W^T I W = W^T W``, both ``d x d``; the kernel
alignment ``rho(W W^T, I)`` is computed from ``d x d`` quantities too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .probe import Chunk
from .common import accumulation_dtype, check_choice
from .correlation import CORRELATIONS, correlation_from_sums
from .nfa import sym_norm, nfm, nfm_agop_correlation, summary_record

__all__ = ["model_output_layers", "identity_kernel_alignment", "output_layer_summary", "output_layer_memory", "ESTIMATOR"]

#: ``LayerRecord.estimator`` of a layer whose ``K = I`` is known analytically.
ESTIMATOR = "analytic"


def model_output_layers(chunk: Chunk) -> set[str]:
    """Names of the layers called once in this forward pass whose handed-on output *is* ``chunk.f``
    (same tensor object, unchanged version counter: no operation, in place or not, came after it)."""
    found = set()
    for name, calls in chunk.returned.items():
        if len(calls) == 1:
            ref, version = calls[0]
            if ref() is chunk.f and chunk.f._version == version:
                found.add(name)
    return found


def identity_kernel_alignment(W: Tensor, method: str = "pearson") -> Tensor:
    """``rho(W W^T, I_k)`` without forming ``k x k`` matrices (0-dim, float64; float32 on MPS).

    With ``A = W W^T``: ``tr A = |W|_F^2``, ``|A|_F = |W^T W|_F``; cosine: ``tr A / (|A|_F sqrt(k))``.
    pearson, with ``V = W - 1 w^T`` (``w`` the mean row): ``A - mean(A) = V V^T + u 1^T + 1 u^T``,
    ``u = V w``, ``1^T u = 0``, so ``rho = |V|_F^2 / sqrt((|V^T V|_F^2 + 2k |V w|^2)(k - 1))``: sums of the
    centred terms, no difference of large sums. NaN where :func:`diagnostics.matrix_correlation` gives
    NaN (a zero (centred) matrix)."""
    check_choice("correlation", method, CORRELATIONS)
    dtype = accumulation_dtype(W.device)
    k = W.shape[0]
    if method == "cosine":
        W = W.detach().to(dtype)
        trace, frob2 = W.pow(2).sum(), nfm(W).pow(2).sum()
        return correlation_from_sums(trace, frob2, trace.new_tensor(float(k)))
    V = W.detach().to(dtype, copy=True)
    mean = V.mean(dim=0)
    rest = V.sub_(mean).mean(dim=0)  # a second pass removes what the rounding of the first left
    V.sub_(rest)
    mean += rest
    sq_a = nfm(V).pow(2).sum() + 2 * k * (V @ mean).pow(2).sum()
    return correlation_from_sums(V.pow(2).sum(), sq_a, V.new_tensor(k - 1.0))


def output_layer_memory(k: int, d: int, itemsize: int, power: float = 1.0, keep_matrices: bool = False) -> int:
    """Upper bound of the bytes :func:`output_layer_summary` allocates: ``dW`` (``k x d``), four ``d x d``
    terms, the eigendecompositions for ``power != 1``, the kept ``nfm``, and the 8-byte centred copy of
    ``W`` and its ``d x d`` Gram of :func:`identity_kernel_alignment`."""
    eigh = 8.5 * d * d if power != 1 else 0.0
    return int(itemsize * (k * d + 4 * d * d + eigh + (d * d if keep_matrices else 0))) + 8 * (k * d + d * d)


def output_layer_summary(
    W: Tensor, W0: Tensor, method: str = "pearson", power: float = 1.0, keep_matrices: bool = True
) -> dict[str, Any]:
    """:func:`diagnostics.nfa.nfa_summary` for ``K = I``: the AGOP terms equal the NFM terms
    (``W^T I W = W^T W``), only ``d x d`` matrices are formed (``nfm``/``agop`` ``None`` unless
    ``keep_matrices``)."""
    W0 = W0.to(W)
    D = W - W0
    F, FD = nfm(W), nfm(D)
    cross = W0.t() @ D
    corrs = torch.stack([
        nfm_agop_correlation(F, F, method, power),  # AGOP = NFM
        nfm_agop_correlation(FD, FD, method, power),
        identity_kernel_alignment(W, method).to(W.device),
    ])
    init, cross_n, centred = nfm(W0).norm(), sym_norm(cross), FD.norm()
    norms = torch.stack([init, cross_n, centred, init, cross_n, centred])
    kept = F if keep_matrices else None
    return summary_record(corrs, W, D, norms, kept, kept)
