"""``SLOptimizer`` and ``attach``: Speed Limited Optimization around any ``torch.optim`` optimizer.

Beaglehole, Mitliagkas, Agarwala, *Feature learning as alignment* (TMLR 2024, arXiv 2402.05271).
Before the wrapped optimizer steps, every layer's gradient is rescaled to a fixed norm

    g_l <- C_l * g_l / (||g_l||_F + slo_eps)                   (mode="grad")

so plain SGD moves layer ``l`` by exactly ``lr * C_l`` per step. ``mode="update"`` lets the wrapped
optimizer step and then rescales each layer's parameter change to norm ``lr * C_l``; ``mode="auto"``
picks one for the optimizer's class (:func:`resolve_mode`). ``speed_unit`` multiplies ``C_l`` by ``u_l``:
1 (``"frobenius"``), ``sqrt(n_l)`` (``"rms"``) or ``||W_l||_F`` (``"relative"``).

Both forms are thin shells around one :class:`~slo_torch.limiter.SpeedLimiter`, whose ``before_step`` and
``after_step`` run around the base optimizer's step, and share its read-outs (:class:`LimiterReadouts`):

* ``SLOptimizer`` wraps the optimizer. It shares ``param_groups``, ``state`` and ``defaults`` with the
  wrapped optimizer (the same objects, as timm's Lookahead does), so LR schedulers, ``GradScaler``,
  accelerate and the ``transformers`` Trainer treat it as the optimizer they know, and checkpoints keep
  torch's format (plus ``"slo_speeds"``, ``"slo_speed_unit"`` and ``"slo_mode"`` entries that a plain
  optimizer ignores). Its ``step`` runs the base's step without the global hooks (:func:`base_step`).
* ``attach`` registers a step pre-hook (and, for ``mode="update"``, a post-hook that runs before the
  optimizer's other post-hooks, so they see the rescaled step) on the optimizer instance. The optimizer
  object, its class and its checkpoints are unchanged; ``handle.remove()`` undoes it.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .functional import tensor_list
from .layers import SpeedSpec
from .limiter import SpeedLimiter, check_choice

__all__ = ["SLOptimizer", "attach", "SLOHandle", "LimiterReadouts", "resolve_mode", "base_step", "MODES"]

MODES = ("auto", "grad", "update")
# torch.optim classes whose step is proportional to the gradient: rescaling g rescales the step (grad mode)
GRAD_SCALED = ("SGD", "ASGD")
# torch.optim classes whose step does not scale with the gradient (per-coordinate or per-matrix
# normalisation, signs, LBFGS's ratios of gradient differences): rescaling g leaves the step (almost) as it was
SCALE_INVARIANT = ("Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam",
                   "RAdam", "RMSprop", "Rprop", "SparseAdam")


def _known_rule(optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the ``torch.optim`` class whose step ``optimizer`` runs: its class, or a subclass that keeps that
    class's ``step``; ``None`` otherwise (a class that defines its own step follows a rule SLO does not know)."""
    step = inspect.unwrap(type(optimizer).step)
    for name in GRAD_SCALED + SCALE_INVARIANT:
        cls = getattr(torch.optim, name, None)  # Adafactor and Muon exist in recent torch only
        if cls is not None and isinstance(optimizer, cls) and inspect.unwrap(cls.step) is step:
            return name
    return None


def resolve_mode(mode: str, optimizer: torch.optim.Optimizer) -> str:
    """``"grad"`` or ``"update"`` for ``mode`` over ``optimizer``.

    ``"auto"`` is ``"grad"`` where the step scales with the gradient (SGD, ASGD and subclasses that keep their
    step: rescaling ``g_l`` to norm ``C_l`` sets the step, the paper's rule) and ``"update"`` everywhere else
    (Adam-type, Adagrad-type, sign-based, Muon, LBFGS, and every optimizer not listed: rescaling the update to
    ``lr * C_l`` is exact whatever the step's rule). LBFGS is ``"update"``: its first step is divided by
    ``||g||_1``, later directions come from ratios of gradient differences, and it re-evaluates its closure
    (grad mode would normalise the first evaluation only). An explicit ``"grad"`` over a scale-invariant
    class warns.
    """
    check_choice("mode", mode, MODES)
    rule = _known_rule(optimizer)
    if mode == "auto":
        return "grad" if rule in GRAD_SCALED else "update"
    if mode == "grad" and rule in SCALE_INVARIANT:
        warnings.warn(
            f"mode='grad' rescales the gradients, but the step of {type(optimizer).__name__} does not scale with "
            "the gradient, so the rescaling does not set how far each layer moves; use mode='update' (the "
            "default mode='auto' picks it) to move each layer by its target step lr * C_l",
            UserWarning, stacklevel=3,
        )
    return mode


