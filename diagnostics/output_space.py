"""The NFA terms of a layer computed in its output space, from ``k x k`` matrices, for layers with fewer
outputs than inputs.

For ``A`` (``k x d``: ``W`` or ``dW``) with Gram matrix ``Γ = A A^T`` and a symmetric ``K``, the ``d x d``
NFM ``F = A^T A`` and AGOP ``G = A^T K A`` never need to be formed:

- ``<F, G>_F = Σ(Γ ∘ KΓ)``, ``|F|_F² = Σ(Γ ∘ Γ)``, ``|G|_F² = Σ(KΓ ∘ (KΓ)^T)``;
- Pearson's centring without a difference of large sums: with ``A = B + ā 1^T`` (``ā`` the mean column),
  ``F - mean(F) = u 1^T + 1 u^T + B^T B``, ``u = B^T ā``, so the centred terms come from ``Γ_B = B B^T``
  (``_gram_sums``);
- the kernel alignment ``rho(W W^T, K)``: for Pearson from ``W W^T`` less its mean entry,
  ``R R^T + p 1^T + 1 p^T`` with ``W = R + 1 w̄^T`` (``w̄`` the mean row) and ``p = R w̄``; for cosine
  ``W W^T = Γ`` itself;
- with ``X = W0^T dW``: ``|X + X^T|² = 2 Σ(Γ_0 ∘ Γ_d) + 2 Σ(M ∘ M^T)``, ``M = dW W0^T``, and with
  ``X = W0^T K dW``: ``2 Σ(KΓ_0 ∘ (KΓ_d)^T) + 2 Σ(KM ∘ (KM)^T)``.

That is ``O(k² d)`` time and ``O(k²)`` memory instead of ``O(k d²)`` and ``O(d²)``: the ``k x k`` sums are
taken over blocks of columns of ``W`` (``COLUMN_BLOCK`` entries each), so no full ``k x d`` copy is made.
Everything is computed in the accumulation dtype (float64; float32 on MPS, where
:func:`diagnostics.nfa.nfa_summary` does not take this route). The correlations agree with the
``d x d`` route's to ~1e-9 relative even when the entries' mean dwarfs their spread, and are NaN where
it gives NaN (a constant ``W``: zero centred terms) (``tests/test_diag_nfa.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .common import accumulation_dtype
from .correlation import correlation_from_sums, matrix_correlation

__all__ = ["output_space_summary", "output_space_memory", "block_mean", "COLUMN_BLOCK"]


#: Entries of ``W`` converted to the accumulation dtype at a time: the Gram matrices are summed over blocks
#: of ``max(1, COLUMN_BLOCK // k)`` columns, so no full float64 copy of a ``k x d`` weight is made.
COLUMN_BLOCK = 1 << 18


def _dot(X: Tensor, Y: Tensor) -> Tensor:
    """``Σ(X ∘ Y)``."""
    return (X * Y).sum()


def _sq_norms(gram: Tensor, k_gram: Tensor) -> tuple[Tensor, Tensor]:
    """``|F|_F² = Σ(Γ ∘ Γ)`` and ``|G|_F² = Σ(KΓ ∘ (KΓ)^T)`` of ``F = A^T A``, ``G = A^T K A``."""
    return _dot(gram, gram), _dot(k_gram, k_gram.t()).clamp_min(0)


def _column_slices(k: int, d: int) -> list[slice]:
    """The column blocks of a ``(k, d)`` weight, ``max(1, COLUMN_BLOCK // k)`` columns each."""
    step = max(1, COLUMN_BLOCK // k)
    return [slice(j, min(j + step, d)) for j in range(0, d, step)]


def block_mean(block: Callable[[slice], Tensor], slices: list[slice], dim: int, n: int) -> tuple[Tensor, Tensor]:
    """``(mean, rest)`` of a matrix ``A`` along ``dim`` (``n`` entries), ``A`` given by its blocks ``block(s)``
    (in the accumulation dtype) for ``s`` in ``slices`` of the other dimension: ``mean`` of ``A`` and ``rest``,
    the mean of ``A - mean``, which removes what the rounding of the first left (``A - mean - rest`` sums
    to zero along ``dim`` up to the rounding of its own entries). No full copy of ``A`` is made."""
    mean = sum(block(s).sum(dim=dim) for s in slices) / n
    rest = sum((block(s) - mean.unsqueeze(dim)).sum(dim=dim) for s in slices) / n
    return mean, rest


class _GramSums:
    """The column-block sums of :func:`output_space_summary`: ``Γ_B`` of the centred ``W`` and ``dW`` (their
    raw Grams with ``method="cosine"``), ``Γ_0 = W0 W0^T``, ``M = dW W0^T``, the mean columns, and for Pearson
    ``W W^T`` less its mean entry: with ``W = R + 1 w̄^T`` (``w̄`` the mean row, ``1^T R = 0``, taken per
    column), ``W W^T - mean(W W^T) = R R^T + p 1^T + 1 p^T``, ``p = R w̄`` (no difference of large sums)."""

    def __init__(self, W: Tensor, W0: Tensor, dtype: torch.dtype, centred: bool) -> None:
        k, d = W.shape
        slices = _column_slices(k, d)
        w = lambda s: W[:, s].to(dtype)  # noqa: E731
        dw = lambda s: W[:, s].to(dtype) - W0[:, s].to(dtype)  # noqa: E731
        zero = W.new_zeros((k,), dtype=dtype)
        (mean_w, rest_w), (mean_d, rest_d) = (
            (block_mean(w, slices, 1, d), block_mean(dw, slices, 1, d)) if centred else ((zero, zero), (zero, zero))
        )
        self.gram_w, self.gram_d, self.gram_0, self.M = (W.new_zeros((k, k), dtype=dtype) for _ in range(4))
        self.ww_centred = W.new_zeros((k, k), dtype=dtype) if centred else None
        p = zero.clone()
        for s in slices:
            W_s, W0_s = W[:, s].to(dtype, copy=True), W0[:, s].to(dtype)  # W_s is centred in place below
            D_s = W_s - W0_s
            self.gram_0.addmm_(W0_s, W0_s.t())
            self.M.addmm_(D_s, W0_s.t())
            del W0_s
            if centred:
                w_bar = W_s.mean(dim=0)  # the mean row of these columns
                R_s = W_s - w_bar
                rest = R_s.mean(dim=0)
                R_s.sub_(rest)
                w_bar.add_(rest)
                del rest
                self.ww_centred.addmm_(R_s, R_s.t())
                p.addmv_(R_s, w_bar)
                del R_s, w_bar
                W_s = W_s.sub_(mean_w[:, None]).sub_(rest_w[:, None])
                D_s = D_s.sub_(mean_d[:, None]).sub_(rest_d[:, None])
            self.gram_w.addmm_(W_s, W_s.t())
            self.gram_d.addmm_(D_s, D_s.t())
            del W_s, D_s  # not alive while the next block's are cast
        if centred:
            self.ww_centred.addr_(p, torch.ones_like(p)).addr_(torch.ones_like(p), p)
        self.mean_w, self.mean_d = mean_w + rest_w, mean_d + rest_d


def _gram_sums(gram: Tensor, mean: Tensor, d: int, K: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(Γ, KΓ, [<F,G>, |F|², |G|²])`` for ``A`` (``(k, d)``), ``Γ = A A^T``, ``F = A^T A`` and ``G = A^T K A``,
    each matrix centred by its mean entry in the sums for Pearson, from ``Γ_B = B B^T`` (``gram``) and the
    mean column ``ā`` (``mean``) of ``A = B + ā 1^T`` (``B 1 = 0``; ``gram`` is ``Γ`` itself for cosine).

    ``F - mean(F) = u 1^T + 1 u^T + B^T B`` with ``u = B^T ā`` and ``1^T u = 0`` (likewise ``G`` with
    ``v = B^T K ā``), so ``<F_c, G_c> = Σ(Γ_B ∘ KΓ_B) + 2d ā^T Γ_B K ā``,
    ``|F_c|² = Σ(Γ_B ∘ Γ_B) + 2d ā^T Γ_B ā``,
    ``|G_c|² = Σ(KΓ_B ∘ (KΓ_B)^T) + 2d (Kā)^T Γ_B (Kā)``: sums of the centred terms themselves, no
    difference of large sums (which rounding would leave as noise when the entries' mean is large).
    Then ``Γ = Γ_B + d ā ā^T`` and ``KΓ = KΓ_B + d (Kā) ā^T``. ``gram`` is updated in place."""
    k_gram = K @ gram
    if method == "cosine":
        return gram, k_gram, torch.stack([_dot(gram, k_gram), *_sq_norms(gram, k_gram)])
    k_mean = K @ mean
    p, q = gram @ mean, gram @ k_mean
    twice_d = 2 * d
    ff, gg = _sq_norms(gram, k_gram)
    sums = torch.stack([_dot(gram, k_gram) + twice_d * (p @ k_mean), ff + twice_d * (p @ mean), gg + twice_d * (q @ k_mean)])
    return gram.addr_(mean, mean, alpha=d), k_gram.addr_(k_mean, mean, alpha=d), sums


def _correlation(sums: Tensor) -> Tensor:
    """``rho(F, G)`` from the sums of :func:`_gram_sums`."""
    return correlation_from_sums(*sums.unbind(0))


def _cross_norm(gram_0: Tensor, gram_d: Tensor, M: Tensor) -> Tensor:
    """``|X + X^T|_F`` for ``X^T X``-Gram data: ``sqrt(2 Σ(Γ_0 ∘ Γ_d^T) + 2 Σ(M ∘ M^T))``."""
    return (2 * _dot(gram_0, gram_d.t()) + 2 * _dot(M, M.t())).clamp_min(0).sqrt()


def output_space_summary(W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson") -> tuple[Tensor, Tensor]:
    """``([UC-NFA, C-NFA, kernel alignment], the six NORM_KEYS norms)`` of :func:`diagnostics.nfa.nfa_summary`
    (AGOP power 1) from ``k x k`` products only; ``W``, ``W0`` are ``(k, d)``, ``K`` is ``k x k``."""
    dtype = accumulation_dtype(W.device)
    K = K.to(dtype)
    d = W.shape[1]
    g = _GramSums(W.detach(), W0.detach(), dtype, centred=method != "cosine")
    if g.ww_centred is not None:  # rho(W W^T, K) from W W^T less its mean entry
        alignment = matrix_correlation(g.ww_centred, K, method)
        del g.ww_centred
    gram_w, _, uc = _gram_sums(g.gram_w, g.mean_w, d, K, method)
    if method == "cosine":  # gram_w is W W^T itself
        alignment = matrix_correlation(gram_w, K, method)
    del g.gram_w, gram_w
    gram_d, k_gram_d, c = _gram_sums(g.gram_d, g.mean_d, d, K, method)
    del g.gram_d
    nfm_cross = _cross_norm(g.gram_0, gram_d, g.M)
    nfm_centred, agop_centred = (x.sqrt() for x in _sq_norms(gram_d, k_gram_d))
    del gram_d
    k_gram_0 = K @ g.gram_0
    nfm_init, agop_init = (x.sqrt() for x in _sq_norms(g.gram_0, k_gram_0))
    del g.gram_0
    k_M = K @ g.M
    del g.M
    agop_cross = _cross_norm(k_gram_0, k_gram_d, k_M)
    corrs = torch.stack([_correlation(uc), _correlation(c), alignment.to(uc.dtype)])
    norms = torch.stack([nfm_init, nfm_cross, nfm_centred, agop_init, agop_cross, agop_centred])
    return corrs, norms


def output_space_memory(k: int, d: int, itemsize: int) -> int:
    """Peak bytes of the temporaries of :func:`output_space_summary` for weights of ``itemsize`` bytes (the
    float64 blocks of :func:`diagnostics.correlation.matrix_correlation` not included): up to seven ``k x k``
    float64 matrices alive at once (four column-block sums, ``KΓ``, a product and ``K``'s float64 copy;
    six without that copy when the weights are float64 already), three blocks of ``k x w`` entries
    (``w = min(d, max(1, COLUMN_BLOCK // k))`` columns: ``W``, ``dW`` and ``W`` less its mean row) and two
    rows of ``w`` entries (the mean row and its correction)."""
    cast = int(itemsize != 8)
    width = min(d, max(1, COLUMN_BLOCK // k))
    return 8 * ((6 + cast) * k * k + 3 * k * width + 2 * width)
