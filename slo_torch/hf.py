"""``transformers`` Trainer integration: log SLO's per-layer gradient norms.

    trainer = Trainer(model, args, ..., optimizer_cls_and_kwargs=(SLOptimizer, dict(
        base_optimizer=torch.optim.AdamW, model=model, speeds=promote(model, "layer", 10.0),
        lr=3e-4)))   # mode="auto": "update" for AdamW

    SLOCallback().add_to(trainer)

Logged at every logging step, averaged over the optimizer steps taken since the previous log
(a step skipped for a non-finite gradient or a GradScaler overflow adds nothing):
``slo/grad_norm/<layer>`` (``||g_l||_F`` before normalisation) and ``slo/nonfinite_steps``.
The Trainer calls each callback's ``on_log`` in the order of its callback list and registers the
``report_to`` reporters before the callbacks passed to it; :meth:`SLOCallback.add_to` puts the
callback first, so TensorBoard, W&B, ... receive its values, and its console summary just before
the Trainer's printer. The callback warns once if the Trainer clips gradients (``max_grad_norm > 0``)
while SLO runs in ``mode="grad"``: the per-layer normalisation undoes the common clipping factor.
``transformers`` is imported only here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
except ImportError as exc:
    raise ModuleNotFoundError(
        f"slo_torch.hf needs the optional package {exc.name or 'transformers'!r}; install it with: "
        'pip install "slo-torch[hf]"',
        name=exc.name,
    ) from exc

__all__ = ["SLOCallback", "find_slo", "ConsoleSummary"]


def find_slo(optimizer: Any) -> Any | None:
    """The object exposing ``last_grad_norms`` inside ``optimizer``.

    Unwraps accelerate's ``AcceleratedOptimizer`` (and similar wrappers) through ``.optimizer``;
    ``None`` when no SLOptimizer is found.
    """
    seen = 0
    while optimizer is not None and seen < 8:
        if hasattr(type(optimizer), "last_grad_norms") or "last_grad_norms" in getattr(optimizer, "__dict__", {}):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class SLOCallback(TrainerCallback):
    """Adds ``slo/grad_norm/<layer>`` and ``slo/nonfinite_steps`` to the Trainer's logs.

    Finds the :class:`~slo_torch.SLOptimizer` in the Trainer's optimizer, or uses ``source`` (an
    ``SLOptimizer`` or the handle returned by :func:`~slo_torch.attach`). Norms stay on the device
    between logs (one host transfer per log). Values are written into the ``logs`` of ``on_log`` and
    into ``state.log_history``; callbacks that report ``logs`` see them if they run after this one:
    add it with :meth:`add_to` (``Trainer(callbacks=[...])`` runs it after the ``report_to`` reporters,
    which is refused when there are any).

    The console line (the Trainer's printer or progress bar) keeps the per-layer norms of the layers
    matching ``console_layers`` (globs; default: the layers whose speed differs from the most common
    speed, e.g. the promoted one) and shows the others as one ``min/mean/max`` entry; ``log_history``
    and the reporters still get every layer. ``console_layers="*"`` prints every layer.
    """

    def __init__(
        self,
        source: Any | None = None,
        prefix: str = "slo/grad_norm/",
        console_layers: str | Sequence[str] | None = None,
    ) -> None:
        self.source = source
        self.prefix = prefix
        self.console_layers = [console_layers] if isinstance(console_layers, str) else console_layers
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._seen_steps: int | None = None  # taken_steps of the optimizer at the last on_step_end
        #: Set by :meth:`add_to`: the callback runs ahead of the ``report_to`` reporters.
        self.before_reporters = False

    def add_to(self, trainer: Any) -> None:
        """Put this callback first in ``trainer``'s callbacks, ahead of the ``report_to`` reporters (which
        then receive ``slo/*``), and its :class:`ConsoleSummary` just before the Trainer's printer."""
        _put_first(trainer, self, ConsoleSummary(self, self.prefix, self._shown))
        self.before_reporters = True

    def _slo(self, kwargs: dict[str, Any]) -> Any | None:
        return self.source if self.source is not None else find_slo(kwargs.get("optimizer"))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse to run after ``report_to`` reporters; warn once when ``max_grad_norm`` clipping meets
        grad-mode SLO."""
        if not self.before_reporters and _reporters(args):
            raise ValueError(
                f"SLOCallback runs after the report_to reporters {_reporters(args)}, which would not receive "
                "slo/*: add it with SLOCallback(...).add_to(trainer) instead of Trainer(callbacks=[...])"
            )
        slo = self._slo(kwargs)
        self._seen_steps = None if slo is None else slo.taken_steps
        if slo is not None and getattr(slo, "mode", None) == "grad" and (args.max_grad_norm or 0) > 0:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} clips the gradients before "
                "SLOptimizer normalises every speed-limited layer to norm C_l (mode='grad'), which undoes "
                "the clipping; pass max_grad_norm=0.0 to skip the wasted pass (slo/grad_norm/* then "
                "reports unclipped norms).",
                UserWarning,
                stacklevel=2,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Add the per-layer ``||g_l||`` of a step that was taken to the sums of the logging interval."""
        slo = self._slo(kwargs)
        if slo is None:
            return
        previous, self._seen_steps = self._seen_steps, slo.taken_steps
        if self._seen_steps == previous:  # skipped step: last_grad_norms still hold an earlier step's
            return
        norms = slo.last_grad_norms
        if not norms:
            return
        for name, value in norms.items():
            value = value.detach()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._count += 1

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Log the interval's mean ``||g_l||`` per layer and ``slo/nonfinite_steps`` (world process zero)."""
        slo = self._slo(kwargs)
        if slo is None or logs is None or (not self._count and "loss" not in logs):
            return
        extra: dict[str, float] = {}
        if self._count:
            names = list(self._sums)
            means = (torch.stack([v.float() for v in self._sums.values()]) / self._count).tolist()
            extra.update({f"{self.prefix}{name or '<root>'}": m for name, m in zip(names, means)})
        extra["slo/nonfinite_steps"] = float(slo.nonfinite_steps)
        self._sums, self._count = {}, 0
        if not state.is_world_process_zero:
            return
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def _shown(self, names: list[str], event_kwargs: dict[str, Any]) -> set[str]:
        """The layers the console line shows one by one (see :func:`_console_names`)."""
        return _console_names(self._slo(event_kwargs), self.console_layers, names)


#: ``shown(layer names, event kwargs)``: the layers a console line shows one by one.
ShownFn = Callable[[list[str], dict[str, Any]], "set[str]"]


class ConsoleSummary(TrainerCallback):
    """Put just before the console printer by ``owner`` (an :class:`SLOCallback`). ``on_log``: of the
    ``logs`` entries ``<prefix><name>``, keeps those whose name is in ``shown(names, event_kwargs)`` and
    replaces the others by one ``<prefix><n [other] layers> min/mean/max`` entry (the reporters and
    ``log_history``, which run before it, get every layer)."""

    def __init__(self, owner: TrainerCallback, prefix: str, shown: ShownFn) -> None:
        self.owner, self.prefix, self.shown = owner, prefix, shown

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        names = [k[len(self.prefix):] for k in logs or {} if k.startswith(self.prefix)]
        _summarise(logs, self.prefix, self.shown(names, kwargs))


def _console_names(slo: Any, patterns: Sequence[str] | None, names: Sequence[str]) -> set[str]:
    """Layers printed one by one: those matching ``patterns``, or whose speed differs from the most common one."""
    if patterns is not None:
        return {n for n in names if any(fnmatchcase(n, p) for p in patterns)}
    layer_speeds = getattr(slo, "layer_speeds", None) or {}
    values = list(layer_speeds.values())
    common = max(set(values), key=values.count) if values else None
    return {n for n in names if layer_speeds.get(n, common) != common}


def _summarise(logs: dict[str, Any] | None, prefix: str, shown: set[str]) -> None:
    """Replace the ``logs`` entries ``<prefix><name>`` with ``name`` not in ``shown`` (two or more) by
    ``<prefix><n [other] layers> min/mean/max`` = ``"min/mean/max"`` of their values (3 digits)."""
    rest = [k for k in logs or {} if k.startswith(prefix) and k[len(prefix):] not in shown]
    if len(rest) < 2:
        return
    values = [logs.pop(k) for k in rest]  # type: ignore[union-attr]
    layers = "other layers" if any(k.startswith(prefix) for k in logs) else "layers"  # type: ignore[union-attr]
    logs[f"{prefix}<{len(values)} {layers}> min/mean/max"] = (  # type: ignore[index]
        f"{min(values):.3g}/{sum(values) / len(values):.3g}/{max(values):.3g}")


def _reporters(args: TrainingArguments) -> list[str]:
    """The ``report_to`` integrations of ``args`` (``[]`` for ``"none"``)."""
    report_to = args.report_to or []
    return [r for r in ([report_to] if isinstance(report_to, str) else report_to) if r != "none"]


def _put_first(trainer: Any, callback: TrainerCallback, summary: TrainerCallback) -> None:
    """Move ``callback`` to the front of ``trainer.callback_handler.callbacks`` (the list the Trainer's
    events run through, in order) and, once per owner, insert ``summary`` just before the first console
    printer / progress bar (at the end when there is none)."""
    handler = getattr(trainer, "callback_handler", None)
    if not isinstance(getattr(handler, "callbacks", None), list):
        raise TypeError(f"add_to() needs a transformers.Trainer, got {type(trainer).__name__}")
    callbacks = handler.callbacks
    trainer.pop_callback(callback)
    callbacks.insert(0, callback)
    if any(getattr(c, "owner", None) is callback for c in callbacks):
        return
    printers = [i for i, c in enumerate(callbacks) if isinstance(c, (PrinterCallback, ProgressCallback))]
    callbacks.insert(printers[0] if printers else len(callbacks), summary)