class LimiterReadouts:
    """Read-outs of the :class:`~slo_torch.limiter.SpeedLimiter` in ``self.limiter``, shared by ``SLOptimizer`` and
    ``SLOHandle``."""

    limiter: SpeedLimiter

    @property
    def mode(self) -> str:
        """``"grad"`` or ``"update"``: the mode in force (``"auto"`` resolved for the optimizer's class)."""
        return self.limiter.mode

    @property
    def speed_unit(self) -> str:
        """``"frobenius"``, ``"rms"`` or ``"relative"``: each layer's target step norm is ``lr * C_l * u_l``."""
        return self.limiter.speed_unit

    @property
    def layer_names(self) -> list[str]:
        """Names of the speed-limited layers, in model order."""
        self.limiter.refresh()
        return self.limiter.layer_names

    @property
    def layer_speeds(self) -> dict[str, float]:
        """Speed ``C_l`` of every limited layer, resolved from ``speeds``: ``{layer name: C_l}``."""
        self.limiter.refresh()
        return dict(zip(self.limiter.layer_names, self.limiter.layer_speeds))  # type: ignore[arg-type]

    @property
    def last_grad_norms(self) -> dict[str, Tensor]:
        """Per-layer gradient norms ``||g_l||_F`` of the last step taken, before normalisation (0-dim tensors)."""
        return self.limiter.last_grad_norms

    @property
    def last_update_norms(self) -> dict[str, Tensor]:
        """``mode="update"``: per-layer norms of the base optimizer's update, before rescaling."""
        return self.limiter.last_update_norms

    @property
    def nonfinite_steps(self) -> int:
        """Number of steps skipped (made no-ops) because of a non-finite gradient."""
        return self.limiter.nonfinite_steps

    @property
    def taken_steps(self) -> int:
        """Number of steps taken (not skipped); ``last_grad_norms`` belong to the last of them."""
        return self.limiter.taken_steps


_NOT_FORWARDED = frozenset({"grad_scale", "found_inf"})
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
               "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
               "_optimizer_load_state_dict_post_hooks")
