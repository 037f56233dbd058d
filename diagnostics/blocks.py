"""Per-block records: a layer's output rows split into consecutive blocks (e.g. the q, k, v of a fused
projection), each measured with its rows ``W_b`` of ``W`` and the diagonal block ``K_bb`` of ``K``."""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence, Union

from .layers import LayerAdapter

__all__ = ["BlockSpec", "resolve_blocks"]

#: How a layer's output rows split into blocks: ``n`` equal blocks ``"0"``..``"n-1"``, a list of labels
#: (equal blocks), or ``{label: rows}`` (consecutive blocks of the given sizes).
BlockSpec = Union[int, Sequence[str], Mapping[str, int]]


def _block_sizes(name: str, k: int, spec: BlockSpec) -> list[tuple[str, int]]:
    """``[(label, rows)]`` of one layer's blocks, validated against its ``k`` output rows."""
    if isinstance(spec, bool) or not isinstance(spec, (int, Sequence, Mapping)) or isinstance(spec, str):
        raise TypeError(
            f"blocks for layer {name!r} must be an int, a list of labels or a dict {{label: rows}}, got {spec!r}"
        )
    if isinstance(spec, Mapping):
        sizes = list(spec.items())
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for _, r in sizes):
            raise ValueError(f"blocks for layer {name!r}: every block needs a positive int number of rows, got {spec!r}")
        if sum(r for _, r in sizes) != k:
            raise ValueError(
                f"blocks for layer {name!r} cover {sum(r for _, r in sizes)} rows but the layer has k={k} output rows"
            )
    else:
        labels = [str(i) for i in range(spec)] if isinstance(spec, int) else list(spec)
        if not labels:
            raise ValueError(f"blocks for layer {name!r}: pass at least one block, got {spec!r}")
        if k % len(labels):
            raise ValueError(
                f"layer {name!r} has k={k} output rows, which do not split into {len(labels)} equal blocks; "
                "pass {label: rows} for blocks of different sizes"
            )
        sizes = [(label, k // len(labels)) for label in labels]
    labels = [label for label, _ in sizes]
    if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"blocks for layer {name!r}: labels must be distinct non-empty strings, got {labels}")
    return sizes


def resolve_blocks(
    adapters: Mapping[str, LayerAdapter], blocks: Mapping[str, BlockSpec] | None
) -> dict[str, list[tuple[str, slice]]]:
    """``{layer: [(record name, rows), ...]}`` for ``blocks = {name or glob: spec}``: the output rows of
    each matched layer split into consecutive blocks named ``"<layer>[<label>]"`` (spec: ``n`` equal
    blocks labelled ``0``..``n-1``, a list of labels for equal blocks, or ``{label: rows}``)."""
    if blocks is None:
        return {}
    if not isinstance(blocks, Mapping):
        raise TypeError(f'blocks must be a dict {{layer name or glob: spec}}, e.g. {{"*.c_attn": ["q", "k", "v"]}}, got {blocks!r}')
    out: dict[str, list[tuple[str, slice]]] = {}
    owner: dict[str, str] = {}
    for pattern, spec in blocks.items():
        hits = [n for n in adapters if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"blocks pattern {pattern!r} matches no measured layer; measured layers: {list(adapters)}")
        for name in hits:
            if name in owner:
                raise ValueError(f"layer {name!r} matches the blocks patterns {owner[name]!r} and {pattern!r}; keep one")
            owner[name] = pattern
            start, parts = 0, []
            for label, rows in _block_sizes(name, adapters[name].k, spec):
                parts.append((f"{name}[{label}]", slice(start, start + rows)))
                start += rows
            out[name] = parts
    return out
