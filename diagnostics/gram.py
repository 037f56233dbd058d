"""The NFA terms of a layer from its ``k x k`` Gram matrices, for layers with fewer outputs than inputs.

For ``A`` (``k x d``: ``W`` or ``dW``) with Gram matrix ``Γ = A A^T`` and a symmetric ``K``, the ``d x d``
NFM ``F = A^T A`` and AGOP ``G = A^T K A`` never need to be formed:

- ``<F, G>_F = Σ(Γ ∘ KΓ)``, ``|F|_F² = Σ(Γ ∘ Γ)``, ``|G|_F² = Σ(KΓ ∘ (KΓ)^T)``;
- sums of entries (Pearson's means): ``Σ F = |A 1|²``, ``Σ G = (A 1)^T K (A 1)``;
- with ``X = W0^T dW``: ``|X + X^T|² = 2 Σ(Γ_0 ∘ Γ_d) + 2 Σ(M ∘ M^T)``, ``M = dW W0^T``, and with
  ``X = W0^T K dW``: ``2 Σ(KΓ_0 ∘ (KΓ_d)^T) + 2 Σ(KM ∘ (KM)^T)``.

That is ``O(k² d)`` time and ``O(k²)`` memory instead of ``O(k d²)`` and ``O(d²)``. Everything is
computed in the accumulation dtype (float64; float32 on MPS): Pearson's centring here is a difference
of sums (``<F,G> - ΣF ΣG / d²``), which float32 products would leave with errors of ~1e-5 when the
entries' mean is large. In float64 this route is at least as accurate as the ``d x d`` one (both within
~3e-8 of a float64 reference for float32 weights, ``tests/test_diag_nfa.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype
from .correlation import correlation_from_sums, matrix_correlation

__all__ = ["gram_space_summary", "gram_space_memory"]


def _dot(X: Tensor, Y: Tensor) -> Tensor:
    """``Σ(X ∘ Y)``."""
    return (X * Y).sum()


def _moments(A: Tensor, K: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Γ = A A^T``, ``KΓ`` and ``[<F,G>, |F|², |G|², ΣF, ΣG]`` of ``F = A^T A``, ``G = A^T K A``."""
    gram = A @ A.t()
    k_gram = K @ gram
    u = A.sum(dim=1)
    moments = torch.stack([_dot(gram, k_gram), _dot(gram, gram), _dot(k_gram, k_gram.t()), u @ u, u @ (K @ u)])
    return gram, k_gram, moments


def _correlation(moments: Tensor, n: int, method: str) -> Tensor:
    """``rho(F, G)`` from :func:`_moments` (``n = d²`` entries): Pearson removes the means, cosine does not."""
    fg, ff, gg, sf, sg = moments.unbind(0)
    if method == "pearson":
        fg, ff, gg = fg - sf * sg / n, (ff - sf * sf / n).clamp_min(0), (gg - sg * sg / n).clamp_min(0)
    return correlation_from_sums(fg, ff, gg)


def _cross_norm(gram_0: Tensor, gram_d: Tensor, M: Tensor) -> Tensor:
    """``|X + X^T|_F`` for ``X^T X``-Gram data: ``sqrt(2 Σ(Γ_0 ∘ Γ_d^T) + 2 Σ(M ∘ M^T))``."""
    return (2 * _dot(gram_0, gram_d.t()) + 2 * _dot(M, M.t())).clamp_min(0).sqrt()


def gram_space_summary(W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson") -> tuple[Tensor, Tensor]:
    """``([UC-NFA, C-NFA, kernel alignment], the six NORM_KEYS norms)`` of :func:`diagnostics.nfa.nfa_summary`
    (AGOP power 1) from ``k x k`` products only; ``W``, ``W0`` are ``(k, d)``, ``K`` is ``k x k``."""
    n = W.shape[1] ** 2
    dtype = accumulation_dtype(W.device)
    W, W0, K = W.to(dtype), W0.to(dtype), K.to(dtype)
    D = W - W0
    gram, _, uc = _moments(W, K)
    alignment = matrix_correlation(gram, K, method)  # rho(W W^T, K)
    del gram
    gram_d, k_gram_d, c = _moments(D, K)
    gram_0, k_gram_0, init = _moments(W0, K)
    M = D @ W0.t()
    nfm_cross = _cross_norm(gram_0, gram_d, M)
    agop_cross = _cross_norm(k_gram_0, k_gram_d, K @ M)
    corrs = torch.stack([_correlation(uc, n, method), _correlation(c, n, method), alignment.to(uc.dtype)])
    norms = torch.stack([init[1].sqrt(), nfm_cross, c[1].sqrt(), init[2].sqrt(), agop_cross, c[2].sqrt()])
    return corrs, norms


def gram_space_memory(k: int, d: int, itemsize: int) -> int:
    """Peak bytes of the temporaries of :func:`gram_space_summary` for weights of ``itemsize`` bytes: the
    accumulation-dtype (8-byte) copies of ``W``, ``W0`` (none when they are float64 already) and ``dW``,
    ``K``'s copy, and up to eight ``k x k`` products alive at once."""
    copies = 1 if itemsize == 8 else 3
    return 8 * (copies * k * d + 9 * k * k)
