"""How SLO treats the optimizer it limits: the mode for its class (``mode="auto"``), keyword checks, the base step."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .checks import check_choice

__all__ = ["MODES", "SLO_DEFAULTS", "resolve_mode", "deprecated_eps", "check_unambiguous", "base_step", "replay_first"]

MODES = ("auto", "grad", "update")
SLO_DEFAULTS = {"model": None, "speeds": None, "mode": "auto", "speed_unit": "frobenius", "slo_eps": 0.0,
                "per_tensor": False, "on_nonfinite": "skip"}
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
            UserWarning, stacklevel=4,
        )
    return mode


def deprecated_eps(eps: Any, slo_eps: float, message: str) -> Any:
    """``eps=``, the deprecated name of ``slo_eps``: warn with ``message`` (pointing at the caller's caller)
    and return it; ``TypeError`` if ``slo_eps`` was given too."""
    if slo_eps != SLO_DEFAULTS["slo_eps"]:
        raise TypeError("Pass slo_eps= only (eps= is its deprecated name); got both eps= and slo_eps=")
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    return eps


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


def base_step(base: torch.optim.Optimizer, closure: Callable[[], Any] | None) -> Any:
    """``base.step(closure)`` without the global step hooks, which the wrapper's step already ran.

    ``torch.optim.Optimizer`` wraps every ``step`` to run the global hooks, then the instance's; the
    wrapped function is called here with the base's own hooks around it, as torch's wrapper does.
    """
    step = type(base).step
    inner = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if inner is None:  # not torch's hook wrapper (a subclass replaced it): step as it says
        return base.step() if closure is None else base.step(closure)
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
