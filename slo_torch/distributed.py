"""Sharded tensors (DTensor, as used by FSDP2's ``fully_shard``).

A layer's norm must be the norm of the whole tensor, not of the local shard:
``||g||^2 = sum_ranks ||g_local||^2``. Local sums of squares of all layers are stacked into one
vector and all-reduced once per step over the mesh dimensions along which the tensors are sharded
(replicated dimensions hold identical copies and are not summed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["is_dtensor", "local_tensor", "shard_groups", "all_reduce_sum_"]


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing that module if unused)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage, so in-place ops act on the DTensor); else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def shard_groups(t: Tensor) -> tuple[Any, ...]:
    """Process groups whose ranks hold different pieces of ``t`` (its ``Shard`` mesh dimensions).

    Empty for plain tensors and fully replicated DTensors. ``Partial`` placements (unreduced sums)
    are rejected: their local values are not pieces of the tensor.
    """
    if not is_dtensor(t):
        return ()
    from torch.distributed.tensor import Partial, Replicate, Shard

    groups = []
    for dim, placement in enumerate(t.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            groups.append(t.device_mesh.get_group(dim))  # type: ignore[attr-defined]
        elif isinstance(placement, Partial):
            raise ValueError(
                "A DTensor gradient with a Partial placement cannot be speed-limited; reduce it first "
                "(e.g. redistribute to Shard or Replicate) before optimizer.step()"
            )
        elif not isinstance(placement, Replicate):
            raise ValueError(f"Unsupported DTensor placement {placement!r}")
    return tuple(groups)


def all_reduce_sum_(values: Tensor, groups: Sequence[Any]) -> Tensor:
    """In place ``values <- sum over the ranks of each group`` (one all-reduce per group)."""
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values
