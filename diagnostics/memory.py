"""How much memory one measurement needs, checked before any computation (``max_k``, ``max_memory``)."""

from __future__ import annotations

from typing import Any

from .common import accumulation_dtype
from .kernel import ADD_BLOCK, work_dtype
from .layers import DEFAULT_MAX_K, LayerAdapter, check_layer_sizes, format_bytes
from .nfa import summary_memory

__all__ = ["measure_memory", "check_memory"]


def measure_memory(
    adapters: dict[str, LayerAdapter],
    *,
    summary: bool = True,
    keep_matrices: bool = False,
    agop_power: float = 1.0,
    world_size: int = 1,
    blocks: dict[str, list[int]] | None = None,
) -> dict[str, int]:
    """Bytes of the ``k x k`` / ``d x d`` matrices one measurement allocates: ``{layer: bytes}`` for each
    layer measured alone and ``"total"`` for all of them at once (the peak over the measurement).

    Per layer: the float64 running sum of ``K`` (``8k²``; 4 bytes on MPS), one ``k x k`` scratch per
    distinct size, ``K`` itself (``k²`` in the working dtype, kept in ``NFAMonitor.last_K``) and, with
    ``summary`` (``NFAMonitor.measure``), the NFA terms of :func:`diagnostics.nfa.summary_memory`,
    formed one layer at a time (the weights of half-precision layers are copied to float32 there).
    Under ``torch.distributed`` (``world_size > 1``) the sums are briefly held twice by the all-reduce.
    ``blocks``: the row counts of each layer's blocks (``NFAMonitor(blocks=...)``), whose ``K_bb`` are kept too.
    The forward and backward passes over one chunk of the probe come on top (bounded by ``chunk_size``
    and ``VJP_BUDGET_BYTES`` per block of cotangents)."""

    def sizes(names: list[str]) -> int:
        acc, kept_K, scratch, convert, after, cast = [], [], {}, [], [], [0]
        for n in names:
            a = adapters[n]
            w = a.weight_matrix()
            dtype, acc_dtype = work_dtype(a), accumulation_dtype(w.device)
            item, acc_item = dtype.itemsize, acc_dtype.itemsize
            K_bytes = item * a.k * a.k
            acc.append(acc_item * a.k * a.k)
            scratch[(a.k, dtype, w.device)] = K_bytes
            own = 0 if dtype == acc_dtype else K_bytes  # float64 K is the divided sum itself
            if dtype != acc_dtype:  # float64 copy of a block of the Gram when it is added to the sum
                cast.append(acc_item * min(a.k * a.k, a.k * max(1, ADD_BLOCK // a.k)))
            convert.append(acc[-1] + own)
            temps = 0
            if summary:
                temps = summary_memory(a.k, a.d, item, agop_power, keep_matrices, w.device)
                if w.dtype != dtype:  # W and W0 copied to the working dtype
                    temps += 2 * item * a.k * a.d
            sizes_b = (blocks or {}).get(n, [])
            kept_nfa = 2 * item * a.d * a.d if summary and keep_matrices else 0  # nfm, agop per record
            block_bytes = item * sum(r * r for r in sizes_b) + kept_nfa * len(sizes_b)
            kept_K.append(K_bytes + block_bytes + kept_nfa)
            after.append(K_bytes + block_bytes + temps)  # temps include this record's kept nfm/agop
        sums_phase = sum(acc) * (2 if world_size > 1 else 1) + sum(scratch.values()) + max(cast)
        # layer i is summarised while K (and kept matrices) of earlier layers and sums of later ones live
        layer_phase = max(
            sum(kept_K[:i]) + sum(acc[i + 1 :]) + max(convert[i], after[i]) for i in range(len(names))
        )
        return max(sums_phase, layer_phase)

    out = {n: sizes([n]) for n in adapters}
    out["total"] = sizes(list(adapters)) if adapters else 0
    return out


def check_memory(
    adapters: dict[str, LayerAdapter],
    max_k: int | None = DEFAULT_MAX_K,
    max_memory: int | None = None,
    analytic: dict[str, int] | None = None,
    **estimate_options: Any,
) -> dict[str, int]:
    """The :func:`measure_memory` estimate, after refusing layers larger than ``max_k`` (see
    :func:`diagnostics.layers.check_layer_sizes`) and a total above ``max_memory`` bytes (``None``: no limit).
    ``analytic``: bytes of further layers whose ``K = I`` is not formed (:mod:`diagnostics.output_layer`),
    added to the estimate and its total, and not checked against ``max_k``."""
    estimate = measure_memory(adapters, **estimate_options)
    check_layer_sizes(adapters, max_k, estimate)
    if analytic:
        estimate = {**analytic, **estimate, "total": estimate["total"] + sum(analytic.values())}
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
            raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        if estimate["total"] > max_memory:
            top = sorted((n for n in estimate if n != "total"), key=estimate.__getitem__, reverse=True)[:5]
            desc = ", ".join(f"{n!r} {format_bytes(estimate[n])}" for n in top)
            raise ValueError(
                f"measuring these layers needs about {format_bytes(estimate['total'])} of k x k / d x d "
                f"matrices, more than max_memory={max_memory} bytes ({format_bytes(max_memory)}; largest: "
                f"{desc}). Select fewer layers with layers=[...] or raise max_memory"
            )
    return estimate
