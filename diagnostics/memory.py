"""How much memory one measurement needs, checked before any computation (``max_k``, ``max_memory``), and
the groups of layers a memory budget splits a measurement into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import accumulation_dtype
from .kernel import ROW_BLOCK, packed_size, work_dtype
from .layers import DEFAULT_MAX_K, LayerAdapter, check_layer_sizes, format_bytes
from .nfa import summary_memory
from .vjps import VJP_BUDGET_BYTES

__all__ = ["estimate_memory", "check_memory", "layer_groups", "PASS_BYTES"]

#: Bytes of one chunk's passes counted in a ``max_memory`` budget: one block of batched VJP results
#: (cotangents and layer gradients, bounded by ``VJP_BUDGET_BYTES``).
PASS_BYTES = VJP_BUDGET_BYTES


@dataclass(frozen=True)
class _LayerCost:
    """Bytes one layer holds in each phase of a measurement."""

    acc: int  # packed running sum of K
    scratch_key: tuple
    scratch: int  # one band of the Gram, shared by layers of the same (k, dtype, device)
    cast: int  # the band cast to the sum's dtype when it is added
    convert: int  # the sum and the unpacked K together
    kept: int  # K (and kept blocks / NFA matrices) kept after the layer is summarised
    after: int  # K, its blocks and the NFA temporaries while the layer is summarised


def _layer_cost(
    a: LayerAdapter, summary: bool, keep_matrices: bool, agop_power: float, block_rows: list[int]
) -> _LayerCost:
    w = a.weight_matrix()
    dtype, acc_dtype = work_dtype(a), accumulation_dtype(w.device)
    item, acc_item = dtype.itemsize, acc_dtype.itemsize
    K_bytes = item * a.k * a.k
    acc = acc_item * packed_size(a.k)
    band = min(a.k, ROW_BLOCK) * a.k
    temps = 0
    if summary:
        temps = summary_memory(a.k, a.d, item, agop_power, keep_matrices, w.device)
        if w.dtype != dtype:  # W and W0 copied to the working dtype
            temps += 2 * item * a.k * a.d
    kept_nfa = 2 * item * a.d * a.d if summary and keep_matrices else 0  # nfm, agop per record
    block_bytes = item * sum(r * r for r in block_rows) + kept_nfa * len(block_rows)
    return _LayerCost(
        acc=acc,
        scratch_key=(a.k, dtype, w.device),
        scratch=item * band,
        cast=acc_item * band if dtype != acc_dtype else 0,
        convert=acc + K_bytes + acc_item * band,  # the packed sum, the new K and one divided band
        kept=K_bytes + block_bytes + kept_nfa,
        after=K_bytes + block_bytes + temps,  # temps include this record's kept nfm/agop
    )


def _peak(costs: list[_LayerCost], world_size: int, with_kept: bool = True) -> int:
    """Peak bytes of measuring the layers of ``costs`` in one group; ``with_kept=False`` leaves out the ``K``
    (and kept matrices) of layers already summarised, the results of the measurement."""
    if not costs:
        return 0
    acc = [c.acc for c in costs]
    scratch = {c.scratch_key: c.scratch for c in costs}
    sums_phase = sum(acc) * (2 if world_size > 1 else 1) + sum(scratch.values()) + max(c.cast for c in costs)
    # layer i is summarised while K (and kept matrices) of earlier layers and sums of later ones live
    layer_phase = max(
        with_kept * sum(c.kept for c in costs[:i]) + sum(acc[i + 1 :]) + max(costs[i].convert, costs[i].after)
        for i in range(len(costs))
    )
    return max(sums_phase, layer_phase)


def _costs(
    adapters: dict[str, LayerAdapter], summary: bool, keep_matrices: bool, agop_power: float,
    blocks: dict[str, list[int]] | None,
) -> dict[str, _LayerCost]:
    return {n: _layer_cost(a, summary, keep_matrices, agop_power, (blocks or {}).get(n, [])) for n, a in adapters.items()}


def estimate_memory(
    adapters: dict[str, LayerAdapter],
    *,
    summary: bool = True,
    keep_matrices: bool = False,
    agop_power: float = 1.0,
    world_size: int = 1,
    blocks: dict[str, list[int]] | None = None,
) -> dict[str, int]:
    """Bytes of the ``k x k`` / ``d x d`` matrices one measurement allocates: ``{layer: bytes}`` for each
    layer measured alone and ``"total"`` for all of them in one group (the peak over the measurement).

    Per layer: the float64 running sum of ``K``'s upper triangle (``8 k (k + 256) / 2`` bytes at most,
    :func:`diagnostics.kernel.packed_size`; 4 bytes per entry on MPS), one ``256 x k`` scratch per distinct
    size, ``K`` itself (``k²`` in the working dtype, kept in ``NFAMonitor.last_K``) and, with ``summary``
    (``NFAMonitor.measure``), the NFA terms of :func:`diagnostics.nfa.summary_memory`, formed one layer at
    a time (the weights of half-precision layers are copied to float32 there). Under
    ``torch.distributed`` (``world_size > 1``) the sums are briefly held twice by the all-reduce.
    ``blocks``: the row counts of each layer's blocks (``NFAMonitor(blocks=...)``), whose ``K_bb`` are kept too.
    The forward and backward passes over one chunk of the probe come on top (bounded by ``chunk_size``
    and ``VJP_BUDGET_BYTES`` per block of cotangents)."""
    costs = _costs(adapters, summary, keep_matrices, agop_power, blocks)
    out = {n: _peak([c], world_size) for n, c in costs.items()}
    out["total"] = _peak(list(costs.values()), world_size) if costs else 0
    return out


def layer_groups(
    adapters: dict[str, LayerAdapter],
    max_memory: int,
    *,
    analytic: dict[str, int] | None = None,
    summary: bool = True,
    keep_matrices: bool = False,
    agop_power: float = 1.0,
    world_size: int = 1,
    blocks: dict[str, list[int]] | None = None,
) -> tuple[list[list[str]], int]:
    """The fewest groups of consecutive layers whose measurements, one group after another (each its own
    forward and VJP passes), each fit ``max_memory`` bytes, and the working memory of the largest.

    A group fits when its working memory (its running sums, scratch, the ``K`` being formed and the NFA
    terms, as in :func:`estimate_memory`, without the ``K`` and matrices already kept as results) plus
    ``PASS_BYTES`` (one block of VJP results) is at most ``max_memory``. The kept ``K`` (``last_K``, the
    result of :func:`diagnostics.ptk_covariance`) and the forward activations of one chunk come on top.
    ``analytic``: bytes of layers whose ``K = I`` is not formed (:mod:`diagnostics.output_layer`); they
    join the last group. Raises ``ValueError`` naming a layer that does not fit in a group of its own."""
    costs = _costs(adapters, summary, keep_matrices, agop_power, blocks)
    extra = max((analytic or {}).values(), default=0)  # summarised one at a time, after the sums

    def need(names: list[str], last: bool) -> int:
        return max(_peak([costs[n] for n in names], world_size, with_kept=False), extra if last else 0)

    groups: list[list[str]] = []
    current: list[str] = []
    names = list(costs)
    for i, name in enumerate(names):
        last = i == len(names) - 1
        if need([*current, name], last) + PASS_BYTES <= max_memory:
            current.append(name)
            continue
        if current:
            groups.append(current)
        alone = need([name], last) + PASS_BYTES
        if alone > max_memory:
            raise ValueError(
                f"layer {name!r} ({adapters[name]!r}) alone needs about {format_bytes(alone)} (its k x k sums, "
                f"K and NFA terms and {format_bytes(PASS_BYTES)} of VJP results), more than "
                f"max_memory={max_memory} bytes ({format_bytes(max_memory)}). Exclude it with layers=[...] "
                "or raise max_memory"
            )
        current = [name]
    groups.append(current)  # empty only when no layer needs K
    if extra + PASS_BYTES > max_memory:
        raise ValueError(
            f"the output layers {sorted(analytic or {})} need about {format_bytes(extra + PASS_BYTES)}, more "
            f"than max_memory={max_memory} bytes ({format_bytes(max_memory)}); raise max_memory"
        )
    worst = max(need(g, i == len(groups) - 1) for i, g in enumerate(groups))
    groups[-1].extend(analytic or {})
    return groups, worst


def check_memory(
    adapters: dict[str, LayerAdapter],
    max_k: int | None = DEFAULT_MAX_K,
    max_memory: int | None = None,
    analytic: dict[str, int] | None = None,
    **estimate_options: Any,
) -> tuple[dict[str, int], list[list[str]]]:
    """The :func:`estimate_memory` estimate and the groups of layers to measure one after another, after
    refusing layers larger than ``max_k`` (see :func:`diagnostics.layers.check_layer_sizes`). Without
    ``max_memory`` (bytes) every layer is in one group; with it, :func:`layer_groups` (a layer that does
    not fit alone is refused) and ``"total"`` is the working memory of the largest group (without the
    kept results).
    ``analytic``: bytes of further layers whose ``K = I`` is not formed (:mod:`diagnostics.output_layer`),
    added to the estimate and its total, and not checked against ``max_k``."""
    estimate = estimate_memory(adapters, **estimate_options)
    check_layer_sizes(adapters, max_k, estimate)
    if max_memory is None:
        if analytic:
            estimate = {**analytic, **estimate, "total": estimate["total"] + sum(analytic.values())}
        return estimate, [[*adapters, *(analytic or {})]]
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    groups, total = layer_groups(adapters, max_memory, analytic=analytic, **estimate_options)
    return {**(analytic or {}), **estimate, "total": total}, groups
