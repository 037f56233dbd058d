"""Sharded tensors: DTensor (FSDP2's ``fully_shard``, tensor parallel) and FSDP1's flat shards.

A layer's norm must be the norm of the whole tensor, not of the local shard:
``||g||^2 = sum_ranks ||g_local||^2``. Local sums of squares of all layers are stacked into one
vector and all-reduced once per step over the process groups along which the tensors are sharded
(replicated dimensions hold identical copies and are not summed).

* DTensor: the ``Shard`` mesh dimensions of the parameter. A gradient whose placements differ
  from its parameter's (``Partial`` sums, e.g. a ``Replicate`` weight used on a ``Shard(0)`` batch)
  is first redistributed to the parameter's placements, as the optimizer's own update would.
* FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): each original parameter and its
  gradient are, on each rank, a flat view of the part that lies in the rank's shard (possibly
  empty); the group is the FSDP module's sharding process group.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "is_dtensor", "local_tensor", "shard_groups", "all_reduce_sum_", "align_grad_placements", "fsdp1_shard_groups",
    "flat_shard_groups", "Sharding", "sharding_of",
]


def is_dtensor(t: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing that module if unused: a
    DTensor exists only once it is imported; ``getattr`` covers the module while it is being imported)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (shares storage, so in-place ops act on the DTensor); else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def shard_groups(t: Tensor) -> tuple[Any, ...]:
    """Process groups whose ranks hold different pieces of ``t`` (its ``Shard`` mesh dimensions).

    Empty for plain tensors and fully replicated DTensors. A ``Partial`` parameter (unreduced sums)
    is rejected: its local values are not pieces of the tensor. (``Partial`` gradients are reduced
    by :func:`align_grad_placements`.)
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
                f"A DTensor parameter with placements {t.placements} cannot be speed-limited: Partial "  # type: ignore[attr-defined]
                "holds unreduced sums; redistribute the parameter to Shard or Replicate"
            )
        elif not isinstance(placement, Replicate):
            raise ValueError(f"Unsupported DTensor placement {placement!r}")
    return tuple(groups)


def align_grad_placements(params: Sequence[Tensor], names: Sequence[str]) -> None:
    """Give every DTensor gradient its parameter's placements: ``g <- g.redistribute(mesh, p.placements)``.

    A ``Partial`` gradient holds unreduced per-rank sums, not pieces of the tensor: its local norms
    differ across ranks. Redistributing reduces it (an all-reduce, or a reduce-scatter towards
    ``Shard``), which the base optimizer's update would otherwise do implicitly. Every rank calls it
    with the same parameters (DTensor placements are the same on all ranks). ``names[i]`` names the
    layer of ``params[i]`` in errors.
    """
    for p, name in zip(params, names):
        g: Any = p.grad
        if g is None or not is_dtensor(g):
            continue
        target = getattr(p, "placements", None)
        if g.placements == target:
            continue
        if target is None or g.device_mesh != p.device_mesh:  # type: ignore[attr-defined]
            raise ValueError(
                f"Layer {name!r} has a DTensor gradient ({g.placements} on {g.device_mesh}) whose parameter is "
                "not a DTensor on the same mesh; give parameters and gradients the same device mesh"
            )
        p.grad = g.redistribute(p.device_mesh, target)  # type: ignore[attr-defined]


def fsdp1_shard_groups(model: nn.Module | None) -> dict[int, tuple[Any, ...]]:
    """``id(param) -> process groups`` for the original parameters of FSDP1 modules in ``model``.

    FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) with ``use_orig_params=True`` shards
    a flat parameter across its process group; each original parameter's local data and gradient are
    the part of it in this rank's shard. The tuple is empty where each rank holds the full tensor
    (``NO_SHARD``, one-rank groups); for hybrid sharding it is the sharding (intra-node) group.
    """
    module = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    if model is None or module is None:
        return {}
    out: dict[int, tuple[Any, ...]] = {}
    for m in model.modules():
        handle = getattr(m, "_handle", None) if isinstance(m, module.FullyShardedDataParallel) else None
        if handle is None:
            continue
        group = handle.process_group
        sharded = handle.uses_sharded_strategy and group is not None and group.size() > 1
        flat = handle.flat_param
        for p in [*(flat._params or ()), *(flat._shared_params or ())]:
            out[id(p)] = (group,) if sharded else ()
    return out


