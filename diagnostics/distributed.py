"""Summing per-rank ``K`` sums across ``torch.distributed`` ranks.

Every rank measures its own shard of the probe; the per-layer sample counts (with a failure flag)
are all-reduced first, then the unnormalised sums of all layers packed into one flat buffer, so the
result equals one process on the concatenated probe. Every rank must take part (call ``measure()`` /
``ptk_covariance`` on every rank), otherwise the collective waits forever.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .probe import probe_batch_size, split_probe

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
    start, stop = shard_bounds(probe_batch_size(inputs), group)
    return split_probe(inputs, start, stop)


def all_reduce_sums(
    sums: dict[str, Tensor],
    counts: dict[str, int],
    group: Any = None,
    failed: bool = False,
    zeros: Callable[[str], Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Sum ``sums`` (k x k per layer) and ``counts`` over ranks; a no-op without
    ``torch.distributed`` (or with one rank).

    ``counts`` names every layer; a layer with a count but no sum has its ``K`` known analytically
    (an output layer, :mod:`diagnostics.output_layer`), and a rank without samples has no sums at all.
    First one small ``all_reduce`` of the counts, those flags and a failure flag: a rank whose own
    measurement raised calls this with ``failed=True`` before re-raising, so the others raise
    ``RuntimeError`` instead of waiting; ranks that disagree on the analytic layers raise as well.
    Then one ``all_reduce`` of the flat buffer of the other layers' sums (a rank without samples
    contributes ``zeros(name)``)."""
    if not is_distributed(group) or not counts:
        return sums, counts
    names = list(counts)
    has_rows = any(counts.values())
    analytic = [1.0 if has_rows and n not in sums else 0.0 for n in names]
    head = torch.tensor(
        [float(counts[n]) for n in names] + analytic + [1.0 if has_rows else 0.0, 1.0 if failed else 0.0],
        dtype=torch.float64,
    )
    device = next(iter(sums.values())).device if sums else _collective_device(group)
    head = head.to(device)
    dist.all_reduce(head, op=dist.ReduceOp.SUM, group=group)
    values = head.tolist()
    totals, flags, (ranks_with_rows, n_failed) = values[: len(names)], values[len(names) : -2], values[-2:]
    if n_failed:
        if failed:
            return sums, counts
        raise RuntimeError(f"the K measurement failed on {int(round(n_failed))} other rank(s); see their error")
    mixed = [n for n, f in zip(names, flags) if 0 < f < ranks_with_rows]
    if mixed:
        raise RuntimeError(
            f"layers {mixed} return the model output on some ranks only; every rank must run the same model"
        )
    out_counts = {n: int(round(c)) for n, c in zip(names, totals)}
    need = [n for n, f in zip(names, flags) if f == 0]
    if not need:
        return {}, out_counts
    if zeros is None and any(n not in sums for n in need):
        raise ValueError("all_reduce_sums needs zeros=... to fill the sums of a rank without samples")
    local = {n: sums[n] if n in sums else zeros(n) for n in need}
    first = local[need[0]]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in local.values()) else first.dtype
    flat = torch.cat([local[n].reshape(-1).to(first.device, dtype) for n in need])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, offset = {}, 0
    for n in need:
        size = local[n].numel()
        out[n] = flat[offset : offset + size].view_as(local[n]).to(local[n].device, local[n].dtype)
        offset += size
    return out, out_counts


def _collective_device(group: Any = None) -> torch.device:
    """CPU for gloo, the current CUDA device for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
