"""The speed limiter, the per-step engine of :class:`~slo_torch.SLOptimizer` and :func:`~slo_torch.attach`.

``before_step`` computes every gradient's norm in one pass (speed-limited layers plus one extra bin
for all other parameters), decides with a single host synchronisation whether the step may run
(non-finite gradients, GradScaler's ``found_inf``), and in ``mode="grad"`` rescales the gradients
(:func:`~slo_torch.functional.scale_layers_`). In ``mode="update"`` it snapshots the limited
parameters, and ``after_step`` rescales each layer's parameter change to norm ``lr * C_l``
(:func:`~slo_torch.functional.rescale_updates_`). The speed unit multiplies ``C_l`` by a factor ``u_l``
per layer (:meth:`SpeedLimiter.unit_factors`).

Which tensors form which layer is the :class:`Plan`. Every optimized tensor gets a *bin*: the index
of its speed-limited layer, or one extra bin for all other parameters (their norms are only checked
for non-finite values). Limited tensors come first, in layer order. A plan's fields are never
reassigned; it is rebuilt (:func:`build_plan`) when the param groups, their speeds or the parameters'
device change, and re-derived (:meth:`Plan.with_dtype`) when the gradients' dtype changes. Its buffers
are reused in place from step to step: the fast path's coefficients and, in update mode, the
snapshots of ``p_old`` (filled on first use and shared with a plan re-derived by ``with_dtype``,
since the parameters are the same).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .distributed import Sharding, align_grad_placements, is_dtensor, local_tensor, sharding_of
from .functional import (
    CoefficientBuffer,
    accumulate_dtype,
    applied_dtype,
    coefficient_factors,
    index_tensor,
    layer_sq_norms,
    rescale_updates_,
    scale_layers_,
    slo_coefficients,
    to_device,
    unrepresentable,
)
from .layers import SpeedSpec, normalize_speeds, resolve_layers

__all__ = ["SpeedLimiter", "Plan", "build_plan", "group_signature", "check_choice", "check_eps", "UNLIMITED",
           "NONFINITE_CHOICES", "SPEED_UNITS"]

NONFINITE_CHOICES = ("skip", "raise")
SPEED_UNITS = ("frobenius", "rms", "relative")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value``; ``ValueError`` naming ``name`` and the valid choices unless it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; valid choices: {tuple(choices)}")
    return value  # type: ignore[return-value]


def check_eps(eps: object, name: str = "slo_eps") -> float:
    """Return ``eps`` as a float; ``ValueError`` unless it is a finite real number ``>= 0`` (not a bool)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Invalid {name}: {eps!r}; {name} must be a finite number >= 0")
    return float(eps)


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
    layer_speeds: tuple[float, ...]  # C_l of each limited layer
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
    speed_tensor: Tensor  # layer_speeds as a tensor in dtype
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
        return vec[self.layer_group] * self.speed_tensor

    def sq_norms(
        self, tensors: Sequence[Tensor], bins: Tensor, owners: Sequence[int] | None = None,
        grouped: dict | None = None, inv_scale: Tensor | None = None,
    ) -> Tensor:
        """Per-bin sums of squares of whole tensors from their local shards: ``s_b = sum_ranks sum_i ||t_i||^2``.

        :func:`~slo_torch.functional.layer_sq_norms` (float64, exact at any scale of float32 and half precision
        tensors) of the local tensors, all-reduced over the process groups they are sharded along
        (:meth:`~slo_torch.distributed.Sharding.sum_over_ranks`). ``bins[j]`` is the bin of ``tensors[j]``,
        ``owners[j]`` its index in :attr:`params` (default: ``j``); ``grouped`` and ``inv_scale`` as in
        ``layer_sq_norms``. Every rank calls the all-reduces, with or without local tensors.
        """
        if not self.sharding.distributed:
            return layer_sq_norms(tensors, bins, self.num_bins, self.device, grouped, inv_scale)

        def local(js: list[int]) -> Tensor:
            idx = index_tensor(js, self.device)
            return layer_sq_norms([tensors[j] for j in js], bins[idx], self.num_bins, self.device,
                                  inv_scale=inv_scale)

        owners = owners if owners is not None else range(len(tensors))
        return self.sharding.sum_over_ranks(local, owners, self.num_bins, torch.float64, self.device)

    def limited_numels(self, tensors: Sequence[Tensor]) -> Tensor:
        """Number of entries ``n_l`` of each limited layer's whole tensors, from the local shards ``tensors``
        (those of :attr:`params` ``[:n_limited]``): ``n_l = sum_ranks sum_{i in l} numel(t_i)``, int64.

        Counted and all-reduced as :meth:`sq_norms` reduces norms (every rank calls the all-reduces).
        """
        numels = torch.tensor([t.numel() for t in tensors], dtype=torch.long)

        def local(js: list[int]) -> Tensor:
            count = torch.zeros(self.num_bins, dtype=torch.long, device=self.device)
            if js:
                idx = index_tensor(js, self.device)
                count.index_add_(0, self.limited_bins[idx], to_device(numels[js], self.device))
            return count

        counts = self.sharding.sum_over_ranks(local, range(len(tensors)), self.num_bins, torch.long, self.device)
        return counts[:-1]

    def with_dtype(self, dtype: torch.dtype) -> Plan:
        """This plan with norms and coefficients in ``dtype`` (follows the gradients, e.g. after ``model.double()``)."""
        return replace(self, dtype=dtype, **_numeric_buffers(self.layer_speeds, self.n_limited, dtype, self.device))