def flat_shard_groups(p: Tensor, fsdp1: Mapping[int, tuple[Any, ...]], name: str) -> tuple[Any, ...]:
    """Process groups over which the FSDP1-managed parameter ``p`` is sharded (``()`` for any other tensor).

    ``fsdp1`` comes from :func:`fsdp1_shard_groups`. Raises ``ValueError`` (naming the layer ``name``
    and the fix) for a flat parameter (``use_orig_params=False``: it mixes layers) and for an FSDP1
    parameter whose FSDP module is not inside the given model.
    """
    if not getattr(p, "_fsdp_flattened", False) or is_dtensor(p):
        return ()
    flat_module = sys.modules.get("torch.distributed.fsdp._flat_param")
    if flat_module is not None and isinstance(p, flat_module.FlatParameter):
        raise ValueError(
            f"Layer {name!r} is an FSDP flat parameter, which concatenates the tensors of several layers: "
            "wrap the model with FullyShardedDataParallel(..., use_orig_params=True) (or use fully_shard) and "
            "build the optimizer from the wrapped model's parameters"
        )
    if id(p) not in fsdp1:
        raise ValueError(
            f"A parameter of layer {name!r} is sharded by FullyShardedDataParallel, but no FSDP module holding "
            "it was found in model=...; pass the FSDP-wrapped model as model= so that norms are taken over "
            "the whole tensor"
        )
    return fsdp1[id(p)]


def all_reduce_sum_(values: Tensor, groups: Sequence[Any]) -> Tensor:
    """In place ``values <- sum over the ranks of each group`` (one all-reduce per group)."""
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


@dataclass(frozen=True)
class Sharding:
    """Tensor ``i`` is summed over the process groups ``groups[bucket[i]]``; bucket 0 is ``()``: not sharded."""

    groups: tuple[tuple[Any, ...], ...]
    bucket: tuple[int, ...]

    @property
    def distributed(self) -> bool:
        """True if some tensor is sharded (its norms need an all-reduce)."""
        return len(self.groups) > 1

    def sum_over_ranks(
        self, local_sums: Callable[[list[int]], Tensor], owners: Iterable[int], size: int, dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """``sum_buckets sum_ranks local_sums(js)``: per-bin sums over the whole tensors from their local shards.

        The tensors ``j`` (of index ``owners[j]`` in this sharding's order) are split by bucket; ``local_sums(js)``
        returns the local per-bin sums (shape ``(size,)``, ``dtype`` on ``device``) of the tensors ``js`` of one
        bucket, which are all-reduced over the bucket's process groups (bucket 0, not sharded, is not). Every rank
        calls the all-reduces, with or without local tensors.
        """
        members: list[list[int]] = [[] for _ in self.groups]
        for j, i in enumerate(owners):
            members[self.bucket[i]].append(j)
        total = torch.zeros(size, dtype=dtype, device=device)
        for b, (pgs, js) in enumerate(zip(self.groups, members)):
            part = local_sums(js)
            if b:
                all_reduce_sum_(part, pgs)
            total += part
        return total


def sharding_of(params: Sequence[Tensor], names: Sequence[str], model: nn.Module | None) -> Sharding:
    """The :class:`Sharding` of ``params`` (DTensor or FSDP1 shards of ``model``); ``names[i]`` names errors."""
    keys: dict[tuple[int, ...], int] = {(): 0}
    groups: list[tuple[Any, ...]] = [()]
    bucket = []
    fsdp1 = fsdp1_shard_groups(model)
    for p, name in zip(params, names):
        pgs = shard_groups(p) or flat_shard_groups(p, fsdp1, name)
        key = tuple(id(pg) for pg in pgs)
        if key not in keys:
            keys[key] = len(groups)
            groups.append(pgs)
        bucket.append(keys[key])
    return Sharding(tuple(groups), tuple(bucket))
