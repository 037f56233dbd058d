"""Saving and loading snapshots (:class:`Snapshot`, plain data) as safetensors (no pickle).

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
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .files import atomic_write
from .nfa import NORM_KEYS
from .records import LayerRecord

__all__ = ["Snapshot", "write_snapshot", "load_snapshot"]

FORMAT = "nfa-snapshot/1"


@dataclass
class Snapshot:
    """A snapshot as plain data: metadata, ``matrices[layer][kind]`` (``layer`` in ``layers`` order) and the
    record ``rows`` of every measurement (what :func:`write_snapshot` writes and :func:`load_snapshot` reads)."""

    step: int | None
    layers: list[str]
    estimator: str | None
    m: int | None
    correlation: str
    agop_power: float
    matrices: dict[str, dict[str, Tensor]]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def records(self) -> dict[str, LayerRecord]:
        """The records of the saved step as :class:`LayerRecord` objects (with ``K``/``nfm``/``agop``)."""
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


def write_snapshot(path: str | os.PathLike, snapshot: Snapshot) -> None:
    """Write ``snapshot`` to ``path`` (safetensors + JSON metadata), atomically."""
    tensors = {
        f"{kind}/{layer}": t.detach().cpu().contiguous()
        for layer in snapshot.layers
        for kind, t in snapshot.matrices.get(layer, {}).items()
    }
    metadata = {
        "format": FORMAT,
        "step": json.dumps(snapshot.step),
        "layers": json.dumps(snapshot.layers),
        "estimator": json.dumps(snapshot.estimator),
        "m": json.dumps(snapshot.m),
        "correlation": snapshot.correlation,
        "agop_power": json.dumps(snapshot.agop_power),
        "records": json.dumps(snapshot.rows),
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
    fields = {key: _metadata_field(path, meta, key) for key in ("step", "layers", "estimator", "m", "agop_power", "records")}
    if "correlation" not in meta:
        raise ValueError(f"{path!r}: the snapshot metadata has no field 'correlation' (the file was edited or damaged)")
    return Snapshot(
        step=fields["step"],
        layers=fields["layers"],
        estimator=fields["estimator"],
        m=fields["m"],
        correlation=meta["correlation"],
        agop_power=fields["agop_power"],
        matrices=matrices,
        rows=fields["records"],
    )


def _metadata_field(path: str, meta: dict[str, str], key: str) -> Any:
    """The JSON value of the metadata field ``key`` of the snapshot at ``path``; a missing field or one that
    is not JSON raises ``ValueError`` naming the file and the field."""
    if key not in meta:
        raise ValueError(f"{path!r}: the snapshot metadata has no field {key!r} (the file was edited or damaged)")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path!r}: the snapshot metadata field {key!r} is not valid JSON ({err}); the file was edited or damaged"
        ) from None
