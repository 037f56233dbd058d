"""The correlation ``rho(A, B)`` of two matrices, shared by the ``d x d`` and ``k x k`` routes of the NFA terms.

- pearson (the default, as in the authors' code): each matrix's mean entry removed, then cosine;
- cosine: ``<A, B>_F / (|A|_F |B|_F)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype, check_choice

__all__ = ["CORRELATIONS", "matrix_correlation", "correlation_from_sums"]

CORRELATIONS = ("pearson", "cosine")

#: Entries converted to the correlation dtype at a time (no full float64 copy of a large matrix).
CORR_BLOCK = 1 << 18


def matrix_correlation(A: Tensor, B: Tensor, method: str = "pearson") -> Tensor:
    """``rho(A, B)`` of the flattened matrices, as a 0-dim float64 tensor (float32 on MPS).

    pearson: ``<A - mean(A), B - mean(B)>_F / (|A - mean(A)|_F |B - mean(B)|_F)``;
    cosine: ``<A, B>_F / (|A|_F |B|_F)``. NaN when a (centred) matrix is zero. The sums are taken over
    blocks of entries in float64, so no full-size copy of ``A`` or ``B`` is made.
    """
    check_choice("correlation", method, CORRELATIONS)
    if A.shape != B.shape:
        raise ValueError(f"matrix_correlation needs equal shapes, got {tuple(A.shape)} and {tuple(B.shape)}")
    dtype = accumulation_dtype(A.device)
    a = A.detach().reshape(-1)
    b = B.detach().reshape(-1).to(device=a.device)
    blocks = [(i, min(i + CORR_BLOCK, a.numel())) for i in range(0, a.numel(), CORR_BLOCK)]
    zero = torch.zeros((), dtype=dtype, device=a.device)
    mean_a = mean_b = zero
    if method == "pearson":
        for i, j in blocks:
            mean_a = mean_a + a[i:j].to(dtype).sum()
            mean_b = mean_b + b[i:j].to(dtype).sum()
        mean_a, mean_b = mean_a / max(a.numel(), 1), mean_b / max(a.numel(), 1)
    dot, sq_a, sq_b = zero, zero, zero
    for i, j in blocks:
        x, y = a[i:j].to(dtype) - mean_a, b[i:j].to(dtype) - mean_b
        dot, sq_a, sq_b = dot + x @ y, sq_a + x @ x, sq_b + y @ y
    return correlation_from_sums(dot, sq_a, sq_b)


def correlation_from_sums(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """``dot / (sqrt(sq_a) sqrt(sq_b))`` clamped to ``[-1, 1]`` (rounding can leave it by an ulp), NaN where
    ``sq_a`` or ``sq_b`` is 0: the one place every correlation of the library is formed, from ``<a, b>``,
    ``|a|²`` and ``|b|²`` of the (centred, for Pearson) entries."""
    denom = sq_a.sqrt() * sq_b.sqrt()
    return torch.where(denom > 0, (dot / denom).clamp(-1.0, 1.0), torch.full_like(denom, float("nan")))