def _numeric_buffers(
    layer_speeds: Sequence[float], n_limited: int, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    """The plan's fields that depend on the accumulation dtype."""
    return {"speed_tensor": torch.tensor(layer_speeds, dtype=dtype, device=device),
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


_CURRENT: Any = object()  # check_groups(): validate against the speeds in force


class _Snapshot(NamedTuple):
    """``mode="update"``: the limited parameters (local tensors), their values before the base step, their
    indices in the plan (``None``: all of them) and their bins."""

    params: list[Tensor]
    old: list[Tensor]
    owners: list[int] | None
    bins: Tensor


class SpeedLimiter:
    """Speed-limit the layers of ``model`` optimized by ``optimizer`` (see :class:`~slo_torch.SLOptimizer`).

    ``mode`` is ``"grad"`` or ``"update"`` (the shells resolve ``"auto"``: :func:`~slo_torch.optimizer.resolve_mode`);
    ``speeds`` is the user's specification, resolved to :attr:`layer_speeds` by the plan.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        speeds: SpeedSpec,
        mode: str,
        eps: float = 0.0,
        per_tensor: bool = False,
        on_nonfinite: str = "skip",
        speed_unit: str = "frobenius",
    ) -> None:
        self.mode = check_choice("mode", mode, ("grad", "update"))  # resolved by the shell (mode="auto")
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_CHOICES)
        self.speed_unit = check_choice("speed_unit", speed_unit, SPEED_UNITS)
        self.eps = check_eps(eps)
        self.optimizer = optimizer
        self.model = model
        self.speeds = normalize_speeds(speeds)
        self.per_tensor = bool(per_tensor)
        self.nonfinite_steps = 0
        self.taken_steps = 0
        self._norms: tuple[tuple[str, ...], Tensor] | None = None  # (layer names, norms) of the last step taken
        self._update_norms: tuple[tuple[str, ...], Tensor] | None = None
        self._snapshot: _Snapshot | None = None
        self._factors: Tensor | None = None  # u_l of the step in progress (None: all 1)
        self._numels: tuple[Tensor, Tensor] | None = None  # (the plan's bins, n_l): "rms", counted once per plan
        self._reset_plan(None)
        self.refresh()

    # ------------------------------------------------------------------ plan
    def _reset_plan(self, plan: Plan | None) -> None:
        """Install ``plan`` and forget what was derived from the previous one."""
        self._plan = plan
        self._lr_cache: tuple[tuple[Any, ...], Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_plan", "_snapshot", "_lr_cache", "_numels")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = None
        self._numels = None
        self._reset_plan(None)  # a copy's param groups are new objects: rebuild the plan on first use

    def _current(self) -> Plan:
        if self._plan is None:
            self.refresh()
        return self._plan  # type: ignore[return-value]

    @property
    def layer_names(self) -> list[str]:
        """Names of the speed-limited layers, in model order (of the plan in force)."""
        return list(self._current().layer_names)

    @property
    def layer_speeds(self) -> list[float]:
        """Speed ``C_l`` of each speed-limited layer."""
        return list(self._current().layer_speeds)

    def check_groups(self, groups: list[dict[str, Any]], speeds: SpeedSpec = _CURRENT) -> None:
        """Validate a would-be list of param groups (``ValueError`` if it cannot be speed-limited)."""
        resolve_layers(self.model, self.speeds if speeds is _CURRENT else speeds, groups, self.per_tensor)
        if self.mode == "update":
            for i, g in enumerate(groups):
                if "lr" not in g:
                    raise ValueError(f"mode='update' needs an 'lr' in every param group; group {i} has none")

    def set_speeds(self, speeds: SpeedSpec) -> None:
        """Replace the speed specification (validated now; optimizer state is kept)."""
        speeds = normalize_speeds(speeds)
        self.check_groups(self.optimizer.param_groups, speeds)
        self.speeds = speeds
        self._reset_plan(None)
        self.refresh()

    def check_load(self, state_dict: dict[str, Any], speeds: SpeedSpec) -> None:
        """``ValueError`` unless the optimizer can be speed-limited with ``speeds`` once it loaded
        ``state_dict`` (whose saved param groups replace the current ones, parameters kept)."""
        saved = state_dict.get("param_groups")
        groups = self.optimizer.param_groups
        if not isinstance(saved, list) or len(saved) != len(groups):
            return  # the base optimizer's load_state_dict rejects it before changing anything
        would_be = [dict(new, params=g["params"]) for g, new in zip(groups, saved)]
        try:
            self.check_groups(would_be, normalize_speeds(speeds))
        except ValueError as e:
            raise ValueError(f"Cannot load this state dict (the optimizer is unchanged): {e}") from e

    def refresh(self) -> None:
        """Rebuild the plan if the optimizer's param groups (or their speeds) changed, or the parameters moved."""
        groups = self.optimizer.param_groups
        if self._plan is not None and self._plan.is_current(group_signature(groups)):
            return
        self.check_groups(groups)
        self._reset_plan(build_plan(groups, self.model, self.speeds, self.per_tensor))

    # ------------------------------------------------------------ quantities
    @property
    def last_grad_norms(self) -> dict[str, Tensor]:
        """Per-layer gradient norms ``||g_l||_F`` (before normalisation) of the last step taken, 0-dim tensors.

        A skipped step (non-finite gradient, GradScaler overflow) leaves them unchanged; ``taken_steps``
        counts the steps they can belong to. The layers are those limited at that step (the limited
        layers can change since: ``set_speeds``, ``add_param_group``, ``load_state_dict``).
        """
        return {} if self._norms is None else dict(zip(self._norms[0], self._norms[1].unbind(0)))

    @property
    def last_update_norms(self) -> dict[str, Tensor]:
        """``mode="update"``: per-layer norms of the base optimizer's update before rescaling (last step taken)."""
        if self._update_norms is None:
            return {}
        return dict(zip(self._update_norms[0], self._update_norms[1].unbind(0)))

    def _gather(self, plan: Plan) -> tuple[list[Tensor], Tensor, int, list[int] | None]:
        """The gradients present, their bins, how many are limited, their indices (``None``: all)."""
        grads = [p.grad for p in plan.params]
        if not any(g is None for g in grads):
            return grads, plan.bins, plan.n_limited, None  # type: ignore[return-value]
        keep = [i for i, g in enumerate(grads) if g is not None]
        n_lim = sum(1 for i in keep if i < plan.n_limited)
        bins = plan.bins[index_tensor(keep, plan.device)]
        return [grads[i] for i in keep], bins, n_lim, keep  # type: ignore[misc]

    def _coefficient_buffer(self, tensors: list[Tensor], owners: list[int] | None) -> CoefficientBuffer | None:
        """The fast path of :func:`scale_layers_`, chosen here for both modes: every limited tensor is
        present and they are dense, of one dtype and on the plan's device. Checked at every step (a few
        attribute reads per tensor): a layer can change dtype or device between steps without a new plan."""
        if owners is not None or not tensors:
            return None
        plan = self._current()
        dtype = tensors[0].dtype
        fast = all(not t.is_sparse and t.device == plan.device and t.dtype == dtype for t in tensors)
        return plan.coefficients if fast else None

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def before_step(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> bool:
        """Norms, the skip decision (one host sync) and, in ``"grad"`` mode, the rescaling.

        ``grad_scale``/``found_inf`` come from ``GradScaler`` when the base optimizer unscales
        gradients itself (fused optimizers): gradients are then ``S * g``, norms are ``||S g_i|| / S``
        per tensor (in double, unscaled before squaring: no overflow) and the coefficient
        ``C / (||g|| + eps)`` applied to ``S g`` leaves the base's own unscaling to produce
        ``C g / (||g|| + eps)``. Coefficients are float64; the same host sync says whether one lies
        outside the plan dtype's normal range (then it is applied in two factors). Returns False if
        the step must be skipped.
        """
        self.refresh()
        plan = self._current()
        self._snapshot = None
        if plan.has_dtensor:
            align_grad_placements(plan.params, plan.param_layers)
        grads, bins, n_lim, keep = self._gather(plan)
        if plan.has_dtensor:
            grads = [local_tensor(g) for g in grads]
        # a rank may hold no gradient (FSDP1 shards that are empty there, or an optimizer of frozen
        # layers): the step is then a no-op, and the rank still joins the all-reduce
        grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True) if grads else {}  # type: ignore[arg-type]
        dtype = accumulate_dtype(dt for _, dt in grouped)
        if grouped and dtype != plan.dtype:
            self._reset_plan(plan.with_dtype(dtype))
            plan = self._current()
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal()
        sq = plan.sq_norms(grads, bins, keep, grouped, inv_scale)
        norms = sq[:-1].sqrt()
        self._factors = self.unit_factors(plan)  # every rank, before the sync: "relative" all-reduces when sharded
        targets = plan.speed_tensor if self._factors is None else plan.speed_tensor * self._factors
        coefficients = None if self.mode == "update" else slo_coefficients(norms, targets, self.eps)  # float64
        narrow = applied_dtype(dt for _, dt in grouped)
        overflow = None if coefficients is None or narrow == torch.float64 else unrepresentable(coefficients, narrow)
        may_step, split = self._may_step(sq, found_inf, overflow)
        if not may_step:
            return False
        self._norms = (plan.layer_names, norms)
        self.taken_steps += 1
        limited, limited_bins = grads[:n_lim], (plan.limited_bins if keep is None else bins[:n_lim])
        if self.mode == "update":
            self._take_snapshot(n_lim, keep, limited_bins)
        elif n_lim:  # no limited layer has a gradient: nothing to rescale
            self._scale(limited, limited_bins, coefficients, keep, split)  # type: ignore[arg-type]
        return True

    def _scale(self, tensors: list[Tensor], bins: Tensor, coefficients: Tensor, owners: list[int] | None,
               split: bool) -> None:
        """``t <- c t`` with float64 coefficients: one multiplication in the plan's dtype, or, where ``split``
        (a coefficient outside that dtype's normal range), ``(t * hi) * lo`` (:func:`coefficient_factors`)."""
        dtype = self._current().dtype
        if not split:
            scale_layers_(tensors, bins, coefficients.to(dtype), self._coefficient_buffer(tensors, owners))
            return
        hi, lo = coefficient_factors(coefficients, dtype)
        scale_layers_(tensors, bins, hi)
        scale_layers_(tensors, bins, lo)

    def _may_step(self, sq: Tensor, found_inf: Tensor | None, overflow: Tensor | None) -> tuple[bool, bool]:
        """The one host synchronisation of the step: any non-finite norm, GradScaler's ``found_inf``, and
        ``overflow`` (a coefficient outside the normal range of a dtype it is applied in). Returns
        (may step, split the coefficients)."""
        if sq.is_meta:  # no values on the meta device: the base optimizer's own checks speak
            return True, False
        flags = [~torch.isfinite(sq).all()]
        if found_inf is not None:
            flags.append(to_device(found_inf, sq.device) > 0)
        if overflow is not None:
            flags.append(overflow)
        values = torch.stack(flags).tolist() if len(flags) > 1 else [bool(flags[0])]
        nonfinite = values[0]
        scaler_inf = found_inf is not None and values[1]
        split = overflow is not None and values[-1]
        if scaler_inf:
            return False, False  # GradScaler found inf/NaN: it handles the skip and the scale backoff
        if nonfinite:
            self._report_nonfinite(sq)
            return False, False
        return True, bool(split)

    def _report_nonfinite(self, sq: Tensor) -> None:
        self.nonfinite_steps += 1
        names = self._current().layer_names
        bad = [names[i] for i in (~torch.isfinite(sq[:-1])).nonzero().flatten().tolist()]
        if not bool(torch.isfinite(sq[-1])):
            bad.append(UNLIMITED)
        message = (
            f"Non-finite gradient in {bad}: optimizer step skipped, parameters and optimizer state "
            f"unchanged ({self.nonfinite_steps} step(s) skipped so far)"
        )
        if self.on_nonfinite == "raise":
            raise RuntimeError(message + "; pass on_nonfinite='skip' to skip such steps instead")
        warnings.warn(message, RuntimeWarning, stacklevel=5)  # the frame that called before_step()

    def unit_factors(self, plan: Plan) -> Tensor | None:
        """The speed unit's factor ``u_l`` per limited layer (the target is ``lr * C_l * u_l``), before the step.

        ``"frobenius"``: ``None`` (``u_l = 1``); ``"rms"``: ``sqrt(n_l)``, ``n_l`` the entries of the layer's
        tensors (counted once per plan); ``"relative"``: ``||W_l||_F`` of the layer's tensors, or 1 where they are
        all zero. Whole tensors under sharding: every rank calls it (it all-reduces as the gradient norms do).
        """
        if self.speed_unit == "frobenius":
            return None
        params = [local_tensor(p) for p in plan.params[:plan.n_limited]]
        if self.speed_unit == "rms":
            if self._numels is None or self._numels[0] is not plan.bins:
                self._numels = (plan.bins, plan.limited_numels(params))
            return self._numels[1].to(plan.dtype).sqrt_()
        weights = plan.sq_norms(params, plan.limited_bins)[:-1].sqrt_()
        return torch.where(weights > 0, weights, 1.0)

    def _take_snapshot(self, n_lim: int, keep: list[int] | None, bins: Tensor) -> None:
        plan = self._current()
        owners = list(range(plan.n_limited)) if keep is None else keep[:n_lim]
        params = [local_tensor(plan.params[i]) for i in owners]
        old = []
        for i, p in zip(owners, params):
            buf = plan.snapshots.get(i)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = plan.snapshots[i] = torch.empty_like(p)
            old.append(buf)
        if params:
            torch._foreach_copy_(old, params)
        self._snapshot = _Snapshot(params, old, owners if keep is not None else None, bins)

    def _layer_step_sizes(self) -> Tensor:
        """Target update norm ``lr_l * C_l`` per limited layer (cached while the lrs are unchanged floats)."""
        lrs = tuple(g["lr"] for g in self.optimizer.param_groups)
        if any(isinstance(lr, Tensor) for lr in lrs):
            return self._current().step_sizes(lrs)
        if self._lr_cache is None or self._lr_cache[0] != lrs:
            self._lr_cache = (lrs, self._current().step_sizes(lrs))
        return self._lr_cache[1]

    @torch.no_grad()
    def after_step(self) -> None:
        """``mode="update"``: ``p <- p_old + k_l (p_new - p_old)``, ``k_l = lr C_l u_l / (||p_new - p_old|| + eps)``."""
        snap, self._snapshot = self._snapshot, None
        if snap is None or (not snap.params and not self._current().sharding.distributed):
            return  # sharded: every rank joins the norms' all-reduce
        if snap.params:
            torch._foreach_sub_(snap.params, snap.old)  # params = p_new - p_old
        norms = self._current().sq_norms(snap.params, snap.bins, snap.owners)[:-1].sqrt_()
        self._update_norms = (self._current().layer_names, norms)
        if snap.params:
            plan = self._current()
            sizes = self._layer_step_sizes() if self._factors is None else self._layer_step_sizes() * self._factors
            k = slo_coefficients(norms, sizes, self.eps)  # float64
            # reading the flag waits for nothing on the CPU; on accelerators it would be a second host sync
            narrow = applied_dtype(p.dtype for p in snap.params)
            if plan.device.type == "cpu" and narrow != torch.float64 and bool(unrepresentable(k, narrow)):
                hi, lo = coefficient_factors(k, plan.dtype)
                scale_layers_(snap.params, snap.bins, hi)
                rescale_updates_(snap.params, snap.old, snap.bins, lo)
            else:
                rescale_updates_(snap.params, snap.old, snap.bins, k.to(plan.dtype),
                                 self._coefficient_buffer(snap.params, snap.owners))

    def skip_all_grads(self) -> None:
        """Drop every gradient so that a following ``optimizer.step()`` changes nothing."""
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                p.grad = None

