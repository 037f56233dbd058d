"""Neural feature alignment (NFA) maths on weight matrices and PTK covariances.

Weights are in ``(k, d)`` = ``(out, in)`` layout, ``K`` is ``k x k``. Nothing here knows about
models or hooks.

- NFM ``F = W^T W``; AGOP ``G = W^T K W``.
- ``rho(A, B)``: Pearson correlation of the flattened matrices (each matrix's mean entry removed,
  then cosine; the default, as in the authors' code) or plain cosine ``<A,B>_F / (|A|_F |B|_F)``.
- UC-NFA ``rho(W^T W, (W^T K W)^s)``; C-NFA the same with ``dW = W - W_0``;
  kernel alignment ``rho(W W^T, K)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CORRELATIONS",
    "nfm",
    "agop",
    "psd_power",
    "matrix_correlation",
    "nfa_correlation",
    "kernel_alignment",
    "nfa_decomposition",
    "nfa_summary",
    "NORM_KEYS",
]

CORRELATIONS = ("pearson", "cosine")


def nfm(W: Tensor) -> Tensor:
    """Neural feature matrix ``F = W^T W`` (d x d)."""
    return W.t() @ W


def agop(W: Tensor, K: Tensor) -> Tensor:
    """Average gradient outer product w.r.t. the layer input, ``G = W^T K W`` (d x d)."""
    return W.t() @ (K @ W)


def psd_power(A: Tensor, power: float) -> Tensor:
    """Matrix power ``A^s`` of a symmetric PSD matrix via ``eigh`` with eigenvalues clamped at 0."""
    if power == 1:
        return A
    A = 0.5 * (A + A.t())
    evals, evecs = torch.linalg.eigh(A)
    return (evecs * evals.clamp_min(0).pow(power)) @ evecs.t()


def _check_method(method: str) -> None:
    if method not in CORRELATIONS:
        raise ValueError(f"unknown correlation {method!r}; use 'pearson' or 'cosine'")


def matrix_correlation(A: Tensor, B: Tensor, method: str = "pearson") -> Tensor:
    """``rho(A, B)`` of the flattened matrices, as a 0-dim float64 tensor (float32 on MPS).

    pearson: ``<A - mean(A), B - mean(B)>_F / (|A - mean(A)|_F |B - mean(B)|_F)``;
    cosine: ``<A, B>_F / (|A|_F |B|_F)``. NaN when a (centred) matrix is zero.
    """
    _check_method(method)
    if A.shape != B.shape:
        raise ValueError(f"matrix_correlation needs equal shapes, got {tuple(A.shape)} and {tuple(B.shape)}")
    dtype = torch.float32 if A.device.type == "mps" else torch.float64
    a = A.detach().reshape(-1).to(dtype)
    b = B.detach().reshape(-1).to(device=a.device, dtype=dtype)
    if method == "pearson":
        a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return torch.where(denom > 0, (a @ b) / denom, torch.full_like(denom, float("nan")))


def nfa_correlation(W: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0) -> Tensor:
    """NFA correlation ``rho(W^T W, (W^T K W)^power)`` (UC-NFA for ``W``, C-NFA for ``W - W_0``)."""
    return matrix_correlation(nfm(W), psd_power(agop(W, K), power), method)


def kernel_alignment(W: Tensor, K: Tensor, method: str = "pearson") -> Tensor:
    """Alignment of the layer's left Gram matrix with ``K``: ``rho(W W^T, K)``."""
    return matrix_correlation(W @ W.t(), K, method)


NORM_KEYS = ("nfm_init", "nfm_cross", "nfm_centered", "agop_init", "agop_cross", "agop_centered")


def _decomposition_norms(W0: Tensor, D: Tensor, K: Tensor, KD: Tensor, FD: Tensor, GD: Tensor) -> Tensor:
    """The six norms of :func:`nfa_decomposition` stacked in ``NORM_KEYS`` order (no host sync), given
    ``KD = K dW`` and the centred terms ``FD = dW^T dW``, ``GD = dW^T K dW`` already computed."""
    cross = W0.t() @ D
    kcross = W0.t() @ KD
    terms = (nfm(W0), cross + cross.t(), FD, agop(W0, K), kcross + kcross.t(), GD)
    return torch.stack([t.norm() for t in terms])


def nfa_decomposition(W: Tensor, W0: Tensor, K: Tensor) -> dict[str, float]:
    """Frobenius norms of the init / cross / centred terms of ``W^T W`` and ``W^T K W`` with
    ``W = W0 + dW``:

    ``nfm_init = |W0^T W0|``, ``nfm_cross = |W0^T dW + dW^T W0|``, ``nfm_centered = |dW^T dW|``,
    ``agop_init = |W0^T K W0|``, ``agop_cross = |W0^T K dW + dW^T K W0|``, ``agop_centered = |dW^T K dW|``.
    """
    W0 = W0.to(W)
    D = W - W0
    KD = K @ D
    norms = _decomposition_norms(W0, D, K, KD, nfm(D), D.t() @ KD)
    return dict(zip(NORM_KEYS, norms.tolist()))


def nfa_summary(
    W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0
) -> dict[str, Any]:
    """Everything a monitor reports for one layer: ``uc_nfa``, ``c_nfa``, ``rel_change``
    (``|W - W0|_F / |W|_F``), ``kernel_alignment`` and the decomposition ``norms``, plus the
    matrices ``nfm`` and ``agop`` (of ``W``).

    The centred ``dW^T dW`` and ``dW^T K dW`` are formed once (shared by the C-NFA and the
    decomposition) and all scalars reach the host in one transfer."""
    W0 = W0.to(W)
    D = W - W0
    F, G = nfm(W), agop(W, K)
    KD = K @ D
    FD, GD = nfm(D), D.t() @ KD  # = agop(D, K)
    w_norm = W.norm()
    corrs = torch.stack([
        matrix_correlation(F, psd_power(G, power), method),
        matrix_correlation(FD, psd_power(GD, power), method),
        kernel_alignment(W, K, method),
    ])
    rel_change = torch.where(w_norm > 0, D.norm() / w_norm, torch.full_like(w_norm, float("nan")))
    norms = _decomposition_norms(W0, D, K, KD, FD, GD)
    values = torch.cat([corrs, torch.stack([rel_change]).to(corrs), norms.to(corrs)]).tolist()
    return {
        "uc_nfa": values[0],
        "c_nfa": values[1],
        "rel_change": values[3],
        "kernel_alignment": values[2],
        "norms": dict(zip(NORM_KEYS, values[4:])),
        "nfm": F,
        "agop": G,
    }
