"""The per-step engine shared by :class:`~slo_torch.SLOptimizer` and :func:`~slo_torch.attach`.

``before_step`` computes every gradient's norm in one pass (speed-limited layers plus one extra bin
for all other parameters), decides with a single host synchronisation whether the step may run
(non-finite gradients, GradScaler's ``found_inf``), and in ``mode="grad"`` rescales the gradients.
In ``mode="update"`` it snapshots the limited parameters, and ``after_step`` rescales each layer's
parameter change to norm ``lr * C_l``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .distributed import (
    align_grad_placements,
    all_reduce_sum_,
    flat_shard_groups,
    fsdp1_shard_groups,
    is_dtensor,
    local_tensor,
    shard_groups,
)
from .functional import (
    accumulate_dtype,
    index_tensor,
    layer_sq_norms,
    scale_layers_,
    slo_coefficients,
    to_device,
)
from .layers import SpeedSpec, normalize_speeds, resolve_layers

__all__ = ["SpeedLimiter", "MODES", "NONFINITE_CHOICES"]

MODES = ("grad", "update")
NONFINITE_CHOICES = ("skip", "raise")
_CURRENT: Any = object()  # check_groups(): validate against the speeds in force


class SpeedLimiter:
    """Speed-limit the layers of ``model`` optimized by ``optimizer`` (see :class:`SLOptimizer`)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None,
        speeds: SpeedSpec,
        mode: str = "grad",
        eps: float = 0.0,
        per_tensor: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; valid choices: {MODES}")
        if on_nonfinite not in NONFINITE_CHOICES:
            raise ValueError(f"Unknown on_nonfinite {on_nonfinite!r}; valid choices: {NONFINITE_CHOICES}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"Invalid slo_eps: {eps!r}; slo_eps must be a finite number >= 0")
        self.optimizer = optimizer
        self.model = model
        self.speeds = normalize_speeds(speeds)
        self.mode = mode
        self.eps = float(eps)
        self.per_tensor = bool(per_tensor)
        self.on_nonfinite = on_nonfinite
        self.nonfinite_steps = 0
        self.taken_steps = 0
        self._norms: Tensor | None = None
        self._update_norms: Tensor | None = None
        self._snapshot: tuple[list[Tensor], list[Tensor], list[int] | None] | None = None
        self._signature: tuple[Any, ...] | None = None
        self._lr_cache: tuple[tuple[Any, ...], Tensor] | None = None
        self.refresh()

    # ------------------------------------------------------------------ plan
    def _group_signature(self, groups: list[dict[str, Any]]) -> tuple[Any, ...]:
        return tuple((id(g["params"]), len(g["params"]), g.get("speed")) for g in groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._snapshot = None
        self._signature = None  # a copy's param groups are new objects: rebuild the plan on first use

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
        self._signature = None
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
        """Rebuild the plan if the optimizer's param groups (or their speeds) changed."""
        groups = self.optimizer.param_groups
        signature = self._group_signature(groups)
        if signature == self._signature and (
            not self._params or local_tensor(self._params[0]).device == self._device
        ):  # same groups, and the parameters were not moved (``model.cuda()`` after construction)
            return
        self.check_groups(groups)
        self._build(groups)
        self._signature = signature

    def _build(self, groups: list[dict[str, Any]]) -> None:
        layers = [layer for layer in resolve_layers(self.model, self.speeds, groups, self.per_tensor)
                  if layer.speed is not None]
        self.layer_names = [layer.name for layer in layers]
        self.layer_speeds = [layer.speed for layer in layers]
        num = len(layers)
        params: list[Tensor] = []
        bins: list[int] = []
        for i, layer in enumerate(layers):
            params.extend(layer.params)
            bins.extend([i] * len(layer.params))
        limited_ids = {id(p) for p in params}
        seen = set(limited_ids)
        for g in groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
                    bins.append(num)
        self._params = params
        self._n_limited = len(limited_ids)
        first = local_tensor(params[0]) if params else None
        self._device = first.device if first is not None else torch.device("cpu")
        self._bins = torch.tensor(bins, dtype=torch.long, device=self._device)
        self._param_layers = [self.layer_names[b] if b < num else "<parameters without a speed>" for b in bins]
        group_of = {}
        for gi, g in enumerate(groups):
            for p in g["params"]:
                group_of.setdefault(id(p), gi)
        self._layer_group = torch.tensor([group_of[id(layer.params[0])] for layer in layers],
                                         dtype=torch.long, device=self._device)
        # sharded tensors: bucket index -> process groups; plain tensors are bucket 0 (no reduce)
        keys: dict[tuple[int, ...], int] = {(): 0}
        self._reduce_groups: list[tuple[Any, ...]] = [()]
        self._bucket = []
        fsdp1 = fsdp1_shard_groups(self.model)
        for p, name in zip(params, self._param_layers):
            pgs = shard_groups(p) or flat_shard_groups(p, fsdp1, name)
            key = tuple(id(pg) for pg in pgs)
            if key not in keys:
                keys[key] = len(self._reduce_groups)
                self._reduce_groups.append(pgs)
            self._bucket.append(keys[key])
        self._distributed = len(self._reduce_groups) > 1
        self._has_dtensor = any(is_dtensor(p) for p in params)
        self._buffers: dict[int, Tensor] = {}
        self._lr_cache = None
        self._sparse: bool | None = None
        self._uniform: bool | None = None
        self._bins_limited = self._bins[: self._n_limited]
        self._set_dtype(accumulate_dtype(p.dtype for p in params))

    def _set_dtype(self, dtype: torch.dtype) -> None:
        """Accumulate norms and coefficients in ``dtype`` (follows the gradients, e.g. after ``model.double()``)."""
        self._dtype = dtype
        self._speeds = torch.tensor(self.layer_speeds, dtype=dtype, device=self._device)
        self._lr_cache = None
        # fast path (every gradient present, one device and dtype): per-tensor coefficients are
        # written into one buffer whose 0-dim views are reused by torch._foreach_mul_ every step
        self._coef_buf = torch.empty(self._n_limited, dtype=dtype, device=self._device)
        self._coef_views = self._coef_buf.unbind(0)

    # ------------------------------------------------------------ quantities
    @property
    def last_grad_norms(self) -> dict[str, Tensor]:
        """Per-layer gradient norms ``||g_l||_F`` (before normalisation) of the last step taken, 0-dim tensors.

        A skipped step (non-finite gradient, GradScaler overflow) leaves them unchanged; ``taken_steps``
        counts the steps they can belong to.
        """
        if self._norms is None:
            return {}
        return dict(zip(self.layer_names, self._norms.unbind(0)))

    @property
    def last_update_norms(self) -> dict[str, Tensor]:
        """``mode="update"``: per-layer norms of the base optimizer's update before rescaling."""
        if self._update_norms is None:
            return {}
        return dict(zip(self.layer_names, self._update_norms.unbind(0)))

    def _sq_norms(
        self, tensors: list[Tensor], bins: Tensor, keep: list[int] | None, grouped: dict | None = None,
        inv_scale: Tensor | None = None,
    ) -> Tensor:
        """Per-bin sums of squares of the whole (unsharded) tensors (of ``tensors * inv_scale``)."""
        nbins = len(self.layer_names) + 1
        if not self._distributed:
            return layer_sq_norms(tensors, bins, nbins, self._device, self._dtype, grouped, inv_scale)
        owners = keep if keep is not None else range(len(tensors))
        members: list[list[int]] = [[] for _ in self._reduce_groups]
        for j, i in enumerate(owners):
            members[self._bucket[i]].append(j)
        total = torch.zeros(nbins, dtype=self._dtype, device=self._device)
        for b, (pgs, js) in enumerate(zip(self._reduce_groups, members)):
            idx = index_tensor(js, self._device)
            sq = layer_sq_norms([tensors[j] for j in js], bins[idx], nbins, self._device, self._dtype,
                                inv_scale=inv_scale)
            if b:  # every rank calls the all-reduce, with or without local gradients
                all_reduce_sum_(sq, pgs)
            total += sq
        return total

    def _gather(self) -> tuple[list[Tensor], Tensor, int, list[int] | None]:
        grads = [p.grad for p in self._params]
        if not any(g is None for g in grads):
            return grads, self._bins, self._n_limited, None  # type: ignore[return-value]
        keep = [i for i, g in enumerate(grads) if g is not None]
        n_lim = sum(1 for i in keep if i < self._n_limited)
        bins = self._bins[index_tensor(keep, self._device)]
        return [grads[i] for i in keep], bins, n_lim, keep  # type: ignore[misc]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def before_step(self, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> bool:
        """Norms, the skip decision (one host sync) and, in ``"grad"`` mode, the rescaling.

        ``grad_scale``/``found_inf`` come from ``GradScaler`` when the base optimizer unscales
        gradients itself (fused optimizers): gradients are then ``S * g``, norms are ``||S g_i|| / S``
        per tensor (in double, unscaled before squaring: no overflow) and the coefficient
        ``C / (||g|| + eps)`` applied to ``S g`` leaves the base's own unscaling to produce
        ``C g / (||g|| + eps)``. Returns False if the step must be skipped.
        """
        self.refresh()
        self._snapshot = None
        if self._has_dtensor:
            align_grad_placements(self._params, self._param_layers)
        grads, bins, n_lim, keep = self._gather()
        if self._has_dtensor:
            grads = [local_tensor(g) for g in grads]
        # a rank may hold no gradient (FSDP1 shards that are empty there, or an optimizer of frozen
        # layers): the step is then a no-op, and the rank still joins the all-reduce
        grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True) if grads else {}  # type: ignore[arg-type]
        dtype = accumulate_dtype(dt for _, dt in grouped)
        if grouped and dtype != self._dtype:
            self._set_dtype(dtype)
        sparse = self._sparse
        if sparse is None:  # a parameter's gradient layout does not change between steps
            sparse = any(g.is_sparse for g in grads)
            if keep is None:  # cache only a verdict over every gradient
                self._sparse = sparse
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal()
        sq = self._sq_norms(grads, bins, keep, grouped, inv_scale)
        # the one host synchronisation of the step: [any non-finite norm, GradScaler found inf]
        if sq.is_meta:  # no values on the meta device: the base optimizer's own checks speak
            decision = [False]
        elif found_inf is None:
            decision = [not bool(torch.isfinite(sq).all())]
        else:
            flags = [~torch.isfinite(sq).all(), to_device(found_inf, self._device) > 0]
            decision = torch.stack(flags).tolist()
        if len(decision) > 1 and decision[1]:
            return False  # GradScaler found inf/NaN: it handles the skip and the scale backoff
        if decision[0]:
            self._report_nonfinite(sq)
            return False
        norms = sq[:-1].sqrt()
        self._norms = norms
        self.taken_steps += 1
        if self.mode == "update":
            self._take_snapshot(n_lim, keep, bins[:n_lim])
        elif n_lim:  # no limited layer has a gradient: nothing to rescale
            coefficients = slo_coefficients(norms, self._speeds, self.eps)
            if keep is None and not sparse and len(grouped) == 1 and next(iter(grouped))[0] == self._device:
                torch.index_select(coefficients, 0, self._bins_limited, out=self._coef_buf)
                torch._foreach_mul_(grads[:n_lim], self._coef_views)
            else:
                scale_layers_(grads[:n_lim], bins[:n_lim], coefficients)
        return True

    def _report_nonfinite(self, sq: Tensor) -> None:
        self.nonfinite_steps += 1
        bad = [self.layer_names[i] for i in (~torch.isfinite(sq[:-1])).nonzero().flatten().tolist()]
        if not bool(torch.isfinite(sq[-1])):
            bad.append("<parameters without a speed>")
        message = (
            f"Non-finite gradient in {bad}: optimizer step skipped, parameters and optimizer state "
            f"unchanged ({self.nonfinite_steps} step(s) skipped so far)"
        )
        if self.on_nonfinite == "raise":
            raise RuntimeError(message + "; pass on_nonfinite='skip' to skip such steps instead")
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _take_snapshot(self, n_lim: int, keep: list[int] | None, bins: Tensor) -> None:
        owners = list(range(self._n_limited)) if keep is None else keep[:n_lim]
        params = [local_tensor(self._params[i]) for i in owners]
        buffers = []
        for i, p in zip(owners, params):
            buf = self._buffers.get(i)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                buf = self._buffers[i] = torch.empty_like(p)
            buffers.append(buf)
        if params:
            torch._foreach_copy_(buffers, params)
        self._snapshot = (params, buffers, owners if keep is not None else None)
        self._snapshot_bins = bins

    def _single_group(self, tensors: list[Tensor]) -> bool:
        """All tensors on the plan's device with one dtype (the foreach fast path applies)."""
        if self._uniform is None:
            self._uniform = all(t.device == self._device and t.dtype == tensors[0].dtype for t in tensors)
        return self._uniform

    def _layer_step_sizes(self) -> Tensor:
        """Target update norm ``lr_l * C_l`` per limited layer (cached while the lrs are unchanged floats)."""
        lrs = tuple(g["lr"] for g in self.optimizer.param_groups)
        if self._lr_cache is not None and not any(isinstance(lr, Tensor) for lr in lrs):
            if self._lr_cache[0] == lrs:
                return self._lr_cache[1]
        if any(isinstance(lr, Tensor) for lr in lrs):
            vec = torch.stack([to_device(torch.as_tensor(lr), self._device, self._dtype) for lr in lrs])
        else:
            vec = to_device(torch.tensor(lrs, dtype=self._dtype), self._device)
        per_layer = vec[self._layer_group] * self._speeds
        self._lr_cache = (lrs, per_layer)
        return per_layer

    @torch.no_grad()
    def after_step(self) -> None:
        """``mode="update"``: ``p <- p_old + k_l (p_new - p_old)``, ``k_l = lr C_l / (||p_new - p_old|| + eps)``."""
        if self._snapshot is None:
            return
        params, buffers, keep = self._snapshot
        self._snapshot = None
        if not params and not self._distributed:  # sharded: every rank joins the norms' all-reduce
            return
        bins = self._snapshot_bins
        if params:
            torch._foreach_sub_(params, buffers)  # params = p_new - p_old = delta
        norms = self._sq_norms(params, bins, keep)[:-1].sqrt_()
        self._update_norms = norms
        if not params:
            return
        k = slo_coefficients(norms, self._layer_step_sizes(), self.eps)
        # k delta + p_old, accurate for any update size (p_new + (1 - k)(p_old - p_new) cancels p_old
        # when the base's step is much larger than the parameters)
        if keep is None and self._single_group(params):
            torch.index_select(k, 0, self._bins_limited, out=self._coef_buf)
            torch._foreach_mul_(params, self._coef_views)
        else:
            scale_layers_(params, bins, k)
        torch._foreach_add_(params, buffers)

    def skip_all_grads(self) -> None:
        """Drop every gradient so that a following ``optimizer.step()`` changes nothing."""
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
