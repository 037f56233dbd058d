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
from .correlation import CORR_BLOCK, CORRELATIONS, correlation_from_sums
from .output_space import block_mean
from .nfa import norm_ratio, sym_norm, nfm, nfm_agop_correlation, summary_record

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


#: Entries of ``W`` (``k x d``) taken at a time: rows in blocks of ``max(1, ROW_BLOCK // d)``, so no full copy
#: of a large output layer's weight (an LM head) is made.
ROW_BLOCK = 1 << 18


def _row_slices(k: int, d: int) -> list[slice]:
    step = max(1, ROW_BLOCK // d)
    return [slice(i, min(i + step, k)) for i in range(0, k, step)]


def identity_kernel_alignment(W: Tensor, method: str = "pearson") -> Tensor:
    """``rho(W W^T, I_k)`` without forming ``k x k`` matrices (0-dim, float64; float32 on MPS).

    With ``A = W W^T``: ``tr A = |W|_F^2``, ``|A|_F = |W^T W|_F``; cosine: ``tr A / (|A|_F sqrt(k))``.
    pearson, with ``V = W - 1 w^T`` (``w`` the mean row): ``A - mean(A) = V V^T + u 1^T + 1 u^T``,
    ``u = V w``, ``1^T u = 0``, so ``rho = |V|_F^2 / sqrt((|V^T V|_F^2 + 2k |V w|^2)(k - 1))``: sums of the
    centred terms, no difference of large sums. The sums are taken over blocks of rows (``ROW_BLOCK``
    entries) in the accumulation dtype. NaN where :func:`diagnostics.matrix_correlation` gives NaN (a zero
    (centred) matrix)."""
    check_choice("correlation", method, CORRELATIONS)
    dtype = accumulation_dtype(W.device)
    W = W.detach()
    k, d = W.shape
    slices = _row_slices(k, d)
    block = lambda s: W[s].to(dtype)  # noqa: E731
    mean = rest = W.new_zeros((d,), dtype=dtype)
    if method == "pearson":
        mean, rest = block_mean(block, slices, 0, k)
    w = mean + rest
    sq_v, gram = W.new_zeros((), dtype=dtype), W.new_zeros((d, d), dtype=dtype)
    sq_u = sq_v.clone()
    for s in slices:
        V = W[s].to(dtype, copy=True).sub_(mean).sub_(rest)  # cosine: V = W
        sq_v += V.square().sum()
        gram.addmm_(V.t(), V)
        if method == "pearson":
            sq_u += (V @ w).square().sum()
    if method == "cosine":
        return correlation_from_sums(sq_v, gram.square().sum(), sq_v.new_tensor(float(k)))
    return correlation_from_sums(sq_v, gram.square().sum() + 2 * k * sq_u, sq_v.new_tensor(k - 1.0))


def output_layer_memory(k: int, d: int, itemsize: int, power: float = 1.0, keep_matrices: bool = False) -> int:
    """Upper bound of the bytes :func:`output_layer_summary` allocates: five ``d x d`` terms in the weight's
    dtype (the kept ``nfm`` with ``keep_matrices`` is one of them), the eigendecompositions for
    ``power != 1``, the float64 ``d x d`` Gram of :func:`identity_kernel_alignment` and the float64 blocks of
    the correlations, and two blocks of rows (``ROW_BLOCK`` entries) of at most 8 bytes (two float64 blocks
    of the alignment, or a block of ``dW`` and the cast block of ``W0``; one after the other)."""
    eigh = 8.5 * d * d if power != 1 else 0.0
    block = min(k, max(1, ROW_BLOCK // d)) * d
    return int(itemsize * (5 * d * d + eigh)) + 8 * (d * d + 4 * min(CORR_BLOCK, d * d) + 2 * block)


def output_layer_summary(
    W: Tensor, W0: Tensor, method: str = "pearson", power: float = 1.0, keep_matrices: bool = True
) -> dict[str, Any]:
    """:func:`diagnostics.nfa.nfa_summary` for ``K = I``: the AGOP terms equal the NFM terms
    (``W^T I W = W^T W``), only ``d x d`` matrices are formed (``nfm``/``agop`` ``None`` unless
    ``keep_matrices``); ``dW = W - W0`` is taken in blocks of rows (``ROW_BLOCK`` entries)."""
    k, d = W.shape
    F = nfm(W)
    FD, cross = W.new_zeros((d, d)), W.new_zeros((d, d))  # dW^T dW, W0^T dW
    dw_sq = []
    for s in _row_slices(k, d):
        W0_s = W0[s].to(W)
        D = W[s] - W0_s
        FD.addmm_(D.t(), D)
        cross.addmm_(W0_s.t(), D)
        dw_sq.append(D.norm())
    dw_norm = torch.stack(dw_sq).norm()
    del W0_s, D
    corrs = torch.stack([
        nfm_agop_correlation(F, F, method, power),  # AGOP = NFM
        nfm_agop_correlation(FD, FD, method, power),
        identity_kernel_alignment(W, method).to(W.device),
    ])
    init, cross_n, centred = nfm(W0.to(W)).norm(), sym_norm(cross), FD.norm()
    norms = torch.stack([init, cross_n, centred, init, cross_n, centred])
    kept = F if keep_matrices else None
    return summary_record(corrs, norm_ratio(dw_norm, W.norm()), norms, kept, kept)
