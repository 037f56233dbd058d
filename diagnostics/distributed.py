"""Summing per-rank ``K`` sums across ``torch.distributed`` ranks in one collective.

Every rank measures its own shard of the probe; the unnormalised sums of all layers and the
per-layer sample counts are packed into one flat buffer and all-reduced once, so the result equals
one process on the concatenated probe. Every rank must take part (call ``measure()`` /
``ptk_covariance`` on every rank), otherwise the collective waits forever.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "all_reduce_sums", "is_main_process", "shard_bounds", "shard_probe"]


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank in ``group``."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 without ``torch.distributed``)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 (or without ``torch.distributed``)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0


def shard_bounds(n: int, group: Any = None) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous shard of ``n`` samples (the whole range without
    ``torch.distributed``)."""
    if not is_distributed(group):
        return 0, n
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


def shard_probe(inputs: Any, group: Any = None) -> Any:
    """This rank's contiguous shard of a probe given in full on every rank (tensor, tuple or dict)."""
    from .engine import probe_batch_size, split_probe

    start, stop = shard_bounds(probe_batch_size(inputs), group)
    return split_probe(inputs, start, stop)


def all_reduce_sums(
    sums: dict[str, Tensor], counts: dict[str, int], group: Any = None, failed: bool = False
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Sum ``sums`` (k x k per layer) and ``counts`` over ranks with a single ``all_reduce`` of one
    flat buffer; a no-op without ``torch.distributed`` (or with one rank).

    The buffer also carries a failure flag: a rank whose own measurement raised calls this with
    ``failed=True`` (and zero sums of the same shapes) before re-raising, so the other ranks are not
    left waiting in the collective; they raise ``RuntimeError`` instead of returning."""
    if not is_distributed(group) or not sums:
        return sums, counts
    names = list(sums)
    first = sums[names[0]]
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums.values()) else first.dtype
    tail = [float(counts[n]) for n in names] + [1.0 if failed else 0.0]
    flat = torch.cat(
        [sums[n].reshape(-1).to(first.device, dtype) for n in names]
        + [torch.tensor(tail, dtype=torch.float64).to(first.device, dtype)]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = {}, 0
    for n in names:
        size = sums[n].numel()
        out[n] = flat[offset : offset + size].view_as(sums[n]).to(sums[n].device, sums[n].dtype)
        offset += size
    *totals, n_failed = flat[offset:].tolist()
    if n_failed and not failed:
        raise RuntimeError(
            f"the K measurement failed on {int(round(n_failed))} other rank(s); see their error"
        )
    return out, {n: int(round(c)) for n, c in zip(names, totals)}
