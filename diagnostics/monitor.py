"""``NFAMonitor``: per-layer NFA correlations of a model over training.

The monitor snapshots ``W_0`` when it is created, registers forward hooks on the selected layers only
while ``measure()`` runs (so training, compiled or not, never sees them), and on each ``measure()`` computes ``K`` with the engine
(:mod:`diagnostics.ptk`) and the NFA quantities with :mod:`diagnostics.nfa`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .engine import LayerHooks, OutputFn
from .layers import DEFAULT_MAX_K, check_layer_sizes, find_linear_layers
from .nfa import CORRELATIONS, nfa_summary
from .ptk import check_estimator, ptk_sums_all_ranks, work_dtype

__all__ = ["NFAMonitor", "LayerRecord"]


@dataclass
class LayerRecord:
    """One layer's measurement. ``K``, ``nfm``, ``agop`` are set only with ``keep_matrices=True``."""

    layer: str
    step: int
    uc_nfa: float
    c_nfa: float
    rel_change: float
    kernel_alignment: float
    estimator: str
    m: int | None
    n_samples: int
    correlation: str = "pearson"
    agop_power: float = 1.0
    norms: dict[str, float] = field(default_factory=dict)
    K: Tensor | None = None
    nfm: Tensor | None = None
    agop: Tensor | None = None

    def to_row(self) -> dict[str, Any]:
        """Flat dict of the scalar fields (decomposition norms as ``nfm_init`` ... keys)."""
        row = {
            "step": self.step,
            "layer": self.layer,
            "uc_nfa": self.uc_nfa,
            "c_nfa": self.c_nfa,
            "rel_change": self.rel_change,
            "kernel_alignment": self.kernel_alignment,
            "estimator": self.estimator,
            "m": self.m,
            "n_samples": self.n_samples,
            "correlation": self.correlation,
            "agop_power": self.agop_power,
        }
        row.update(self.norms)
        return row


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


class NFAMonitor:
    """Measure UC-NFA ``rho(W^T W, (W^T K W)^s)``, C-NFA ``rho(dW^T dW, (dW^T K dW)^s)``
    (``dW = W - W_0``), ``|dW|_F/|W|_F``, ``rho(W W^T, K)`` and the decomposition norms per layer.

    ``layers``: ``None`` (every ``nn.Linear``/``Conv1D``) or names/globs. ``correlation``:
    ``"pearson"`` or ``"cosine"``. ``agop_power``: ``s`` (1 or 0.5). ``W0``: initial weights (a dict of
    ``(k, d)`` tensors or a model with the same layers); default: snapshot at construction.
    The model is not wrapped or modified (hooks exist only during ``measure()``); ``detach()`` or the end
    of a ``with`` block closes the monitor. A ``torch.compile``-d model is measured through its original
    modules in eager mode, under the eager layer names, without recompiling it.
    Under ``torch.distributed`` every rank must call ``measure()`` with its own probe shard.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        correlation: str = "pearson",
        agop_power: float = 1.0,
        W0: Any = None,
        *,
        max_k: int | None = DEFAULT_MAX_K,
        process_group: Any = None,
    ) -> None:
        if correlation not in CORRELATIONS:
            raise ValueError(f"unknown correlation {correlation!r}; use 'pearson' or 'cosine'")
        if not isinstance(agop_power, (int, float)) or not agop_power > 0 or math.isinf(agop_power):
            raise ValueError(f"agop_power must be a positive number (1 or 0.5), got {agop_power!r}")
        self.model = model
        self.adapters = find_linear_layers(model, layers)
        check_layer_sizes(self.adapters, max_k)
        self.correlation = correlation
        self.agop_power = float(agop_power)
        self.process_group = process_group
        self.W0 = _initial_weights(W0, self)
        self.history: list[dict[str, LayerRecord]] = []
        self.last_K: dict[str, Tensor] = {}
        self._hooks = LayerHooks(self.adapters)
        self._closed = False

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
        padding: with the probe's ``attention_mask`` (or ``sample_mask=``) only real tokens are samples."""
        check_estimator(estimator, m)
        if self._closed:
            raise RuntimeError("this NFAMonitor was detached; create a new one to measure again")
        if step is None:
            step = len(self.history)
        sums, counts = ptk_sums_all_ranks(
            self.model, self._hooks, probe_inputs, estimator, m, generator, output_fn, chunk_size, sketch,
            self.process_group, allow_unused, sample_mask,
        )
        records: dict[str, LayerRecord] = {}
        self.last_K = {}
        for name, adapter in self.adapters.items():
            K = (sums[name] / max(counts[name], 1)).to(work_dtype(adapter))
            W = adapter.weight_matrix().detach().to(K.dtype)
            summary = nfa_summary(W, self.W0[name], K, self.correlation, self.agop_power)
            self.last_K[name] = K
            records[name] = LayerRecord(
                layer=name,
                step=int(step),
                uc_nfa=summary["uc_nfa"],
                c_nfa=summary["c_nfa"],
                rel_change=summary["rel_change"],
                kernel_alignment=summary["kernel_alignment"],
                estimator=estimator,
                m=m if estimator == "sketch" else None,
                n_samples=counts[name],
                correlation=self.correlation,
                agop_power=self.agop_power,
                norms=summary["norms"],
                K=K if keep_matrices else None,
                nfm=summary["nfm"] if keep_matrices else None,
                agop=summary["agop"] if keep_matrices else None,
            )
        self.history.append(records)
        return records

    def to_rows(self) -> list[dict[str, Any]]:
        """Flat dicts, one per (measurement, layer), for CSV/JSON/loggers."""
        return [rec.to_row() for records in self.history for rec in records.values()]

    def save(self, path: str) -> None:
        """Write the latest measurement (``K``, ``W``, ``W_0`` per layer and the kept NFM/AGOP) and
        all records to one safetensors file, atomically. Only rank 0 writes under ``torch.distributed``."""
        from .io import save_snapshot

        if distributed.is_main_process(self.process_group):
            save_snapshot(self, path)

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
