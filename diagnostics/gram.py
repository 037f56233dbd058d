"""The NFA terms of a layer from its ``k x k`` Gram matrices, for layers with fewer outputs than inputs.

For ``A`` (``k x d``: ``W`` or ``dW``) with Gram matrix ``Γ = A A^T`` and a symmetric ``K``, the ``d x d``
NFM ``F = A^T A`` and AGOP ``G = A^T K A`` never need to be formed:

- ``<F, G>_F = Σ(Γ ∘ KΓ)``, ``|F|_F² = Σ(Γ ∘ Γ)``, ``|G|_F² = Σ(KΓ ∘ (KΓ)^T)``;
- Pearson's centring without a difference of large sums: with ``A = B + ā 1^T`` (``ā`` the mean column),
  ``F - mean(F) = u 1^T + 1 u^T + B^T B``, ``u = B^T ā``, so the centred terms come from ``Γ_B = B B^T``
  (``_gram_sums``);
- with ``X = W0^T dW``: ``|X + X^T|² = 2 Σ(Γ_0 ∘ Γ_d) + 2 Σ(M ∘ M^T)``, ``M = dW W0^T``, and with
  ``X = W0^T K dW``: ``2 Σ(KΓ_0 ∘ (KΓ_d)^T) + 2 Σ(KM ∘ (KM)^T)``.

That is ``O(k² d)`` time and ``O(k²)`` memory (plus a ``k x d`` centred copy) instead of ``O(k d²)``
and ``O(d²)``. Everything is computed in the accumulation dtype (float64; float32 on MPS, where
:func:`diagnostics.nfa.nfa_summary` does not take this route). The correlations agree with the
``d x d`` route's to ~1e-9 relative even when the entries' mean dwarfs their spread, and are NaN where
it gives NaN (a constant ``W``: zero centred terms) (``tests/test_diag_nfa.py``).
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


def _grams(A: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """``Γ = A A^T`` and ``KΓ``."""
    gram = A @ A.t()
    return gram, K @ gram


def _sq_norms(gram: Tensor, k_gram: Tensor) -> tuple[Tensor, Tensor]:
    """``|F|_F² = Σ(Γ ∘ Γ)`` and ``|G|_F² = Σ(KΓ ∘ (KΓ)^T)`` of ``F = A^T A``, ``G = A^T K A``."""
    return _dot(gram, gram), _dot(k_gram, k_gram.t()).clamp_min(0)


def _centred_columns(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, ā)``: ``A = B + ā 1^T`` with ``ā`` the mean column of ``A`` and ``B 1 = 0``. The mean is taken
    twice (the second pass removes what the rounding of the first left in ``B``)."""
    mean = A.mean(dim=1, keepdim=True)
    B = A - mean
    rest = B.mean(dim=1, keepdim=True)
    return B.sub_(rest), (mean + rest).squeeze(1)


def _gram_sums(A: Tensor, K: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(Γ, KΓ, [<F,G>, |F|², |G|²])`` for ``A`` (``(k, d)``), ``Γ = A A^T``, ``F = A^T A`` and ``G = A^T K A``,
    each matrix centred by its mean entry in the sums for Pearson.

    With ``A = B + ā 1^T`` (:func:`_centred_columns`), ``F - mean(F) = u 1^T + 1 u^T + B^T B`` with
    ``u = B^T ā`` and ``1^T u = 0`` (likewise ``G`` with ``v = B^T K ā``), so with ``Γ_B = B B^T``:
    ``<F_c, G_c> = Σ(Γ_B ∘ KΓ_B) + 2d ā^T Γ_B K ā``, ``|F_c|² = Σ(Γ_B ∘ Γ_B) + 2d ā^T Γ_B ā``,
    ``|G_c|² = Σ(KΓ_B ∘ (KΓ_B)^T) + 2d (Kā)^T Γ_B (Kā)``: sums of the centred terms themselves, no
    difference of large sums (which rounding would leave as noise when the entries' mean is large).
    Then ``Γ = Γ_B + d ā ā^T`` and ``KΓ = KΓ_B + d (Kā) ā^T``."""
    if method == "cosine":
        gram, k_gram = _grams(A, K)
        return gram, k_gram, torch.stack([_dot(gram, k_gram), *_sq_norms(gram, k_gram)])
    B, mean = _centred_columns(A)
    gram, k_gram = _grams(B, K)
    del B
    k_mean = K @ mean
    p, q = gram @ mean, gram @ k_mean
    twice_d = 2 * A.shape[1]
    ff, gg = _sq_norms(gram, k_gram)
    sums = torch.stack([_dot(gram, k_gram) + twice_d * (p @ k_mean), ff + twice_d * (p @ mean), gg + twice_d * (q @ k_mean)])
    return gram.addr_(mean, mean, alpha=A.shape[1]), k_gram.addr_(k_mean, mean, alpha=A.shape[1]), sums


def _correlation(sums: Tensor) -> Tensor:
    """``rho(F, G)`` from the sums of :func:`_gram_sums`."""
    return correlation_from_sums(*sums.unbind(0))


def _cross_norm(gram_0: Tensor, gram_d: Tensor, M: Tensor) -> Tensor:
    """``|X + X^T|_F`` for ``X^T X``-Gram data: ``sqrt(2 Σ(Γ_0 ∘ Γ_d^T) + 2 Σ(M ∘ M^T))``."""
    return (2 * _dot(gram_0, gram_d.t()) + 2 * _dot(M, M.t())).clamp_min(0).sqrt()


def gram_space_summary(W: Tensor, W0: Tensor, K: Tensor, method: str = "pearson") -> tuple[Tensor, Tensor]:
    """``([UC-NFA, C-NFA, kernel alignment], the six NORM_KEYS norms)`` of :func:`diagnostics.nfa.nfa_summary`
    (AGOP power 1) from ``k x k`` products only; ``W``, ``W0`` are ``(k, d)``, ``K`` is ``k x k``."""
    dtype = accumulation_dtype(W.device)
    W, W0, K = W.to(dtype), W0.to(dtype), K.to(dtype)
    D = W - W0
    uc = _gram_sums(W, K, method)[2]
    alignment = matrix_correlation(W @ W.t(), K, method)  # rho(W W^T, K) of the very W W^T of the d x d route
    gram_d, k_gram_d, c = _gram_sums(D, K, method)
    gram_0, k_gram_0 = _grams(W0, K)
    M = D @ W0.t()
    nfm_cross = _cross_norm(gram_0, gram_d, M)
    agop_cross = _cross_norm(k_gram_0, k_gram_d, K @ M)
    nfm_init, agop_init = (x.sqrt() for x in _sq_norms(gram_0, k_gram_0))
    nfm_centred, agop_centred = (x.sqrt() for x in _sq_norms(gram_d, k_gram_d))
    corrs = torch.stack([_correlation(uc), _correlation(c), alignment.to(uc.dtype)])
    norms = torch.stack([nfm_init, nfm_cross, nfm_centred, agop_init, agop_cross, agop_centred])
    return corrs, norms


def gram_space_memory(k: int, d: int, itemsize: int) -> int:
    """Peak bytes of the temporaries of :func:`gram_space_summary` for weights of ``itemsize`` bytes: the
    accumulation-dtype (8-byte) copies of ``W``, ``W0`` (none when they are float64 already), ``dW`` and
    the centred copy of Pearson's sums, ``K``'s copy, and up to eight ``k x k`` products alive at once."""
    copies = 2 if itemsize == 8 else 4
    return 8 * (copies * k * d + 9 * k * k)
