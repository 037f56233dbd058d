"""``SLOptimizer``: Speed Limited Optimization wrapped around any ``torch.optim`` optimizer.

Beaglehole, Mitliagkas, Agarwala, *Feature learning as alignment* (TMLR 2024, arXiv 2402.05271).
Before the wrapped optimizer steps, every layer's gradient is rescaled to a fixed norm

    g_l <- C_l * g_l / (||g_l||_F + slo_eps)                   (mode="grad")

so plain SGD moves layer ``l`` by exactly ``lr * C_l`` per step. ``mode="update"`` lets the wrapped
optimizer step and then rescales each layer's parameter change to norm ``lr * C_l``. ``speed_unit``
multiplies ``C_l`` by ``u_l``: 1 (``"frobenius"``), ``sqrt(n_l)`` (``"rms"``) or ``||W_l||_F`` (``"relative"``).

The wrapper shares ``param_groups``, ``state`` and ``defaults`` with the wrapped optimizer (the same
objects, as timm's Lookahead does), so LR schedulers, ``GradScaler``, accelerate and the
``transformers`` Trainer treat it as the optimizer they know, and checkpoints keep torch's format
(plus ``"slo_speeds"``, ``"slo_speed_unit"`` and ``"slo_mode"`` entries that a plain optimizer ignores).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .functional import tensor_list
from .layers import SpeedSpec
from .limiter import SpeedLimiter
from .readouts import LimiterReadouts
from .wrapping import base_step, check_unambiguous, deprecated_eps, replay_first

__all__ = ["SLOptimizer"]

_NOT_FORWARDED = frozenset({"grad_scale", "found_inf"})
_EPS_DEPRECATION = (
    "SLOptimizer(optimizer, eps=...) is deprecated; SLO's own eps is now slo_eps= (eps= is reserved "
    "for the base optimizer's keyword in the SLOptimizer(params, base_optimizer=..., eps=...) form)"
)
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")
SPEEDS_KEY = "slo_speeds"  # state_dict entry with the speeds in force (a plain optimizer ignores it)
UNIT_KEY = "slo_speed_unit"  # state_dict entry with the speed unit
MODE_KEY = "slo_mode"  # state_dict entry with the (resolved) mode


class SLOptimizer(torch.optim.Optimizer, LimiterReadouts):
    """Speed Limited Optimization: ``g_l <- C_l g_l / (||g_l||_F + slo_eps)`` per layer, then the base step.

    Args:
        params: a ``torch.optim.Optimizer`` instance to wrap, or parameters / param groups from which
            ``base_optimizer(params, **base_kwargs)`` is built (e.g. for the Trainer's
            ``optimizer_cls_and_kwargs``).
        base_optimizer: the optimizer class when ``params`` are parameters.
        model: the module owning the parameters; layers are its modules' own parameters.
        speeds: ``{glob pattern: C}`` over module names (most specific wins, ``"*"`` default), a list
            in layer order, or ``None`` when param groups carry a ``"speed"`` key.
        mode: ``"grad"`` (normalise gradients in place: ``p.grad`` holds the limited gradient after
            ``step()``), ``"update"`` (rescale each layer's update to ``lr * C_l``; for Adam-type
            optimizers, which undo gradient scaling) or ``"auto"`` (``"grad"`` for SGD and ASGD, whose step
            scales with the gradient; ``"update"`` for every other optimizer). ``opt.mode`` is the resolved mode.
        speed_unit: what ``C_l`` measures; the target step norm is ``lr * C_l * u_l``: ``"frobenius"``
            (``u_l = 1``), ``"rms"`` (``u_l = sqrt(n_l)``, ``n_l`` the entries of the layer's tensors: ``C_l`` is
            the per-entry RMS step) or ``"relative"`` (``u_l = ||W_l||_F`` before the step: ``C_l`` is the
            fraction of the layer moved per unit lr; 1 for a layer that is all zeros). In grad mode the
            gradient is rescaled to norm ``C_l * u_l``.
        slo_eps: added to the norm, ``C / (||g|| + slo_eps)``.
        per_tensor: every parameter tensor is its own layer (named by its parameter name).
        on_nonfinite: ``"skip"`` (skip the step, warn, count in ``nonfinite_steps``) or ``"raise"``.
        **base_kwargs: every keyword of ``base_optimizer``, passed on unchanged (``lr=...``,
            ``eps=...``). When wrapping an instance, ``eps=`` is the deprecated name of ``slo_eps``.
    """

    def __init__(
        self,
        params: torch.optim.Optimizer | Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        *,
        model: nn.Module | None = None,
        speeds: SpeedSpec = None,
        mode: str = "auto",
        speed_unit: str = "frobenius",
        slo_eps: float = 0.0,
        per_tensor: bool = False,
        on_nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        if isinstance(params, nn.Module):
            # transformers.Trainer(optimizer_cls_and_kwargs=(SLOptimizer, {"model": model, ...})) pops
            # "model" from the kwargs and passes it in place of the parameters (its LOMO convention).
            model = params if model is None else model
            params = [p for p in params.parameters() if p.requires_grad]
        if isinstance(params, torch.optim.Optimizer) and "eps" in base_kwargs:
            slo_eps = deprecated_eps(base_kwargs.pop("eps"), slo_eps, _EPS_DEPRECATION)
        check_unambiguous(base_optimizer, base_kwargs, dict(
            model=model, speeds=speeds, mode=mode, speed_unit=speed_unit, slo_eps=slo_eps, per_tensor=per_tensor,
            on_nonfinite=on_nonfinite))
        base = _build_base(params, base_optimizer, base_kwargs)
        self.base_optimizer = base
        for name in _HOOK_DICTS:  # this wrapper's own hooks (torch.optim.Optimizer's attributes)
            setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        self._limiter = SpeedLimiter(base, model, speeds, mode, slo_eps, per_tensor, on_nonfinite, speed_unit)
        base._slo_wrapped = True  # type: ignore[attr-defined]  # attach() refuses it

    # ---- the wrapped optimizer's containers, always the same objects as the base's
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base_optimizer.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Mirrors the base: fused optimizers receive scaled gradients and ``grad_scale``/``found_inf``."""
        return bool(getattr(self.base_optimizer, "_step_supports_amp_scaling", False))

    def __getattr__(self, name: str) -> Any:
        # Called only for names not found normally: forward public attributes of the base
        # (e.g. ``train()``/``eval()`` of schedule-free optimizers).
        base = self.__dict__.get("base_optimizer")
        if base is None or name.startswith("_") or name in _NOT_FORWARDED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def __getstate__(self) -> dict[str, Any]:
        # as torch.optim.Optimizer: only the optimizer itself is copied or pickled, not hooks or the
        # step wrapper an LR scheduler puts on the instance (it would step the original)
        return {"base_optimizer": self.base_optimizer, "_limiter": self._limiter}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        self.base_optimizer._slo_wrapped = True  # type: ignore[attr-defined]

    # ---- SLO read-outs (the others come from LimiterReadouts)
    @property
    def slo_eps(self) -> float:
        """``slo_eps`` of ``C / (||g|| + slo_eps)``."""
        return self._limiter.eps

    @property
    def eps(self) -> float:
        """Deprecated name of :attr:`slo_eps`."""
        warnings.warn("SLOptimizer.eps is deprecated; use SLOptimizer.slo_eps", DeprecationWarning, stacklevel=2)
        return self._limiter.eps

    @property
    def speeds(self) -> dict[str, float]:
        """Resolved speed ``C_l`` of every limited layer."""
        self._limiter.refresh()
        return dict(zip(self._limiter.layer_names, self._limiter.layer_speeds))  # type: ignore[arg-type]

    def set_speeds(self, speeds: SpeedSpec) -> None:
        """Change the speeds (same forms as the constructor's ``speeds``); optimizer state is kept.

        The speeds in force are saved by :meth:`state_dict` and restored by :meth:`load_state_dict`.
        """
        self._limiter.set_speeds(speeds)

    # ---- torch.optim.Optimizer API
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: normalise (``mode="grad"``), run the base step, rescale updates (``"update"``).

        With a ``closure`` the loss and gradients are computed first; the base optimizer's first
        closure call returns that loss (later calls, e.g. by LBFGS, re-evaluate). The step is skipped
        (returning the loss) if any gradient is non-finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self.__dict__.get("grad_scale")
        found_inf = self.__dict__.get("found_inf")
        if not self._limiter.before_step(grad_scale, found_inf):
            return loss
        base = self.base_optimizer
        forwarded = [name for name in _NOT_FORWARDED if name in self.__dict__]
        for name in forwarded:
            setattr(base, name, self.__dict__[name])
        try:
            if closure is None:
                result = base_step(base, None)
            else:
                base_step(base, replay_first(closure, loss))
                result = loss
        finally:
            for name in forwarded:
                if name in base.__dict__:
                    delattr(base, name)
        self._limiter.after_step()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad`` (the parameters and their gradients are its own)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its parameters must belong to ``model``."""
        group = dict(param_group)
        group["params"] = tensor_list(group["params"])
        self._limiter.check_groups(list(self.param_groups) + [dict(self.defaults, **group)])
        self.base_optimizer.add_param_group(group)
        self._limiter.refresh()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``{'state', 'param_groups'}`` state dict and ``'slo_speeds'``, ``'slo_speed_unit'``,
        ``'slo_mode'``.

        ``'slo_speeds'`` is the speed specification in force (plain floats, patterns or a list;
        ``None`` when the param groups carry the speeds), ``'slo_speed_unit'`` the unit they are in and
        ``'slo_mode'`` the resolved mode (strings); a plain optimizer's ``load_state_dict`` ignores them. This
        wrapper's state-dict hooks are applied.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base_optimizer.state_dict()
        state_dict[SPEEDS_KEY] = self._limiter.speeds
        state_dict[UNIT_KEY] = self._limiter.speed_unit
        state_dict[MODE_KEY] = self._limiter.mode
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict` or by a plain optimizer of the base's type.

        Its ``'slo_speeds'`` replace the current speeds (a plain optimizer's state dict keeps them). A state
        dict saved with another ``speed_unit`` (its speeds mean other step lengths) or another mode (the
        base's state was built from other gradients) is refused.
        Everything is validated first: a load that raises leaves the optimizer as it was.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        has_speeds = SPEEDS_KEY in state_dict
        speeds = state_dict.pop(SPEEDS_KEY, None)
        for key, name, current, why in (
            (UNIT_KEY, "speed_unit", self._limiter.speed_unit, "its speeds would mean other step lengths"),
            (MODE_KEY, "mode", self._limiter.mode, "the base optimizer's state was built from other gradients"),
        ):
            saved = state_dict.pop(key, current)
            if saved != current:
                raise ValueError(
                    f"Cannot load this state dict (the optimizer is unchanged): it was saved with {name}={saved!r}, "
                    f"this optimizer has {name}={current!r}, and {why}; build the SLOptimizer with "
                    f"{name}={saved!r} to resume it"
                )
        self._limiter.check_load(state_dict, speeds if has_speeds else self._limiter.speeds)
        self.base_optimizer.load_state_dict(state_dict)
        if has_speeds:
            self._limiter.set_speeds(speeds)  # validated above: cannot fail now
        self._limiter.refresh()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        lim = self._limiter
        lim.refresh()
        lines = [f"SLOptimizer(mode={lim.mode!r}, speed_unit={lim.speed_unit!r}, slo_eps={lim.eps}, "
                 f"per_tensor={lim.per_tensor}, on_nonfinite={lim.on_nonfinite!r}, "
                 f"{len(lim.layer_names)} speed-limited layer(s):"]
        shown = list(zip(lim.layer_names, lim.layer_speeds))
        for name, speed in shown[:12]:
            lines.append(f"    {name or '<root>'}: C={speed:g}")
        if len(shown) > 12:
            lines.append(f"    ... ({len(shown) - 12} more)")
        base = "\n".join("  " + line for line in repr(self.base_optimizer).splitlines())
        lines.append(f"  base_optimizer=\n{base}\n)")
        return "\n".join(lines)


def _build_base(
    params: Any, base_optimizer: type[torch.optim.Optimizer] | None, base_kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    if isinstance(params, SLOptimizer) or (isinstance(base_optimizer, type) and issubclass(base_optimizer, SLOptimizer)):
        raise ValueError("This optimizer is already an SLOptimizer; wrap the plain optimizer only once")
    if isinstance(params, torch.optim.Optimizer):
        if getattr(params, "_slo_attached", False):
            raise ValueError(
                "A speed limit is attached to this optimizer (attach()); call handle.remove() before "
                "wrapping it in SLOptimizer, or keep using the attached optimizer"
            )
        if base_optimizer is not None or base_kwargs:
            raise TypeError(
                "Pass either an optimizer instance, or parameters with base_optimizer=<class> and its "
                f"keyword arguments, not both (got base_optimizer={base_optimizer!r}, kwargs={sorted(base_kwargs)})"
            )
        return params
    if base_optimizer is None:
        raise TypeError(
            "SLOptimizer needs an optimizer: SLOptimizer(torch.optim.SGD(params, lr=...), ...) or "
            "SLOptimizer(params, base_optimizer=torch.optim.SGD, lr=..., ...)"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")
    return base_optimizer(params, **base_kwargs)
