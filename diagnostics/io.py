"""Saving and loading monitor snapshots as safetensors (no pickle).

Layout: tensors ``"<kind>/<layer>"`` with kind in ``K``, ``W``, ``W0``, ``nfm``, ``agop`` (weights in
``(k, d)`` layout; a block ``"<layer>[<label>]"`` of a monitor's ``blocks`` has its own rows of ``W`` and
``W0`` and its diagonal block of ``K``); string metadata ``format``, ``step``, ``layers`` (JSON list of
the record names), ``estimator``, ``m``,
``correlation``, ``agop_power`` and ``records`` (JSON list of every row of the monitor's history).
The file is written to a temporary file in the target directory and moved into place with
``os.replace``, so readers never see a partial file; it gets the mode of any new file under the
user's umask.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .files import atomic_write
from .nfa import NORM_KEYS
from .sharded import full_weight

if TYPE_CHECKING:
    from .monitor import LayerRecord, NFAMonitor

__all__ = ["Snapshot", "save_snapshot", "load_snapshot"]

FORMAT = "nfa-snapshot/1"


@dataclass
class Snapshot:
    """A loaded snapshot: metadata, ``matrices[layer][kind]`` and the records."""

    step: int | None
    layers: list[str]
    estimator: str | None
    m: int | None
    correlation: str
    agop_power: float
    matrices: dict[str, dict[str, Tensor]]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def records(self) -> dict[str, "LayerRecord"]:
        """The records of the saved step as :class:`LayerRecord` objects (with ``K``/``nfm``/``agop``)."""
        from .monitor import LayerRecord

        out = {}
        for row in self.rows:
            if row["step"] != self.step:
                continue
            mats = self.matrices.get(row["layer"], {})
            scalars = {k: v for k, v in row.items() if k not in NORM_KEYS}
            out[row["layer"]] = LayerRecord(
                **scalars,
                norms={k: row[k] for k in NORM_KEYS if k in row},
                K=mats.get("K"),
                nfm=mats.get("nfm"),
                agop=mats.get("agop"),
            )
        return out


def save_snapshot(monitor: "NFAMonitor", path: str | os.PathLike, write: bool = True) -> None:
    """Write ``monitor``'s latest measurement and its whole history of records to ``path``.

    Sharded (``DTensor``) weights are gathered one layer at a time; ``write=False`` only takes part
    in those gathers (the other ranks of an FSDP2 model)."""
    tensors: dict[str, Tensor] = {}
    latest = monitor.history[-1] if monitor.history else {}
    names = []
    for layer, adapter in monitor.adapters.items():
        # sharded (FSDP2) weights: gathered one layer at a time, on every rank
        W, W0 = full_weight(adapter.weight_matrix().detach()), full_weight(monitor.W0[layer])
        if not write:
            continue
        for name, rows in [(layer, slice(None)), *monitor.blocks.get(layer, [])]:  # the layer, then its blocks
            names.append(name)
            mats = {"W": W[rows], "W0": W0[rows]}
            if name in monitor.last_K:
                mats["K"] = monitor.last_K[name]
            rec = latest.get(name)
            if rec is not None and rec.nfm is not None:
                mats["nfm"], mats["agop"] = rec.nfm, rec.agop
            for kind, t in mats.items():
                tensors[f"{kind}/{name}"] = t.detach().cpu().contiguous().clone()
    if not write:
        return
    first = next(iter(latest.values()), None)
    metadata = {
        "format": FORMAT,
        "step": json.dumps(first.step if first else None),
        "layers": json.dumps(names),
        "estimator": json.dumps(first.estimator if first else None),
        "m": json.dumps(first.m if first else None),
        "correlation": monitor.correlation,
        "agop_power": json.dumps(monitor.agop_power),
        "records": json.dumps(monitor.to_rows()),
    }
    atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=metadata))


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Read a file written by ``NFAMonitor.save`` (safetensors + JSON metadata, no pickle)."""
    path = os.fspath(path)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an NFA snapshot (metadata format={meta.get('format')!r})")
    matrices: dict[str, dict[str, Tensor]] = {}
    for key, t in load_file(path).items():
        kind, _, layer = key.partition("/")
        matrices.setdefault(layer, {})[kind] = t
    return Snapshot(
        step=json.loads(meta["step"]),
        layers=json.loads(meta["layers"]),
        estimator=json.loads(meta["estimator"]),
        m=json.loads(meta["m"]),
        correlation=meta["correlation"],
        agop_power=json.loads(meta["agop_power"]),
        matrices=matrices,
        rows=json.loads(meta["records"]),
    )
