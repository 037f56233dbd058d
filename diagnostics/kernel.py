"""The PTK feature covariance from per-sample gradients: running sums of Grams and their normalisation.

``K_unnorm = sum_alpha sum_c g_{alpha,c} g_{alpha,c}^T`` is accumulated block by block from gradient rows
``G`` (``K_unnorm += G^T G``) in float64 (float32 on MPS). ``K`` is symmetric, so only its upper triangle is
summed and stored, packed by bands of ``ROW_BLOCK`` rows (band ``i`` holds rows ``[i, i + s)`` from column
``i`` on): about half the bytes and half the Gram work of a full ``k x k`` sum. ``K = K_unnorm / N``
(:func:`covariance_from_sums`) is the one place where ``K`` is normalised and unpacked. Nothing here knows
about hooks or models.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import accumulation_dtype
from .layers import LayerAdapter

__all__ = [
    "work_dtype",
    "add_gram",
    "zero_sums",
    "gram_scratch",
    "covariance_from_sums",
    "unpack_sum",
    "row_bands",
    "packed_size",
    "ROW_BLOCK",
]

#: Rows of ``K`` per band of the packed upper triangle (and of the Gram scratch).
ROW_BLOCK = 256


def row_bands(k: int) -> list[tuple[int, int, int]]:
    """``(first row i, rows s, offset)`` of each band of the packed upper triangle of a ``k x k`` matrix:
    band ``i`` is the ``s x (k - i)`` block of rows ``[i, i + s)`` and columns ``[i, k)``, stored from
    ``offset`` on."""
    bands, offset = [], 0
    for i in range(0, k, ROW_BLOCK):
        s = min(ROW_BLOCK, k - i)
        bands.append((i, s, offset))
        offset += s * (k - i)
    return bands


def packed_size(k: int) -> int:
    """Entries of the packed upper triangle of a ``k x k`` matrix: ``sum_i s (k - i)`` over its bands
    (``k (k + ROW_BLOCK) / 2`` at most)."""
    return sum(s * (k - i) for i, s, _ in row_bands(k))


def work_dtype(adapter: LayerAdapter) -> torch.dtype:
    """dtype of the returned ``K``: the weight's dtype, float32 for half precision."""
    dtype = adapter.weight_matrix().dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def add_gram(
    acc: Tensor, buf: Tensor, adapter: LayerAdapter, grads: Tensor, scale: float = 1.0, keep: Tensor | None = None
) -> None:
    """``acc += scale * triu(sum_b G_b^T G_b)`` for the gradient block ``grads`` (b, *h.shape), over the rows
    ``keep`` (bool, ``None``: all), band by band (:func:`row_bands`); each band's Gram
    ``G[:, i:i+s]^T G[:, i:]`` is formed in ``buf``'s dtype (a flat scratch of ``ROW_BLOCK x k`` entries),
    the packed running sum ``acc`` may be wider."""
    rows = adapter.out_rows(grads, lead=1)
    if keep is not None:
        rows = rows[:, keep]
    rows = rows.reshape(-1, rows.shape[-1]).to(buf.dtype)
    k = adapter.k
    if rows.shape[1] != k or buf.numel() < min(k, ROW_BLOCK) * k:  # out= must never resize a shared scratch
        raise RuntimeError(
            f"layer {adapter.name!r}: its output rows have {rows.shape[1]} features, expected k={k} "
            f"(output gradient of shape {tuple(grads.shape[1:])})"
        )
    for i, s, offset in row_bands(k):
        size = s * (k - i)
        band = buf[:size].view(s, k - i)
        torch.mm(rows[:, i : i + s].t(), rows[:, i:], out=band)
        acc[offset : offset + size].view(s, k - i).add_(band, alpha=scale)


def unpack_sum(acc: Tensor, k: int, dtype: torch.dtype, divisor: float = 1.0) -> Tensor:
    """The full symmetric ``k x k`` matrix ``acc / divisor`` in ``dtype`` from its packed upper triangle
    ``acc`` (each band divided in ``acc``'s dtype, then cast; the lower triangle mirrors the upper)."""
    out = torch.empty(k, k, dtype=dtype, device=acc.device)
    for i, s, offset in row_bands(k):
        band = acc[offset : offset + s * (k - i)].view(s, k - i)
        out[i : i + s, i:] = band / divisor if divisor != 1 else band
        out[i + s :, i : i + s] = out[i : i + s, i + s :].t()
    return out


def covariance_from_sums(sums: dict[str, Tensor], counts: dict[str, int], name: str, adapter: LayerAdapter) -> Tensor:
    """``K = K_unnorm / N`` of one layer in its working dtype, unpacked; the running sum is taken out of
    ``sums``, so it is freed as soon as ``K`` exists."""
    return unpack_sum(sums.pop(name), adapter.k, work_dtype(adapter), max(counts[name], 1))


def zero_sums(adapters: dict[str, LayerAdapter]) -> dict[str, Tensor]:
    """Zero packed ``k x k`` running sums per layer (:func:`packed_size` entries), on the layer's device, in
    the accumulation dtype."""
    with torch.inference_mode(False):  # accumulators are updated in place, also under inference_mode
        return {name: _zero_sum(a) for name, a in adapters.items()}


def _zero_sum(adapter: LayerAdapter) -> Tensor:
    device = adapter.weight_matrix().device
    return torch.zeros(packed_size(adapter.k), dtype=accumulation_dtype(device), device=device)


def gram_scratch(adapters: dict[str, LayerAdapter]) -> dict[str, Tensor]:
    """A flat scratch of ``min(k, ROW_BLOCK) x k`` entries for one band of the per-block Gram of each layer,
    in its working dtype, shared by layers of the same ``(k, dtype, device)``."""
    scratch: dict[tuple, Tensor] = {}
    out = {}
    with torch.inference_mode(False):
        for n, a in adapters.items():
            w = a.weight_matrix()
            key = (a.k, work_dtype(a), w.device)
            if key not in scratch:
                scratch[key] = torch.empty(min(a.k, ROW_BLOCK) * a.k, dtype=key[1], device=key[2])
            out[n] = scratch[key]
    return out
