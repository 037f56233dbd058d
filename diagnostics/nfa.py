"""Neural feature alignment (NFA) maths on weight matrices and PTK covariances.

Weights are in ``(k, d)`` = ``(out, in)`` layout, ``K`` is ``k x k``. Nothing here knows about
models or hooks.

- NFM ``F = W^T W``; AGOP ``G = W^T K W``.
- ``rho(A, B)``: :func:`diagnostics.correlation.matrix_correlation` (Pearson or cosine).
- UC-NFA ``rho(W^T W, (W^T K W)^s)``; C-NFA the same with ``dW = W - W_0``;
  kernel alignment ``rho(W W^T, K)``; relative change ``|dW|_F / |W|_F``.

Each formula has one function here; :func:`nfa_summary` (what a monitor records per layer) forms the
products ``K dW`` and ``K W0`` (``O(k² d)``) and eight ``d x d`` ones: ``F = W^T W``, the decomposition
terms ``dW^T dW``, ``W0^T dW``, ``W0^T W0``, ``dW^T K dW``, ``W0^T K dW`` and ``W0^T K W0`` (the last three
summed in place into ``G = W^T K W``; ``K`` is symmetric), and ``B^T B`` of ``W`` less its mean row for the
kernel alignment (:func:`gram_alignment`, from ``K W = K W0 + K dW``; no ``k x k`` ``W W^T``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .common import accumulation_dtype, check_choice
from .correlation import CORR_BLOCK, CORRELATIONS, correlation_from_sums, matrix_correlation
from .output_space import block_mean, output_space_memory, output_space_summary

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
    "gram_alignment",
    "nfa_decomposition",
    "nfa_summary",
    "check_symmetric",
    "symmetry_excess",
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


def gram_alignment(W: Tensor, KW: Tensor, K: Tensor, F: Tensor, method: str = "pearson") -> Tensor:
    """:func:`kernel_alignment` ``rho(W W^T, K)`` without the ``k x k`` ``W W^T``, from ``KW = K W`` and
    ``F = W^T W`` (symmetric ``K``).

    cosine: ``<W W^T, K> = Σ(W ∘ KW)`` and ``|W W^T|_F = |F|_F``. pearson: with ``W = B + 1 w̄^T`` (``w̄``
    the mean row, ``1^T B = 0``), ``mean(W W^T) = |w̄|²`` and the centred ``A_c = B B^T + p 1^T + 1 p^T`` with
    ``p = B w̄`` (``1^T p = 0``), so ``<A_c, K - mean(K)> = Σ(B ∘ KB) + 2 p·(K 1)`` with
    ``KB = KW - (K 1) w̄^T`` and ``|A_c|² = |B^T B|_F² + 2k |p|²``: sums of centred terms, no difference of
    large sums. Taken over blocks of rows in the accumulation dtype (``B^T B`` in ``W``'s dtype), so no full
    copy of ``W``, ``KW`` or ``K`` is made; NaN where the definition gives NaN."""
    check_choice("correlation", method, CORRELATIONS)
    dtype = accumulation_dtype(W.device)
    k, d = W.shape
    rows, k_rows = _row_slices(k, d), _row_slices(k, k)
    block = lambda A, r: A[r].to(dtype)  # noqa: E731
    zero = torch.zeros((), dtype=dtype, device=W.device)
    if method == "cosine":
        dot = sum(((block(W, r) * block(KW, r)).sum() for r in rows), zero)
        sq_a = sum((block(F, r).square().sum() for r in _row_slices(d, d)), zero)
        return correlation_from_sums(dot, sq_a, sum((block(K, r).square().sum() for r in k_rows), zero))
    k_ones = torch.cat([block(K, r).sum(dim=1) for r in k_rows])  # K 1
    mean_k = k_ones.sum() / (k * k)
    sq_b = sum(((block(K, r) - mean_k).square().sum() for r in k_rows), zero)
    mean, rest = block_mean(lambda r: block(W, r), rows, 0, k)
    w_bar = mean + rest  # the mean row
    dot, p = zero, torch.empty(k, dtype=dtype, device=W.device)
    BtB = W.new_zeros((d, d))
    for r in rows:
        B = W[r].to(dtype, copy=True).sub_(mean).sub_(rest)
        KB = KW[r].to(dtype, copy=True).addr_(k_ones[r], w_bar, alpha=-1)
        dot = dot + (B * KB).sum()
        del KB
        p[r] = B @ w_bar
        B_w = B.to(W.dtype)
        BtB.addmm_(B_w.t(), B_w)
    sq_a = sum((block(BtB, r).square().sum() for r in _row_slices(d, d)), zero) + 2 * k * (p @ p)
    return correlation_from_sums(dot + 2 * (p @ k_ones), sq_a, sq_b)


def _row_slices(n: int, width: int) -> list[slice]:
    """Blocks of rows of an ``n x width`` matrix, ``CORR_BLOCK`` entries each (at least one row)."""
    step = max(1, CORR_BLOCK // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


NORM_KEYS = ("nfm_init", "nfm_cross", "nfm_centered", "agop_init", "agop_cross", "agop_centered")


def sym_norm(X: Tensor) -> Tensor:
    """``|X + X^T|_F``."""
    return (X + X.t()).norm()


def _symmetrise_(X: Tensor) -> Tensor:
    """``X + X^T`` written into the square ``X`` (by blocks of rows: no full-size temporary); returns ``X``."""
    n = X.shape[0]
    for r in _row_slices(n, n):
        T = X[r, r.start :] + X[r.start :, r].t()
        X[r, r.start :] = T
        X[r.start :, r] = T.t()
    return X


def _add_term(A: Tensor, T: Tensor) -> Tensor:
    """``A += T`` in place; returns ``|T|_F``."""
    A.add_(T)
    return T.norm()


#: Largest ``|K_ij - K_ji|`` accepted, relative to ``sqrt(|K_ii K_jj|)`` (the scale of entry ``ij`` of a
#: covariance): the rounding of a product such as ``J^T J``, not a matrix that is not a covariance. Half
#: precision ``K`` gets ``16 eps`` of its dtype instead when that is larger.
SYMMETRY_TOL = 1e-5


def _symmetry_tol(dtype: torch.dtype) -> float:
    """``SYMMETRY_TOL``, or ``16 eps`` of a floating ``dtype`` whose rounding is coarser (half precision)."""
    return max(SYMMETRY_TOL, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else SYMMETRY_TOL


def symmetry_excess(K: Tensor) -> Tensor:
    """``max_ij |K_ij - K_ji| - tol sqrt(|K_ii K_jj|)`` (``tol``: ``SYMMETRY_TOL``) as a 0-dim float64 tensor
    on ``K``'s device (no host transfer), taken over blocks of rows (no ``k x k`` temporary); above 0 where ``K``
    is not symmetric (:func:`check_symmetric`). NaN entries give NaN (they give NaN correlations downstream)."""
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square k x k matrix, got shape {tuple(K.shape)}")
    k, tol = K.shape[0], _symmetry_tol(K.dtype)
    root = K.diagonal().double().abs().sqrt()
    excess = K.new_full((), -1.0, dtype=torch.float64)
    for r in _row_slices(k, k):
        gap = (K[r].double() - K[:, r].t().double()).abs()
        excess = torch.maximum(excess, (gap - tol * root[r, None] * root[None, :]).max())
    return excess


def check_symmetric(K: Tensor, excess: float | None = None) -> None:
    """Raise ``ValueError`` if some ``|K_ij - K_ji| > tol * sqrt(|K_ii K_jj|)`` (:func:`symmetry_excess`; pass its
    value as ``excess`` when it has reached the host already). The NFA terms use ``K = K^T``
    (``dW^T K W0 = (W0^T K dW)^T``)."""
    value = symmetry_excess(K) if excess is None else excess
    if float(value) > 0:
        raise ValueError(
            "K must be a symmetric covariance: some |K_ij - K_ji| exceeds "
            f"{_symmetry_tol(K.dtype):.0e} * sqrt(|K_ii K_jj|) (by {float(value):.3g}); pass K = (K + K.T) / 2 if yours is symmetric "
            "up to rounding, or the K that ptk_covariance returns"
        )


def _terms(
    W: Tensor, W0: Tensor, K: Tensor, method: str | None, power: float
) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor, Tensor]:
    """``(F, G, C-NFA, norms, KW)`` of a ``(k, d)`` weight ``W = W0 + dW``: ``F = W^T W``, ``G = W^T K W``, the
    C-NFA ``rho(dW^T dW, (dW^T K dW)^power)`` (``F`` and the C-NFA ``None`` for ``method=None``), the six
    ``NORM_KEYS`` norms and ``KW = K W``, from two ``k x k``-by-``k x d`` products (``K dW``, ``K W0``; ``K``
    symmetric) and seven ``d x d`` ones: ``G = dW^T K dW + (Y + Y^T) + W0^T K W0`` with ``Y = W0^T K dW``
    by linearity, each term added in place into ``G`` once its norm is taken, then freed. ``F`` is formed
    as ``W^T W`` itself (not summed from its terms), so that a constant ``W`` gives an exactly constant
    ``F`` (no Pearson correlation: NaN) rather than rounding noise."""
    D = W - W0
    KD = K @ D
    FD, G = nfm(D), agop(D, K, KW=KD)  # the centred terms; G accumulates the others below
    c = None if method is None else nfm_agop_correlation(FD, G, method, power)
    nfm_centered, agop_centered = FD.norm(), G.norm()
    del FD
    nfm_cross = _symmetrise_(W0.t() @ D).norm()
    del D
    nfm_init = nfm(W0).norm()
    KW = K @ W0
    agop_init = _add_term(G, agop(W0, K, KW=KW))
    agop_cross = _add_term(G, _symmetrise_(W0.t() @ KD))
    KW.add_(KD)  # K W0 + K dW = K W
    del KD
    norms = torch.stack([nfm_init, nfm_cross, nfm_centered, agop_init, agop_cross, agop_centered])
    return None if method is None else nfm(W), G, c, norms, KW


def nfa_decomposition(W: Tensor, W0: Tensor, K: Tensor) -> dict[str, float]:
    """Frobenius norms of the init / cross / centred terms of ``W^T W`` and ``W^T K W`` with
    ``W = W0 + dW``:

    ``nfm_init = |W0^T W0|``, ``nfm_cross = |W0^T dW + dW^T W0|``, ``nfm_centered = |dW^T dW|``,
    ``agop_init = |W0^T K W0|``, ``agop_cross = |W0^T K dW + dW^T K W0|``, ``agop_centered = |dW^T K dW|``.
    """
    excess = symmetry_excess(K)
    norms = _terms(W, W0.to(W), K, None, 1.0)[3]
    *values, asymmetry = torch.cat([norms.double(), excess.to(norms.device).reshape(1)]).tolist()
    check_symmetric(K, asymmetry)
    return dict(zip(NORM_KEYS, values))


def nfa_summary(
    W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson", power: float = 1.0, keep_matrices: bool = True
) -> dict[str, Any]:
    """Everything a monitor reports for one layer: ``uc_nfa``, ``c_nfa``, ``rel_change``
    (``|W - W0|_F / |W|_F``), ``kernel_alignment`` and the decomposition ``norms``, plus the
    matrices ``nfm`` and ``agop`` (of ``W``; ``None`` unless ``keep_matrices``).

    ``K`` must be symmetric. The products are ``K dW`` and ``K W0`` (``O(k² d)``) and seven ``d x d`` ones
    (``O(k d²)``): ``F = W^T W``, the decomposition terms, whose sum is ``G = W^T K W`` (``_terms``); the
    kernel alignment comes from ``K W`` and one more ``d x d`` product
    (:func:`gram_alignment`, no ``k x k`` ``W W^T``). Each term is freed once its norm is taken and added;
    all scalars reach the host in one transfer, with the check that ``K`` is symmetric
    (:func:`symmetry_excess`: an asymmetric ``K`` is refused by name once the values arrive).
    :func:`summary_memory` accounts for what this allocates.

    A layer with fewer outputs than inputs (``k < d``), AGOP power 1 and no kept matrices is measured
    from its ``k x k`` Gram matrices instead (:func:`diagnostics.output_space.output_space_summary`: the same
    values to rounding, without any ``d x d`` term)."""
    W0 = W0.to(W)
    excess = symmetry_excess(K)  # read with the results: no host transfer of its own
    if _output_space(W.shape, power, keep_matrices, W.device):
        corrs, norms = output_space_summary(W, W0, K, method)
        return summary_record(corrs, relative_change(W, W - W0), norms, None, None, K, excess)
    F, G, c, norms, KW = _terms(W, W0, K, method, power)
    alignment = gram_alignment(W, KW, K, F, method)
    del KW
    uc = nfm_agop_correlation(F, G, method, power)  # the UC-NFA
    if not keep_matrices:
        F = G = None
    return summary_record(torch.stack([uc, c, alignment]), relative_change(W, W - W0), norms, F, G, K, excess)


def summary_record(
    corrs: Tensor, rel_change: Tensor, norms: Tensor, F: Tensor | None, G: Tensor | None,
    K: Tensor | None = None, excess: Tensor | None = None,
) -> dict[str, Any]:
    """The record of :func:`nfa_summary` from ``corrs = [UC-NFA, C-NFA, kernel alignment]``, the
    :func:`relative_change` and the six ``NORM_KEYS`` norms, with one host transfer; with ``K`` and its
    :func:`symmetry_excess` ``excess``, :func:`check_symmetric` on the value that transfer brought."""
    extra = [] if excess is None else [excess.reshape(1).to(corrs)]
    values = torch.cat([corrs, torch.stack([rel_change]).to(corrs), norms.to(corrs), *extra]).tolist()
    if excess is not None:
        check_symmetric(K, values.pop())
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
    ``max(2kd + 3d², 2kd + 2d² (+ 4.25d² for power != 1))`` entries (``K dW`` with ``dW`` or ``K W0``, two
    or three ``d x d`` terms, ``F`` and ``G`` at the end; ``F`` and ``G`` are what ``keep_matrices`` keeps), plus the float64 blocks
    of the correlations; on the ``k x k`` route (``k < d``, see :func:`nfa_summary`)
    :func:`diagnostics.output_space.output_space_memory` and the float64 blocks of the kernel alignment's
    correlation. Checked against the allocations the profiler records."""
    if _output_space((k, d), power, keep_matrices, device):
        return output_space_memory(k, d, itemsize) + 4 * 8 * min(CORR_BLOCK, k * k)
    eigh = 4.25 * d * d if power != 1 else 0.0  # symmetrised copy, eigenvectors, workspace, product
    stages = (2 * k * d + 3 * d * d, 2 * k * d + 2 * d * d + eigh)
    return int(itemsize * max(stages)) + 4 * 8 * min(CORR_BLOCK, max(k, d) ** 2)