SPEEDS_KEY = "slo_speeds"  # state_dict entry with the speeds in force (a plain optimizer ignores it)
UNIT_KEY = "slo_speed_unit"  # state_dict entry with the speed unit
MODE_KEY = "slo_mode"  # state_dict entry with the (resolved) mode
# SLOptimizer's own keywords and their defaults (check_unambiguous: a non-default one may clash with the base's)
SLO_DEFAULTS = {"model": None, "speeds": None, "mode": "auto", "speed_unit": "frobenius", "slo_eps": 0.0,
                "per_tensor": False, "on_nonfinite": "skip"}


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
            ``eps=...``).
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
        check_unambiguous(base_optimizer, base_kwargs, dict(
            model=model, speeds=speeds, mode=mode, speed_unit=speed_unit, slo_eps=slo_eps, per_tensor=per_tensor,
            on_nonfinite=on_nonfinite))
        base = _build_base(params, base_optimizer, base_kwargs)
        self.base_optimizer = base
        for name in _HOOK_DICTS:  # this wrapper's own hooks (torch.optim.Optimizer's attributes)
            setattr(self, name, OrderedDict())
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()
        self.limiter = SpeedLimiter(base, model, speeds, resolve_mode(mode, base), slo_eps, per_tensor, on_nonfinite,
                                    speed_unit)
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
        return {"base_optimizer": self.base_optimizer, "limiter": self.limiter}

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
        return self.limiter.eps

    def set_speeds(self, speeds: SpeedSpec) -> None:
        """Change the speeds (same forms as the constructor's ``speeds``); optimizer state is kept.

        The speeds in force are saved by :meth:`state_dict` and restored by :meth:`load_state_dict`.
        """
        self.limiter.set_speeds(speeds)

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
        if not self.limiter.before_step(grad_scale, found_inf):
            return loss
        base = self.base_optimizer
        forwarded = [name for name in _NOT_FORWARDED if name in self.__dict__]
        for name in forwarded:
            setattr(base, name, self.__dict__[name])
        try:
            if closure is None:
                result = base_step(base, None, self.limiter.after_step)
            else:
                base_step(base, replay_first(closure, loss), self.limiter.after_step)
                result = loss
        finally:
            for name in forwarded:
                if name in base.__dict__:
                    delattr(base, name)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad`` (the parameters and their gradients are its own)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; its parameters must belong to ``model``."""
        group = dict(param_group)
        if isinstance(group["params"], set):  # as torch.optim.Optimizer.add_param_group
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but "
                "the ordering of tensors in sets will change between runs. Please use a list instead."
            )
        group["params"] = tensor_list(group["params"])
        self.limiter.check_groups(list(self.param_groups) + [dict(self.defaults, **group)])
        self.base_optimizer.add_param_group(group)
        self.limiter.refresh()

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
        speeds = self.limiter.speeds  # a copy, as torch copies param_groups: editing it changes nothing here
        state_dict[SPEEDS_KEY] = (dict(speeds) if isinstance(speeds, Mapping)
                                  else None if speeds is None else list(speeds))
        state_dict[UNIT_KEY] = self.limiter.speed_unit
        state_dict[MODE_KEY] = self.limiter.mode
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
            (UNIT_KEY, "speed_unit", self.limiter.speed_unit, "its speeds would mean other step lengths"),
            (MODE_KEY, "mode", self.limiter.mode, "the base optimizer's state was built from other gradients"),
        ):
            saved = state_dict.pop(key, current)
            if saved != current:
                raise ValueError(
                    f"Cannot load this state dict (the optimizer is unchanged): it was saved with {name}={saved!r}, "
                    f"this optimizer has {name}={current!r}, and {why}; build the SLOptimizer with "
                    f"{name}={saved!r} to resume it"
                )
        self.limiter.check_load(state_dict, speeds if has_speeds else self.limiter.speeds)
        self.base_optimizer.load_state_dict(state_dict)
        if has_speeds:
            self.limiter.set_speeds(speeds)  # validated above: cannot fail now
        self.limiter.refresh()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        lim = self.limiter
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


def check_unambiguous(
    base_optimizer: Any, base_kwargs: dict[str, Any], slo_kwargs: dict[str, Any]
) -> None:
    """``TypeError`` if a keyword could mean SLO's knob or the base optimizer's."""
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        return
    try:
        signature = inspect.signature(base_optimizer)
    except (TypeError, ValueError):  # a signature Python cannot read: nothing to compare
        return
    named = {n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    given = {n for n, v in slo_kwargs.items() if (v is not None if SLO_DEFAULTS[n] is None else v != SLO_DEFAULTS[n])}
    clashes = sorted(given & named)
    if clashes:
        raise TypeError(
            f"{base_optimizer.__name__} has its own {clashes} keyword(s), which SLOptimizer also takes: "
            f"build the optimizer yourself and wrap the instance, SLOptimizer({base_optimizer.__name__}"
            f"(params, ...), model=..., speeds=...)"
        )
    if "eps" in base_kwargs and "eps" not in named and not takes_any:
        raise TypeError(
            f"eps= goes to the base optimizer in this form, and {base_optimizer.__name__} takes no eps; "
            "SLO's own eps is slo_eps="
        )


def base_step(
    base: torch.optim.Optimizer, closure: Callable[[], Any] | None, after: Callable[[], None] | None = None
) -> Any:
    """``base.step(closure)`` without the global step hooks, which the wrapper's step already ran.

    ``torch.optim.Optimizer`` wraps every ``step`` to run the global hooks, then the instance's; the
    wrapped function is called here with the base's own hooks around it, as torch's wrapper does.
    ``after`` runs between the step and the base's post-hooks, so that they see the parameters it leaves
    (update mode's rescaling). Where the base's ``step`` is not torch's hook wrapper (replaced after
    construction), its post-hooks cannot run after ``after``: a ``RuntimeWarning`` says so if it has any.
    """
    step = type(base).step
    inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if inner is None:  # not torch's hook wrapper (a subclass replaced it): step as it says
        out = base.step() if closure is None else base.step(closure)
        if after is not None:
            if getattr(base, "_optimizer_step_post_hooks", None):
                warnings.warn(
                    f"{type(base).__name__}.step is not torch's hooked step, so its step post-hooks cannot run after "
                    "the update-mode rescaling (they ran inside it, on the un-limited parameters, or not at all); "
                    "register them on the SLOptimizer", RuntimeWarning, stacklevel=4)
            after()
        return out
    if hasattr(base.step, "_wrapped_by_lr_sched"):  # an LR scheduler of the base tracks its steps
        base._opt_called = True  # type: ignore[attr-defined]
    args: tuple[Any, ...] = (base,) if closure is None else (base, closure)
    kwargs: dict[str, Any] = {}
    for pre_hook in base._optimizer_step_pre_hooks.values():
        result = pre_hook(base, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{pre_hook} must return None or a tuple of (new_args, new_kwargs), got {result}")
            args, kwargs = result
    out = inner(*args, **kwargs)
    if after is not None:
        after()
    for post_hook in base._optimizer_step_post_hooks.values():
        post_hook(base, args, kwargs)
    return out


def replay_first(closure: Callable[[], Any], loss: Any) -> Callable[[], Any]:
    """A closure whose first call returns ``loss`` (already computed) and later calls re-evaluate."""
    calls = 0

    def replay() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return replay


class SLOHandle(LimiterReadouts):
    """Returned by :func:`attach`: read-outs of the limiter (as on ``SLOptimizer``) and ``remove()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, limiter: SpeedLimiter) -> None:
        self.optimizer = optimizer
        self.limiter = limiter
        self._skipped = False
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook)]
        if limiter.mode == "update":  # first of the post-hooks, so that the others see the rescaled step
            post = optimizer.register_step_post_hook(self._post_hook)
            post.hooks_dict_ref().move_to_end(post.id, last=False)
            self._handles.append(post)
        optimizer._slo_attached = True  # type: ignore[attr-defined]

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:  # step(None) and step(closure=None) mean no closure, as in torch
            raise RuntimeError(
                "attach() cannot speed-limit a step with a closure (the gradients do not exist yet when "
                "the hook runs); use SLOptimizer(optimizer, ...) instead"
            )
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        proceed = self.limiter.before_step(grad_scale, found_inf)
        self._skipped = not proceed
        if not proceed and (found_inf is None or not bool(found_inf)):
            self.limiter.skip_all_grads()  # non-finite gradient: make the step a no-op

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self._skipped:
            self.limiter.after_step()

    def remove(self) -> None:
        """Detach: the optimizer steps as before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.__dict__.pop("_slo_attached", None)


def attach(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None,
    speeds: SpeedSpec,
    mode: str = "auto",
    slo_eps: float = 0.0,
    per_tensor: bool = False,
    on_nonfinite: str = "skip",
    *,
    speed_unit: str = "frobenius",
) -> SLOHandle:
    """Speed-limit ``optimizer`` in place: ``g_l <- C_l g_l / (||g_l||_F + slo_eps)`` before each step.

    Same arguments and maths as :class:`SLOptimizer` (``mode="grad"`` rescales ``p.grad`` in place).
    A non-finite gradient sets every gradient to ``None`` so the step changes neither parameters nor
    (for ``torch.optim`` optimizers) their state.
    Closures are not supported. Returns a handle; ``handle.remove()`` restores plain steps.
    ``speed_unit`` sets the target step norm ``lr * C_l * u_l`` as in :class:`SLOptimizer`.
    """
    if isinstance(optimizer, SLOptimizer):
        raise ValueError("This optimizer is already an SLOptimizer; attach() to a plain optimizer only")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_slo_attached", False):
        raise ValueError("A speed limit is already attached to this optimizer; call handle.remove() first")
    if getattr(optimizer, "_slo_wrapped", False):
        raise ValueError(
            "This optimizer is wrapped by an SLOptimizer, which speed-limits it already; step the "
            "SLOptimizer, or attach() to a plain optimizer"
        )
    limiter = SpeedLimiter(optimizer, model, speeds, resolve_mode(mode, optimizer), slo_eps, per_tensor, on_nonfinite,
                           speed_unit)
    return SLOHandle(optimizer, limiter)
