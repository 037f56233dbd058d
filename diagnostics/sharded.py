"""Monitoring a model whose weights are sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` shard outside the forward pass. ``K`` needs no full
weight: each rank runs the model (FSDP2 gathers each unit's weights for its forward and backward, as
in training) on its own probe shard and the ``K`` sums are all-reduced as without sharding. Those
forward and backward passes all-gather in lockstep, so every rank must run the same number of them:
every rank's probe shard must have the same shape (:func:`check_lockstep`). The NFM and AGOP need
``W`` in full: :func:`full_weight` gathers one layer's weight at a time (and ``W_0``, which stays
sharded like the weights). Every rank must therefore call ``measure()`` (and ``save()``).

FSDP1 (``FullyShardedDataParallel``) keeps flat per-rank shards whose layout is not a layer's
``(k, d)`` weight; it is refused (:func:`check_supported`) rather than measured per shard, and so
are ``DTensor`` weights not sharded by FSDP2 on a 1-D mesh (tensor parallelism, HSDP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed
from .probe import describe_probe

__all__ = ["is_sharded", "full_weight", "check_supported", "check_lockstep"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a ``DTensor`` (FSDP2 / tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def full_weight(weight: Tensor) -> Tensor:
    """The full tensor of a ``DTensor`` (an all-gather: every rank must call it, in the same order);
    any other tensor unchanged."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(weight, dtensor):
        return weight.full_tensor()
    return weight


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` for FSDP1-wrapped models (per-rank flat shards) and for ``DTensor``
    weights not sharded by FSDP2 on a 1-D mesh (tensor parallelism hands on sharded layer outputs)."""
    if not dist.is_available():  # torch built without distributed: no FSDP, no DTensor
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "FullyShardedDataParallel (FSDP1) models cannot be monitored: each rank holds flat shards, not "
            "the layers' (k, d) weights, even with use_orig_params=True. Shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead, or monitor an unsharded copy"
        )
    if not is_sharded(model):
        return
    dtensor = _dtensor_type()
    meshes = {p.device_mesh.ndim for p in model.parameters() if isinstance(p, dtensor)}
    if not any(isinstance(m, FSDPModule) for m in model.modules()) or meshes != {1}:
        raise TypeError(
            "only DTensor weights sharded by torch.distributed.fsdp.fully_shard on a 1-D device mesh can be "
            "monitored; tensor-parallel or 2-D (HSDP, FSDP + TP) sharding hands on sharded layer outputs. "
            "Monitor an unsharded copy of the model instead"
        )


def check_lockstep(model: nn.Module, probe_inputs: Any, group: Any = None) -> None:
    """Under FSDP2 with several ranks, raise ``ValueError`` on every rank unless every rank's probe
    shard has the same tensor shapes (one small all-gather; a no-op otherwise)."""
    if not (distributed.is_distributed(group) and is_sharded(model)):
        return
    mine = describe_probe(probe_inputs)
    shapes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(shapes, mine, group=group)
    if len(set(shapes)) > 1:
        raise ValueError(
            f"with FSDP-sharded weights every rank must measure a probe shard of the same shape (the "
            f"forward and backward passes gather the weights in lockstep); got {shapes} on ranks "
            f"0..{len(shapes) - 1}. Use a probe whose number of samples is a multiple of the world size"
        )

