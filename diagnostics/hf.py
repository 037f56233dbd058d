"""NFA correlations inside a Hugging Face ``transformers.Trainer``, logged like any other metric.

:class:`NFACallback` measures, every ``every_n_steps`` optimizer steps, the UC-NFA
``rho(W^T W, W^T K W)`` and the C-NFA ``rho(dW^T dW, dW^T K dW)`` (``dW = W - W_0``, ``W_0`` = the
weights when training started) of the model's linear layers on a fixed probe, and puts them into the
Trainer's logs as ``nfa/uc/<layer>`` and ``nfa/c/<layer>``. From there they reach
``trainer.state.log_history`` (and ``trainer_state.json``), the console and every reporter enabled by
``report_to`` (TensorBoard, W&B, ...).

How the values get into the logs: ``Trainer.log`` appends a copy of the logs to ``log_history`` and
then calls every callback's ``on_log`` in the order of the Trainer's callback list. The callback
measures in ``on_step_end``, sets ``control.should_log`` so the Trainer logs at that step, and in
``on_log`` adds the values to both the ``logs`` dict (seen by the callbacks that run after it) and the
matching ``log_history`` entry. The Trainer registers the ``report_to`` reporters before the callbacks
passed to it, so ``NFACallback(...).add_to(trainer)`` puts the callback first (the reporters then
receive its values) and its console summary just before the Trainer's printer.

Distributed (DDP launched by ``accelerate``/``torchrun``): every rank measures its contiguous shard
of the probe and the ``K`` sums are all-reduced (one collective per measurement), so the values equal
one process on the whole probe (exactly with ``estimator="exact"``; with ``"sketch"`` each rank draws
its own random projections, an equally unbiased estimate). The cadence depends only on
``state.global_step``, so all ranks take part in every collective. Only the world-process-zero writes
files. A model sharded with FSDP2 (``fully_shard``) is measured like an unsharded one (see
:mod:`diagnostics.sharded`; the probe size must then be a multiple of the world size); the Trainer's
own ``fsdp`` option needs accelerators (on CPU it falls back to DDP or refuses).
``transformers`` is imported only by this module.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from .optional import install_hint

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
except ImportError as exc:
    raise ModuleNotFoundError(f"diagnostics.hf: {install_hint(exc.name or 'transformers')}", name=exc.name) from exc

from . import distributed
from .common import check_choice
from .probe import OutputFn, move_probe, probe_batch_size, split_probe
from .io import load_snapshot
from .monitor import NFAMonitor
from .output_layer import ESTIMATOR as ANALYTIC
from .settings import check_estimator

__all__ = ["NFACallback", "NFAConsoleSummary", "nfa_rows_from_log_history", "SNAPSHOT_DIR"]

#: Sub-directory of ``args.output_dir`` that receives the snapshots.
SNAPSHOT_DIR = "nfa"
_KINDS = {"uc": "uc_nfa", "c": "c_nfa"}


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


class NFACallback(TrainerCallback):
    """Log ``nfa/uc/<layer>`` and ``nfa/c/<layer>`` every ``every_n_steps`` optimizer steps (and at the
    last step) into the Trainer's logs.

    Args:
        probe: the fixed probe inputs, as accepted by the model (a tensor of ``input_ids`` ``(N, T)``,
            a dict such as ``{"input_ids": ..., "attention_mask": ...}``, or a tuple), batch first.
            Every real token is a sample and the outputs are the logits at every real position
            (positions where the probe's ``attention_mask`` is 0 are left out).
        every_n_steps: measurement cadence in optimizer steps (``state.global_step``).
        layers: ``None`` (every ``nn.Linear`` / GPT-2 ``Conv1D``) or module names / globs, e.g.
            ``"transformer.h.*.mlp.c_fc"``.
        estimator: ``"sketch"`` (``m`` random output projections, cheap for large vocabularies) or
            ``"exact"`` (one VJP per output).
        m: number of sketch projections.
        correlation: ``"pearson"`` (default) or ``"cosine"``.
        output_fn: maps the model output to the tensor ``f`` (default: ``.logits``).
        seed: seed of the sketch projections (combined with the step and the rank).
        save_snapshots: also write ``output_dir/nfa/step_<step>.safetensors`` (``K``, ``W``, ``W_0`` per
            layer and all records, see :func:`diagnostics.load_snapshot`) from world-process-zero; on
            ``resume_from_checkpoint`` the ``W_0`` of the latest snapshot is reused for the C-NFA.
        chunk_size: probe samples per forward pass (``None``: the engine's default).
        blocks: ``{layer name or glob: spec}``, also log each block of a layer's output rows as
            ``nfa/uc/<layer>[<label>]`` (e.g. ``{"transformer.h.*.attn.c_attn": ["q", "k", "v"]}``; see
            :class:`~diagnostics.NFAMonitor`).
        console_layers: globs of the layers whose values the console line (the Trainer's printer or
            progress bar) shows one by one; the others appear as one ``min/mean/max`` entry per kind
            (``None``, the default: every layer summarised; ``"*"``: every layer), leaving out the
            layers whose values are 1 by construction (``K`` is ``I`` or ``1 x 1``: the output layer).
            ``log_history`` and the reporters always get every layer.
        measure_at_start: also measure at step 0, before the first optimizer step of a run that does not
            resume (one more measurement). It goes to ``log_history`` as an entry ``{"epoch": 0.0, "step": 0,
            "nfa/...": ...}`` (and to the snapshots); the reporters see values from the first logging step on.

    Add it with :meth:`add_to` so the ``report_to`` reporters receive its values (``Trainer(callbacks=
    [...])`` runs it after them, which is refused when there are any).

    The :class:`~diagnostics.NFAMonitor` of the current run is ``callback.monitor`` (its
    ``history`` / ``to_rows()`` hold every measurement).
    """

    def __init__(
        self,
        probe: Any,
        every_n_steps: int = 100,
        layers: str | Sequence[str] | None = None,
        estimator: str = "sketch",
        m: int = 8,
        *,
        correlation: str = "pearson",
        output_fn: OutputFn | None = None,
        seed: int = 0,
        save_snapshots: bool = False,
        chunk_size: int | None = None,
        blocks: Mapping[str, Any] | None = None,
        console_layers: str | Sequence[str] | None = None,
        measure_at_start: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        check_estimator(estimator, m)
        check_choice("correlation", correlation, ("pearson", "cosine"))
        if output_fn is not None and not callable(output_fn):
            raise TypeError("output_fn must be a callable mapping the model output to a tensor, or None")
        n = probe_batch_size(probe)  # also rejects probes that are not tensors / dicts / tuples
        if n < 1:
            raise ValueError("probe is empty: pass at least one sample (batch dimension first)")
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.estimator = estimator
        self.m = m
        self.correlation = correlation
        self.output_fn = output_fn
        self.seed = int(seed)
        self.save_snapshots = bool(save_snapshots)
        self.chunk_size = chunk_size
        self.blocks = blocks
        self.console_layers = [console_layers] if isinstance(console_layers, str) else list(console_layers or [])
        self.measure_at_start = bool(measure_at_start)
        self.monitor: NFAMonitor | None = None
        self._pending: dict[str, float] = {}
        #: Layers of the last measurement whose NFA is 1 by construction (``K = I`` analytically, or ``1 x 1``).
        self.constant_layers: set[str] = set()
        #: Set by :meth:`add_to`: the callback runs ahead of the ``report_to`` reporters.
        self.before_reporters = False

    def add_to(self, trainer: Any) -> None:
        """Put this callback first in ``trainer``'s callbacks, ahead of the ``report_to`` reporters (which
        then receive ``nfa/*``), and its :class:`NFAConsoleSummary` just before the Trainer's printer."""
        _put_first(trainer, self, NFAConsoleSummary(self))
        self.before_reporters = True

    def _snapshot_dir(self, args: TrainingArguments) -> str:
        return os.path.join(args.output_dir, SNAPSHOT_DIR)

    def _resumed_W0(self, args: TrainingArguments, state: TrainerState) -> dict[str, torch.Tensor] | None:
        """``W_0`` of the latest snapshot at or before the current step, when resuming."""
        if state.global_step == 0:
            return None
        files = sorted(glob.glob(os.path.join(self._snapshot_dir(args), "step_*.safetensors")))
        files = [f for f in files if int(os.path.basename(f)[5:-12]) <= state.global_step]
        if not files:
            warnings.warn(
                f"NFACallback: resuming at step {state.global_step} without an NFA snapshot in "
                f"{self._snapshot_dir(args)!r}; the C-NFA is measured against the weights at resume. "
                "Pass save_snapshots=True to keep W_0 across restarts.",
                stacklevel=3,
            )
            return None
        snap = load_snapshot(files[-1])
        return {layer: mats["W0"] for layer, mats in snap.matrices.items() if "W0" in mats}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Refuse to run after ``report_to`` reporters; start the monitor (``W_0`` snapshot) and, with
        ``measure_at_start`` on a run that starts at step 0, measure into ``log_history``."""
        if not self.before_reporters and _reporters(args):
            raise ValueError(
                f"NFACallback runs after the report_to reporters {_reporters(args)}, which would not receive "
                "nfa/*: add it with NFACallback(...).add_to(trainer) instead of Trainer(callbacks=[...])"
            )
        if model is None:
            raise ValueError(
                "NFACallback needs the model; use it with a transformers.Trainer (NFACallback(...).add_to(trainer))"
            )
        if self.monitor is not None and self.monitor.model is model:
            if not self.monitor.attached:
                self.monitor = NFAMonitor(model, self.layers, self.correlation, W0=self.monitor.W0, blocks=self.blocks)
        else:
            self.monitor = NFAMonitor(
                model, self.layers, self.correlation, W0=self._resumed_W0(args, state), blocks=self.blocks
            )
        if self.measure_at_start and state.global_step == 0:
            state.log_history.append({"epoch": 0.0, "step": 0, **self.measure(args, state, model)})

    def _due(self, state: TrainerState) -> bool:
        step = state.global_step
        return step > 0 and (step % self.every_n_steps == 0 or step == state.max_steps)

    def measure(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> dict[str, float]:
        """Measure now on this rank's shard of the probe (a collective under ``torch.distributed``)
        and return the scalars ``{"nfa/uc/<layer>": ..., "nfa/c/<layer>": ...}``."""
        if self.monitor is None:
            raise RuntimeError("NFACallback.measure() before on_train_begin: train with the Trainer first")
        start, stop = distributed.shard_bounds(probe_batch_size(self.probe))
        shard = split_probe(self.probe, start, stop)
        device = next(model.parameters()).device
        # On CUDA the projections (as large as the logits) are drawn on the device, not on the host.
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
        gen.manual_seed((self.seed * 1_000_003 + state.global_step) * 1_009 + _rank())
        records = self.monitor.measure(
            move_probe(shard, device), output_fn=self.output_fn, estimator=self.estimator, m=self.m,
            generator=gen, step=state.global_step, chunk_size=self.chunk_size,
        )
        if self.save_snapshots:  # every rank calls save (FSDP2 gathers weights); world-process-zero writes
            if state.is_world_process_zero:
                os.makedirs(self._snapshot_dir(args), exist_ok=True)
            self.monitor.save(os.path.join(self._snapshot_dir(args), f"step_{state.global_step:07d}.safetensors"))
        adapters = self.monitor.adapters
        self.constant_layers = {
            name for name, rec in records.items()
            if rec.estimator == ANALYTIC or (name in adapters and adapters[name].k == 1)
        }
        return {
            f"nfa/{kind}/{name}": float(getattr(rec, field))
            for kind, field in _KINDS.items()
            for name, rec in records.items()
        }

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        """At the cadence: measure (every rank) and ask the Trainer to log this step."""
        if self._due(state):
            self._pending = self.measure(args, state, model)
            control.should_log = True
        return control

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, float] | None = None, **kwargs: Any,
    ) -> None:
        """Add the pending values to ``logs`` (for the callbacks after this one) and to the
        ``log_history`` entry the Trainer appended just before."""
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Remove the monitor's hooks; ``self.monitor.history`` stays available."""
        if self.monitor is not None:
            self.monitor.detach()


def nfa_rows_from_log_history(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``{"step", "layer", "uc_nfa", "c_nfa"}`` (one per logged step and layer) from
    ``trainer.state.log_history`` or the ``"log_history"`` of a ``trainer_state.json``, ready for
    :func:`diagnostics.plots.plot_nfa_curves`."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for entry in log_history:
        for key, value in entry.items():
            parts = key.split("/", 2)
            if len(parts) == 3 and parts[0] == "nfa" and parts[1] in _KINDS:
                row = rows.setdefault((int(entry["step"]), parts[2]), {"step": int(entry["step"]), "layer": parts[2]})
                row[_KINDS[parts[1]]] = value
    return [rows[k] for k in sorted(rows, key=lambda k: k[0])]


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


class NFAConsoleSummary(TrainerCallback):
    """Put just before the console printer by :meth:`NFACallback.add_to`. ``on_log``: per kind, keeps the
    layers matching the owner's ``console_layers``, drops the other layers whose value is 1 by
    construction (``owner.constant_layers``) and replaces the rest by one ``min/mean/max`` entry (the
    reporters and ``log_history``, which run before it, get every layer)."""

    def __init__(self, owner: NFACallback) -> None:
        self.owner = owner

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        for kind in _KINDS:
            prefix = f"nfa/{kind}/"
            names = [k[len(prefix):] for k in logs if k.startswith(prefix)]
            shown = {n for n in names if any(fnmatchcase(n, p) for p in self.owner.console_layers)}
            for name in self.owner.constant_layers - shown:
                logs.pop(prefix + name, None)
            _summarise(logs, prefix, shown)


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
