"""The PTK feature covariance from per-sample gradients: running sums of Grams and their normalisation.

``K_unnorm = sum_alpha sum_c g_{alpha,c} g_{alpha,c}^T`` is accumulated block by block from gradient rows
``G`` (``K_unnorm += G^T G``) in float64 (float32 on MPS); ``K = K_unnorm / N`` (:func:`covariance_from_sums`)
is the one place where ``K`` is normalised. Nothing here knows about hooks or models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype
from .layers import LayerAdapter

__all__ = ["work_dtype", "add_gram", "zero_sums", "gram_scratch", "covariance_from_sums", "ADD_BLOCK"]

#: Entries of a k x k block Gram added to the float64 running sum at a time.
ADD_BLOCK = 1 << 20


def work_dtype(adapter: LayerAdapter) -> torch.dtype:
    """dtype of the returned ``K``: the weight's dtype, float32 for half precision."""
    dtype = adapter.weight_matrix().dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def add_gram(
    acc: Tensor, buf: Tensor, adapter: LayerAdapter, grads: Tensor, scale: float = 1.0, keep: Tensor | None = None
) -> None:
    """``acc += scale * sum_b G_b^T G_b`` for the gradient block ``grads`` (b, *h.shape), over the rows
    ``keep`` (bool, ``None``: all); the Gram is formed in ``buf``'s dtype (k x k scratch), the running
    sum ``acc`` may be wider."""
    rows = adapter.out_rows(grads, lead=1)
    if keep is not None:
        rows = rows[:, keep]
    rows = rows.reshape(-1, rows.shape[-1]).to(buf.dtype)
    if rows.shape[1] != buf.shape[0]:  # never let out= resize a scratch that other layers share
        raise RuntimeError(
            f"layer {adapter.name!r}: its output rows have {rows.shape[1]} features, expected k={buf.shape[0]} "
            f"(output gradient of shape {tuple(grads.shape[1:])})"
        )
    torch.mm(rows.t(), rows, out=buf)
    if acc.dtype == buf.dtype:
        acc.add_(buf, alpha=scale)
        return
    step = max(1, ADD_BLOCK // buf.shape[1])  # a mixed-dtype add_ casts a full copy of buf (on CPU)
    for i in range(0, buf.shape[0], step):
        acc[i : i + step].add_(buf[i : i + step], alpha=scale)


def covariance_from_sums(sums: dict[str, Tensor], counts: dict[str, int], name: str, adapter: LayerAdapter) -> Tensor:
    """``K = K_unnorm / N`` of one layer in its working dtype; the running sum is taken out of ``sums``
    and divided in place, so the float64 sum is freed as soon as ``K`` exists."""
    return sums.pop(name).div_(max(counts[name], 1)).to(work_dtype(adapter))


def zero_sums(adapters: dict[str, LayerAdapter]) -> dict[str, Tensor]:
    """Zero ``k x k`` running sums per layer, on the layer's device, in the accumulation dtype."""
    with torch.inference_mode(False):  # accumulators are updated in place, also under inference_mode
        return {name: _zero_sum(a) for name, a in adapters.items()}


def _zero_sum(adapter: LayerAdapter) -> Tensor:
    device = adapter.weight_matrix().device
    return torch.zeros(adapter.k, adapter.k, dtype=accumulation_dtype(device), device=device)


def gram_scratch(adapters: dict[str, LayerAdapter]) -> dict[str, Tensor]:
    """A ``k x k`` scratch for the per-block Gram of each layer, in its working dtype, shared by layers of
    the same ``(k, dtype, device)``."""
    scratch: dict[tuple, Tensor] = {}
    out = {}
    with torch.inference_mode(False):
        for n, a in adapters.items():
            w = a.weight_matrix()
            key = (a.k, work_dtype(a), w.device)
            if key not in scratch:
                scratch[key] = torch.empty(a.k, a.k, dtype=key[1], device=key[2])
            out[n] = scratch[key]
    return out
