"""Neural feature alignment (NFA) maths on weight matrices and PTK covariances.

Weights are in ``(k, d)`` = ``(out, in)`` layout, ``K`` is ``k x k``. Nothing here knows about
models or hooks.

- NFM ``F = W^T W``; AGOP ``G = W^T K W``.
- ``rho(A, B)``: :func:`diagnostics.correlation.matrix_correlation` (Pearson or cosine).
- UC-NFA ``rho(W^T W, (W^T K W)^s)``; C-NFA the same with ``dW = W - W_0``;
  kernel alignment ``rho(W W^T, K)``; relative change ``|dW|_F / |W|_F``.

Each formula has one function here; :func:`nfa_summary` (what a monitor records per layer) forms the
``d x d`` terms once and calls those functions on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .correlation import CORR_BLOCK, matrix_correlation
from .output_space import output_space_memory, output_space_summary

__all__ = [
    "nfm",
    "agop",
    "psd_power",
    "nfa_correlation",
    "uc_nfa",
    "c_nfa",
    "relative_change",
    "norm_ratio",
    "kernel_alignment",
    "nfa_decomposition",
    "nfa_summary",
    "summary_memory",
    "NORM_KEYS",
]


def nfm(W: Tensor) -> Tensor:
    """Neural feature matrix ``F = W^T W`` (d x d)."""
    return W.t() @ W


def agop(W: Tensor, K: Tensor, *, KW: Tensor | None = None) -> Tensor:
    """Average gradient outer product w.r.t. the layer input, ``G = W^T K W`` (d x d).

    ``KW``: the product ``K @ W`` when the caller has formed it already (it is not formed again)."""
    return W.t() @ (K @ W if KW is None else KW)


def psd_power(A: Tensor, power: float) -> Tensor:
    """Matrix power ``A^s`` of a symmetric PSD matrix via ``eigh`` with eigenvalues clamped at 0."""
    if power == 1:
        return A
    A = 0.5 * (A + A.t())
    evals, evecs = torch.linalg.eigh(A)
    return (evecs * evals.clamp_min(0).pow(power)) @ evecs.t()


def nfm_agop_correlation(F: Tensor, G: Tensor, method: str = "pearson", power: float = 1.0) -> Tensor:
    """``rho(F, G^power)`` of an NFM ``F`` and an AGOP ``G`` (the correlation of every NFA measure)."""
    return matrix_correlation(F, psd_power(G, power), method)


def nfa_correlation(W: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0) -> Tensor:
    """NFA correlation ``rho(W^T W, (W^T K W)^power)`` (UC-NFA for ``W``, C-NFA for ``W - W_0``)."""
    return nfm_agop_correlation(nfm(W), agop(W, K), method, power)


def uc_nfa(W: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0) -> Tensor:
    """UC-NFA ``rho(W^T W, (W^T K W)^power)`` of the current weights ``W`` (0-dim tensor)."""
    return nfa_correlation(W, K, method, power)


def c_nfa(W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0) -> Tensor:
    """C-NFA ``rho(dW^T dW, (dW^T K dW)^power)`` with ``dW = W - W0`` (0-dim tensor; NaN for ``dW = 0``)."""
    return nfa_correlation(W - W0.to(W), K, method, power)


def relative_change(W: Tensor, dW: Tensor) -> Tensor:
    """Relative weight change ``|dW|_F / |W|_F`` with ``dW = W - W_0`` (0-dim tensor; NaN for ``W = 0``)."""
    return norm_ratio(dW.norm(), W.norm())


def norm_ratio(dw_norm: Tensor, w_norm: Tensor) -> Tensor:
    """:func:`relative_change` from the norms ``|dW|_F`` and ``|W|_F``: their ratio, NaN where ``|W|_F = 0``."""
    return torch.where(w_norm > 0, dw_norm / w_norm, torch.full_like(w_norm, float("nan")))


def kernel_alignment(W: Tensor, K: Tensor, method: str = "pearson") -> Tensor:
    """Alignment of the layer's left Gram matrix with ``K``: ``rho(W W^T, K)``."""
    return matrix_correlation(W @ W.t(), K, method)


NORM_KEYS = ("nfm_init", "nfm_cross", "nfm_centered", "agop_init", "agop_cross", "agop_centered")


def sym_norm(X: Tensor) -> Tensor:
    """``|X + X^T|_F``."""
    return (X + X.t()).norm()


def _decomposition_norms(W0: Tensor, D: Tensor, K: Tensor, KD: Tensor, centered: Tensor) -> Tensor:
    """The six norms of :func:`nfa_decomposition` stacked in ``NORM_KEYS`` order (no host sync), given
    ``KD = K dW`` and the norms of the centred terms ``(|dW^T dW|, |dW^T K dW|)``. Every d x d term is
    freed as soon as its norm is taken."""
    nfm_init = nfm(W0).norm()
    nfm_cross = sym_norm(W0.t() @ D)
    agop_init = agop(W0, K).norm()
    agop_cross = sym_norm(W0.t() @ KD)  # W0^T K dW
    return torch.stack([nfm_init, nfm_cross, centered[0], agop_init, agop_cross, centered[1]])


