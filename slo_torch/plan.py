"""The per-step plan of :class:`~slo_torch.limiter.SpeedLimiter`: layers, bins and reused buffers.

Every optimized tensor gets a *bin*: the index of its speed-limited layer, or one extra bin for all
other parameters (their norms are only checked for non-finite values). Limited tensors come first,
in layer order. A plan's fields are never reassigned; it is rebuilt (:func:`build_plan`) when the
param groups, their speeds or the parameters' device change, and re-derived (:meth:`Plan.with_dtype`)
when the gradients' dtype changes. Its buffers are reused in place from step to step: the fast
path's coefficients and, in update mode, the snapshots of ``p_old`` (filled on first use and shared
with a plan re-derived by ``with_dtype``, since the parameters are the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import Sharding, is_dtensor, local_tensor, sharding_of
from .functional import CoefficientBuffer, accumulate_dtype, to_device
from .layers import SpeedSpec, resolve_layers

__all__ = ["Plan", "build_plan", "group_signature", "UNLIMITED"]

UNLIMITED = "<parameters without a speed>"  # the name of the extra bin in messages


def group_signature(groups: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """What identifies a list of param groups for the plan: each group's parameters (identities) and speed.

    A parameter replaced in place (``group["params"][i] = new``, which torch's optimizers accept) changes it.
    """
    return tuple((tuple(map(id, g["params"])), g.get("speed")) for g in groups)


@dataclass(frozen=True)
class Plan:
    """Which tensor is in which bin, and the tensors each step reuses."""

    signature: tuple[Any, ...]
    layer_names: tuple[str, ...]
    layer_speeds: tuple[float, ...]  # C_l
    params: tuple[Tensor, ...]  # limited tensors (layer order), then all other parameters
    param_layers: tuple[str, ...]  # each tensor's layer name, for messages
    n_limited: int
    device: torch.device  # of the first parameter's (local) tensor: norms and coefficients live here
    bins: Tensor  # bin of each tensor
    limited_bins: Tensor  # bins[:n_limited]
    layer_group: Tensor  # param group index of each limited layer
    sharding: Sharding
    has_dtensor: bool
    dtype: torch.dtype  # of norms and coefficients
    speeds: Tensor  # C_l, in dtype
    coefficients: CoefficientBuffer  # the fast path's per-tensor coefficients of the limited tensors
    snapshots: dict[int, Tensor]  # mode="update": p_old per limited tensor, allocated on first use

    @property
    def num_bins(self) -> int:
        """Limited layers plus the bin of the other parameters."""
        return len(self.layer_names) + 1

    def is_current(self, signature: tuple[Any, ...]) -> bool:
        """Same param groups, and the parameters were not moved (``model.cuda()`` after construction)."""
        return signature == self.signature and (
            not self.params or local_tensor(self.params[0]).device == self.device)

    def step_sizes(self, lrs: Sequence[float | Tensor]) -> Tensor:
        """``lr_l * C_l`` per limited layer, ``lr_l`` the lr of the layer's param group (``lrs[g]``)."""
        if any(isinstance(lr, Tensor) for lr in lrs):
            vec = torch.stack([to_device(torch.as_tensor(lr), self.device, self.dtype) for lr in lrs])
        else:
            vec = to_device(torch.tensor(lrs, dtype=self.dtype), self.device)
        return vec[self.layer_group] * self.speeds

    def with_dtype(self, dtype: torch.dtype) -> Plan:
        """This plan with norms and coefficients in ``dtype`` (follows the gradients, e.g. after ``model.double()``)."""
        return replace(self, dtype=dtype, **_numeric_buffers(self.layer_speeds, self.n_limited, dtype, self.device))


def _numeric_buffers(
    speeds: Sequence[float], n_limited: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """The plan's fields that depend on the accumulation dtype."""
    return {"speeds": torch.tensor(speeds, dtype=dtype, device=device),
            "coefficients": CoefficientBuffer(n_limited, dtype, device)}


def build_plan(
    groups: list[dict[str, Any]], model: nn.Module | None, speeds: SpeedSpec, per_tensor: bool
) -> Plan:
    """The plan for ``groups`` (already validated by the limiter's ``check_groups``)."""
    layers = [layer for layer in resolve_layers(model, speeds, groups, per_tensor) if layer.speed is not None]
    names = tuple(layer.name for layer in layers)
    layer_speeds = tuple(layer.speed for layer in layers)
    params = [p for layer in layers for p in layer.params]
    bins = [i for i, layer in enumerate(layers) for _ in layer.params]
    seen = {id(p) for p in params}
    n_limited = len(seen)
    for g in groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
                bins.append(len(layers))
    device = local_tensor(params[0]).device if params else torch.device("cpu")
    param_layers = tuple(names[b] if b < len(layers) else UNLIMITED for b in bins)
    group_of: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for p in g["params"]:
            group_of.setdefault(id(p), gi)
    bins_t = torch.tensor(bins, dtype=torch.long, device=device)
    dtype = accumulate_dtype(p.dtype for p in params)
    return Plan(
        signature=group_signature(groups), layer_names=names, layer_speeds=layer_speeds, params=tuple(params),
        param_layers=param_layers, n_limited=n_limited, device=device, bins=bins_t,
        limited_bins=bins_t[:n_limited],
        layer_group=torch.tensor([group_of[id(layer.params[0])] for layer in layers], dtype=torch.long, device=device),
        sharding=sharding_of(params, param_layers, model), has_dtensor=any(is_dtensor(p) for p in params),
        dtype=dtype, snapshots={}, **_numeric_buffers(layer_speeds, n_limited, dtype, device),
    )
