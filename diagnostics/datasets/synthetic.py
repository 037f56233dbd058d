"""The chain-monomial task of the NFA papers: Gaussian inputs and a sum of products of neighbouring coordinates."""

from __future__ import annotations

import torch

__all__ = ["chain_monomial", "chain_monomial_data"]


def chain_monomial(x: torch.Tensor, r: int) -> torch.Tensor:
    """Chain-monomial target ``f*(x) = sum_{i=1}^{r} x_i x_{i+1}`` (first ``r + 1`` coordinates), shape (n,)."""
    if x.ndim != 2 or x.shape[1] < r + 1:
        raise ValueError(f"chain_monomial: need x of shape (n, d) with d >= r + 1 = {r + 1}, got {tuple(x.shape)}")
    if r < 1:
        raise ValueError(f"chain_monomial: r must be >= 1, got {r}")
    return (x[:, :r] * x[:, 1 : r + 1]).sum(dim=1)


def chain_monomial_data(
    n_train: int, n_test: int, d: int, r: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x ~ N(0, I_d)`` and ``y = f*(x)`` (shape (n, 1)) for a train and a test set, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=dtype)
    y = chain_monomial(x, r)[:, None]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]