def nfa_decomposition(W: Tensor, W0: Tensor, K: Tensor) -> dict[str, float]:
    """Frobenius norms of the init / cross / centred terms of ``W^T W`` and ``W^T K W`` with
    ``W = W0 + dW``:

    ``nfm_init = |W0^T W0|``, ``nfm_cross = |W0^T dW + dW^T W0|``, ``nfm_centered = |dW^T dW|``,
    ``agop_init = |W0^T K W0|``, ``agop_cross = |W0^T K dW + dW^T K W0|``, ``agop_centered = |dW^T K dW|``.
    """
    W0 = W0.to(W)
    D = W - W0
    KD = K @ D
    centered = torch.stack([nfm(D).norm(), agop(D, K, KW=KD).norm()])
    norms = _decomposition_norms(W0, D, K, KD, centered)
    return dict(zip(NORM_KEYS, norms.tolist()))


def nfa_summary(
    W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0, keep_matrices: bool = True
) -> dict[str, Any]:
    """Everything a monitor reports for one layer: ``uc_nfa``, ``c_nfa``, ``rel_change``
    (``|W - W0|_F / |W|_F``), ``kernel_alignment`` and the decomposition ``norms``, plus the
    matrices ``nfm`` and ``agop`` (of ``W``; ``None`` unless ``keep_matrices``).

    The terms are formed one after another and each is freed once its scalars are taken (the
    centred ``dW^T dW`` and ``dW^T K dW`` are shared by the C-NFA and the decomposition); all scalars
    reach the host in one transfer. :func:`diagnostics.memory.estimate_memory` accounts for what
    this allocates.

    A layer with fewer outputs than inputs (``k < d``), AGOP power 1 and no kept matrices is measured
    from its ``k x k`` Gram matrices instead (:func:`diagnostics.output_space.output_space_summary`: the same
    values to rounding, without any ``d x d`` term)."""
    W0 = W0.to(W)
    if _output_space(W.shape, power, keep_matrices, W.device):
        corrs, norms = output_space_summary(W, W0, K, method)
        return summary_record(corrs, relative_change(W, W - W0), norms, None, None)
    F, G = nfm(W), agop(W, K)
    uc = nfm_agop_correlation(F, G, method, power)  # the UC-NFA
    if not keep_matrices:
        F = G = None
    alignment = kernel_alignment(W, K, method)
    D = W - W0
    KD = K @ D
    FD, GD = nfm(D), agop(D, K, KW=KD)
    c = nfm_agop_correlation(FD, GD, method, power)  # the C-NFA
    centered = torch.stack([FD.norm(), GD.norm()])
    del FD, GD
    norms = _decomposition_norms(W0, D, K, KD, centered)
    return summary_record(torch.stack([uc, c, alignment]), relative_change(W, D), norms, F, G)


def summary_record(
    corrs: Tensor, rel_change: Tensor, norms: Tensor, F: Tensor | None, G: Tensor | None
) -> dict[str, Any]:
    """The record of :func:`nfa_summary` from ``corrs = [UC-NFA, C-NFA, kernel alignment]``, the
    :func:`relative_change` and the six ``NORM_KEYS`` norms, with one host transfer."""
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


def _output_space(shape: tuple[int, ...], power: float, keep_matrices: bool, device: torch.device | None) -> bool:
    """Whether :func:`nfa_summary` takes the ``k x k`` route for a ``(k, d)`` weight on ``device`` (not on
    MPS, whose float32 sums would leave that route's Pearson centring inexact)."""
    on_mps = device is not None and torch.device(device).type == "mps"
    return power == 1 and not keep_matrices and shape[0] < shape[1] and not on_mps


def summary_memory(
    k: int, d: int, itemsize: int, power: float = 1.0, keep_matrices: bool = False, device: torch.device | None = None
) -> int:
    """Peak bytes of the temporaries :func:`nfa_summary` allocates for a ``(k, d)`` weight in a dtype of
    ``itemsize`` bytes (``K``, ``W`` and ``W0`` themselves not included): the largest of its stages,
    ``max(2d² + kd, k², 2kd + 2d² (+ 4.25d² for power != 1), 3kd + d²)`` entries, plus the kept
    ``nfm``/``agop`` (``2d²``) with ``keep_matrices``, plus the float64 blocks of the correlations; on the
    ``k x k`` route (``k < d``, see :func:`nfa_summary`) :func:`diagnostics.output_space.output_space_memory` and the
    float64 blocks of the kernel alignment's correlation. Checked against the allocations the profiler records."""
    if _output_space((k, d), power, keep_matrices, device):
        return output_space_memory(k, d, itemsize) + 4 * 8 * min(CORR_BLOCK, k * k)
    eigh = 4.25 * d * d if power != 1 else 0.0  # symmetrised copy, eigenvectors, workspace, product
    stages = (2 * d * d + k * d, k * k, 2 * k * d + 2 * d * d + eigh, 3 * k * d + d * d)
    kept = 2 * d * d if keep_matrices else 0
    return int(itemsize * (max(stages) + kept)) + 4 * 8 * min(CORR_BLOCK, max(k, d) ** 2)
