"""``NFAMonitor``: per-layer NFA correlations of a model over training.

The monitor snapshots ``W_0`` when it is created, registers forward hooks on the selected layers only
while ``measure()`` runs (so training, compiled or not, never sees them), and on each ``measure()`` computes ``K`` with the engine
(:mod:`diagnostics.ptk`) and the NFA quantities with :mod:`diagnostics.nfa`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .blocks import BlockSpec, resolve_blocks
from .common import check_choice
from .correlation import CORRELATIONS
from .hooks import LayerHooks
from .io import Snapshot, write_snapshot
from .kernel import covariance_from_sums, work_dtype
from .layers import DEFAULT_MAX_K, LayerAdapter, find_linear_layers
from .memory import check_memory
from .nfa import nfa_summary
from .output_layer import ESTIMATOR as ANALYTIC, output_layer_memory, output_layer_summary
from .probe import OutputFn
from .ptk import grouped_sums
from .records import LayerRecord
from .settings import EstimatorSettings
from .sharded import check_lockstep, check_supported, full_weight, is_sharded

__all__ = ["NFAMonitor"]



def _initial_weights(W0: Any, monitor: "NFAMonitor") -> dict[str, Tensor]:
    adapters = monitor.adapters
    if W0 is None:
        return {n: a.weight_matrix().detach().clone() for n, a in adapters.items()}
    # W0 is kept on each layer's device: a CPU W0 (e.g. from a snapshot) is not copied at every measure().
    if isinstance(W0, nn.Module):
        source = find_linear_layers(W0, list(adapters))
        return {n: source[n].weight_matrix().detach().to(a.weight_matrix().device).clone() for n, a in adapters.items()}
    if not isinstance(W0, Mapping):
        raise TypeError("W0 must be None, a dict {layer name: (k, d) tensor} or a model with the same layers")
    missing = [n for n in adapters if n not in W0]
    if missing:
        raise ValueError(f"W0 lacks layers {missing}; it must give a (k, d) weight for every monitored layer")
    out = {}
    for n, a in adapters.items():
        w = torch.as_tensor(W0[n]).detach()
        if tuple(w.shape) != (a.k, a.d):
            raise ValueError(
                f"W0[{n!r}] has shape {tuple(w.shape)}, expected (k, d) = {(a.k, a.d)} (out, in layout; "
                "transpose Conv1D weights)"
            )
        out[n] = w.to(a.weight_matrix().device).clone()
    return out


def _maybe_output_layer(adapter: LayerAdapter, max_k: int | None) -> bool:
    """Only ``k`` exceeds ``max_k``: fine if the layer returns the model output (checked at measure)."""
    return isinstance(max_k, int) and adapter.k > max_k >= adapter.d


class NFAMonitor:
    """Measure UC-NFA ``rho(W^T W, (W^T K W)^s)``, C-NFA ``rho(dW^T dW, (dW^T K dW)^s)``
    (``dW = W - W_0``), ``|dW|_F/|W|_F``, ``rho(W W^T, K)`` and the decomposition norms per layer.

    ``layers``: ``None`` (every ``nn.Linear``/``Conv1D``) or names/globs. ``correlation``:
    ``"pearson"`` or ``"cosine"``. ``agop_power``: ``s`` (1 or 0.5). ``W0``: initial weights (a dict of
    ``(k, d)`` tensors or a model with the same layers); default: snapshot at construction.
    ``blocks``: ``{layer name or glob: spec}`` adds one record ``"<layer>[<label>]"`` per block of the
    layer's output rows (see :func:`resolve_blocks`), with ``W_b`` the block's rows of ``W`` and ``K_bb``
    the matching diagonal block of the layer's ``K`` (``AGOP = W_b^T K_bb W_b``); no extra backward passes.
    A layer whose output is the model output itself (an LM head, a classifier readout) has ``K = I``
    exactly; it is recorded without forming ``K`` or any backward pass through it, so ``max_k`` only
    limits its ``d``. The model is not wrapped or modified (hooks exist only during ``measure()``);
    ``detach()`` or the end of a ``with`` block closes the monitor. A ``torch.compile``-d model is
    measured through its original modules in eager mode, under the eager layer names, without
    recompiling it.
    Under ``torch.distributed`` every rank must call ``measure()`` with its own probe shard. FSDP2
    (``fully_shard``) models are supported (see :mod:`diagnostics.sharded`), FSDP1 ones refused.
    Layers with ``k`` or ``d`` above ``max_k`` are refused up front. With ``max_memory`` (bytes) the layers
    are measured in the fewest groups of consecutive layers that fit it (``groups``; see
    :func:`diagnostics.memory.layer_groups`), each group with its own forward and VJP passes over the probe
    and the same sketch vectors, so the records equal those of one group; a layer that does not fit alone
    is refused (with ``keep_matrices=True``, whose NFA terms take more memory, at that ``measure()``). The
    kept results (``last_K``, the records' matrices) and the forward activations of one chunk come on top.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        correlation: str = "pearson",
        agop_power: float = 1.0,
        W0: Any = None,
        *,
        blocks: Mapping[str, BlockSpec] | None = None,
        max_k: int | None = DEFAULT_MAX_K,
        process_group: Any = None,
        max_memory: int | None = None,
    ) -> None:
        check_choice("correlation", correlation, CORRELATIONS)
        if not isinstance(agop_power, (int, float)) or not agop_power > 0 or math.isinf(agop_power):
            raise ValueError(f"agop_power must be a positive number (1 or 0.5), got {agop_power!r}")
        check_supported(model)
        self.model = model
        self.adapters = find_linear_layers(model, layers)
        self.blocks = resolve_blocks(self.adapters, blocks)
        self.max_k = max_k
        self.correlation = correlation
        self.agop_power = float(agop_power)
        self.process_group = process_group
        self.max_memory = max_memory
        #: Bytes of the k x k / d x d matrices one ``measure()`` allocates, per layer and ``"total"``
        #: (in one group, with ``keep_matrices=True``; see :func:`diagnostics.memory.estimate_memory`).
        self.memory_estimate, _ = self._plan(True, None)
        #: The layers measured together, one group after another (one group without ``max_memory``).
        self.groups = self._plan(False, max_memory)[1]
        self.W0 = _initial_weights(W0, self)
        self.history: list[dict[str, LayerRecord]] = []
        self.last_K: dict[str, Tensor] = {}
        self._hooks = LayerHooks(self.adapters)
        self._closed = False

    def _plan(self, keep_matrices: bool, max_memory: int | None) -> tuple[dict[str, int], list[list[str]]]:
        """:func:`diagnostics.memory.check_memory` of this monitor's layers: the estimate and the groups."""
        # A layer too wide for a k x k K (only k > max_k) may still be measured if it turns out to
        # return the model output (K = I, only d x d matrices); that is known at the first measure().
        wide = {n: a for n, a in self.adapters.items() if _maybe_output_layer(a, self.max_k) and n not in self.blocks}
        analytic = {
            n: output_layer_memory(a.k, a.d, work_dtype(a).itemsize, self.agop_power, keep_matrices)
            for n, a in wide.items()
        }
        return check_memory(
            {n: a for n, a in self.adapters.items() if n not in wide}, self.max_k, max_memory, analytic=analytic,
            keep_matrices=keep_matrices, agop_power=self.agop_power,
            world_size=distributed.world_size(self.process_group),
            blocks={n: [r.stop - r.start for _, r in parts] for n, parts in self.blocks.items()},
        )

    @property
    def layer_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def attached(self) -> bool:
        """False once ``detach()`` was called (then ``measure()`` raises)."""
        return not self._closed

    def measure(
        self,
        probe_inputs: Any,
        output_fn: OutputFn | None = None,
        estimator: str = "exact",
        m: int = 8,
        generator: torch.Generator | int | None = None,
        step: int | None = None,
        keep_matrices: bool = False,
        chunk_size: int | None = None,
        *,
        sketch: str = "rademacher",
        allow_unused: bool = False,
        sample_mask: Any = None,
    ) -> dict[str, LayerRecord]:
        """Compute ``K`` on the probe (current weights, eval mode, run eagerly even if the model is
        compiled, ``.grad`` and the global RNG state untouched) and one :class:`LayerRecord` per layer;
        appended to ``history``. ``step`` defaults to the number of earlier ``measure()`` calls. See
        :func:`diagnostics.ptk_covariance` for the estimators, the sketch seed, ``allow_unused`` and
        padding: with the probe's ``attention_mask`` (or ``sample_mask=``) only real tokens are samples.
        Sketch projections across measurements: with ``generator=None`` (or the same int seed) every
        measurement draws the same ones (``DEFAULT_SKETCH_SEED``); one ``torch.Generator`` passed to every
        call draws independent ones."""
        settings = EstimatorSettings(estimator, m, generator, sketch, output_fn, chunk_size, allow_unused, sample_mask)
        settings.check()
        if self._closed:
            raise RuntimeError("this NFAMonitor was detached; create a new one to measure again")
        if step is None:
            step = len(self.history)
        self.last_K = {}  # the previous K are not kept alive while the new ones are summed
        check_lockstep(self.model, probe_inputs, self.process_group)
        # with kept matrices the NFA terms take more memory: plan the groups again (a layer may not fit then)
        groups = self._plan(True, self.max_memory)[1] if keep_matrices and self.max_memory is not None else self.groups
        passes = grouped_sums(
            self.model, self._hooks, probe_inputs, settings, groups, process_group=self.process_group,
            analytic_outputs=True, max_k=self.max_k,
        )
        records: dict[str, LayerRecord] = {}
        for group, (sums, counts) in zip(groups, passes):
            for name in group:
                adapter = self.adapters[name]
                # FSDP2: one layer's full W (and W_0) at a time, gathered on every rank
                W = full_weight(adapter.weight_matrix().detach()).to(work_dtype(adapter))
                W0 = full_weight(self.W0[name])
                # not in sums: the layer's output is the model output, K = I (formed only if it fits max_k)
                K = covariance_from_sums(sums, counts, name, adapter) if name in sums else None
                records.update(self._layer_records(name, W, W0, K, settings, step, counts[name], keep_matrices))
        order = [r for name in self.adapters for r in (name, *(f for f, _ in self.blocks.get(name, [])))]
        records = {r: records[r] for r in order}
        self.history.append(records)
        return records

    def _layer_records(
        self, name: str, W: Tensor, W0: Tensor, K: Tensor | None, settings: EstimatorSettings, step: int, n: int,
        keep_matrices: bool,
    ) -> dict[str, LayerRecord]:
        """The records of layer ``name`` and of its blocks (``W_b``, ``W0_b``, ``K_bb``); ``K=None``: the
        layer's output is the model output, ``K = I`` (kept only if it fits ``max_k``)."""
        records = {}
        for rec_name, rows in [(name, slice(None)), *self.blocks.get(name, [])]:
            if K is None:
                summary = output_layer_summary(W[rows], W0[rows], self.correlation, self.agop_power, keep_matrices)
                size = W[rows].shape[0]
                K_b = torch.eye(size, dtype=W.dtype, device=W.device) if size <= (self.max_k or DEFAULT_MAX_K) else None
                how, m_used = ANALYTIC, None
            else:
                K_b = K if rows == slice(None) else K[rows, rows].contiguous()
                summary = nfa_summary(W[rows], W0[rows], K_b, self.correlation, self.agop_power, keep_matrices)
                how, m_used = settings.estimator, settings.m if settings.estimator == "sketch" else None
            if K_b is not None:
                self.last_K[rec_name] = K_b
            records[rec_name] = self._record(rec_name, step, summary, how, m_used, n, K_b, keep_matrices)
        return records

    def _record(
        self, name: str, step: int, summary: dict[str, Any], estimator: str, m: int | None, n: int,
        K: Tensor | None, keep_matrices: bool,
    ) -> LayerRecord:
        return LayerRecord(
            layer=name,
            step=int(step),
            uc_nfa=summary["uc_nfa"],
            c_nfa=summary["c_nfa"],
            rel_change=summary["rel_change"],
            kernel_alignment=summary["kernel_alignment"],
            estimator=estimator,
            m=m,
            n_samples=n,
            correlation=self.correlation,
            agop_power=self.agop_power,
            norms=summary["norms"],
            K=K if keep_matrices else None,
            nfm=summary["nfm"] if keep_matrices else None,
            agop=summary["agop"] if keep_matrices else None,
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat dicts, one per (measurement, layer), for CSV/JSON/loggers."""
        return [rec.to_row() for records in self.history for rec in records.values()]

    def snapshot(self) -> Snapshot:
        """The latest measurement (``K``, ``W``, ``W_0`` per layer and block, and the kept NFM/AGOP) and all
        records as a :class:`~diagnostics.io.Snapshot` on the CPU. With FSDP-sharded weights it gathers
        them one layer at a time: every rank must call it."""
        latest = self.history[-1] if self.history else {}
        matrices: dict[str, dict[str, Tensor]] = {}
        for layer, W, W0 in self._full_weights():
            for name, rows in [(layer, slice(None)), *self.blocks.get(layer, [])]:  # the layer, then its blocks
                mats = {"W": W[rows], "W0": W0[rows]}
                if name in self.last_K:
                    mats["K"] = self.last_K[name]
                rec = latest.get(name)
                if rec is not None and rec.nfm is not None:
                    mats["nfm"], mats["agop"] = rec.nfm, rec.agop
                matrices[name] = {kind: t.detach().cpu().contiguous().clone() for kind, t in mats.items()}
        first = next(iter(latest.values()), None)
        return Snapshot(
            step=first.step if first else None,
            layers=list(matrices),
            estimator=first.estimator if first else None,
            m=first.m if first else None,
            correlation=self.correlation,
            agop_power=self.agop_power,
            matrices=matrices,
            rows=self.to_rows(),
        )

    def _full_weights(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(layer, W, W_0)`` in full, one layer at a time (FSDP2: a gather on every rank)."""
        for layer, adapter in self.adapters.items():
            yield layer, full_weight(adapter.weight_matrix().detach()), full_weight(self.W0[layer])

    def save(self, path: str) -> None:
        """Write :meth:`snapshot` to one safetensors file, atomically (see :func:`diagnostics.load_snapshot`).
        Only rank 0 writes under ``torch.distributed``; with FSDP-sharded weights every rank must call it
        (the weights are gathered layer by layer)."""
        main = distributed.is_main_process(self.process_group)
        if main:
            write_snapshot(path, self.snapshot())
        elif is_sharded(self.model) and distributed.is_distributed(self.process_group):
            for _ in self._full_weights():  # take part in rank 0's gathers
                pass

    def detach(self) -> None:
        """Close the monitor (no hook is left on the model; it is exactly as before)."""
        self._hooks.detach()
        self._closed = True

    def __enter__(self) -> "NFAMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (
            f"NFAMonitor(layers={self.layer_names}, correlation={self.correlation!r}, "
            f"agop_power={self.agop_power}, measurements={len(self.history)}, attached={self.attached})"
        )
