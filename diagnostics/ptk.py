"""PTK feature covariance ``K`` per layer (exact or sketched) and per-output layer Jacobians.

``K = (1/N) sum_alpha sum_c g_{alpha,c} g_{alpha,c}^T`` with ``g_{alpha,c} = df_c(x_alpha)/dh_l``,
``N`` the number of samples (rows: tokens for sequence models, positions for convolutions).

- exact: one vector-Jacobian product per output ``c`` (batched), with the basis vector ``e_c`` at
  every sample at once; the result's rows are the per-sample gradients ``G_c`` (N, k), and
  ``K_unnorm = sum_c G_c^T G_c``.
- sketch: ``m`` random cotangents ``v`` with the full shape of ``f`` (i.i.d. entries,
  ``E[v v^T] = I``); ``g = d(v.f)/dh`` gives the unbiased ``K_unnorm ~ (1/m) sum_j G_j^T G_j``.
  They come from the ``generator`` passed in, else from a private generator seeded with
  ``DEFAULT_SKETCH_SEED``; the global random number generators are never used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .common import accumulation_dtype
from .engine import (
    Chunk,
    LayerHooks,
    OutputFn,
    SampleMask,
    basis_cotangents,
    block_size,
    for_each_chunk,
    random_cotangents,
    VJPPlan,
    vjp,
)
from .layers import DEFAULT_MAX_K, LayerAdapter, check_layer_sizes, find_linear_layers, format_bytes
from .nfa import summary_memory
from .output_layer import model_output_layers
from .settings import ESTIMATORS, EstimatorSettings, check_estimator, legacy_settings

__all__ = [
    "ptk_covariance",
    "ptk_sums",
    "ptk_sums_all_ranks",
    "layer_jacobians",
    "ESTIMATORS",
    "EstimatorSettings",
    "check_estimator",
    "work_dtype",
    "covariance_from_sums",
    "measure_memory",
    "check_memory",
    "DEFAULT_SKETCH_SEED",
]

#: Entries of a k x k block Gram added to the float64 running sum at a time.
ADD_BLOCK = 1 << 20
#: Seed of the sketch projections when no generator is given (the same call gives the same ``K``).
DEFAULT_SKETCH_SEED = 0


def work_dtype(adapter: LayerAdapter) -> torch.dtype:
    """dtype of the returned ``K``: the weight's dtype, float32 for half precision."""
    dtype = adapter.weight_matrix().dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _as_generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator:
    """An int seed (``None``: ``DEFAULT_SKETCH_SEED``) becomes a private generator on ``device`` when
    that is a CUDA device (the sketch vectors, as large as the outputs, are then drawn where they are
    used), else on the CPU. The global generators are never drawn from."""
    if generator is None:
        generator = DEFAULT_SKETCH_SEED
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _add_gram(
    acc: Tensor, buf: Tensor, adapter: LayerAdapter, grads: Tensor, scale: float = 1.0, keep: Tensor | None = None
) -> None:
    """``acc += scale * sum_b G_b^T G_b`` for the gradient block ``grads`` (b, *h.shape), over the rows
    ``keep`` (bool, ``None``: all); the Gram is formed in ``buf``'s dtype (k x k scratch), the running
    sum ``acc`` may be wider."""
    rows = adapter.out_rows(grads, lead=1)
    if keep is not None:
        rows = rows[:, keep]
    rows = rows.reshape(-1, rows.shape[-1]).to(buf.dtype)
    torch.mm(rows.t(), rows, out=buf)
    if acc.dtype == buf.dtype:
        acc.add_(buf, alpha=scale)
        return
    step = max(1, ADD_BLOCK // buf.shape[1])  # a mixed-dtype add_ casts a full copy of buf (on CPU)
    for i in range(0, buf.shape[0], step):
        acc[i : i + step].add_(buf[i : i + step], alpha=scale)


def covariance_from_sums(sums: dict[str, Tensor], counts: dict[str, int], name: str, adapter: LayerAdapter) -> Tensor:
    """``K = K_unnorm / N`` of one layer in its working dtype; the running sum is taken out of ``sums``
    and divided in place, so the float64 sum is freed as soon as ``K`` exists."""
    return sums.pop(name).div_(max(counts[name], 1)).to(work_dtype(adapter))


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
                temps = summary_memory(a.k, a.d, item, agop_power, keep_matrices)
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


def _zero_sums(adapters: dict[str, LayerAdapter]) -> dict[str, Tensor]:
    """Zero ``k x k`` running sums per layer, on the layer's device, in the accumulation dtype."""
    with torch.inference_mode(False):  # accumulators are updated in place, also under inference_mode
        return {name: _zero_sum(a) for name, a in adapters.items()}


def _zero_sum(adapter: LayerAdapter) -> Tensor:
    device = adapter.weight_matrix().device
    return torch.zeros(adapter.k, adapter.k, dtype=accumulation_dtype(device), device=device)


#: The positional options of the former signatures of :func:`ptk_sums` and :func:`ptk_sums_all_ranks`.
_SUMS_ORDER = ("estimator", "m", "generator", "output_fn", "chunk_size", "sketch", "allow_unused", "sample_mask")
_ALL_RANKS_ORDER = (*_SUMS_ORDER[:6], "process_group", *_SUMS_ORDER[6:])


def ptk_sums(
    model: nn.Module,
    hooks: LayerHooks,
    probe_inputs: Any,
    settings: EstimatorSettings | None = None,
    *legacy_args: Any,
    analytic_outputs: bool = False,
    max_k: int | None = None,
    **legacy_options: Any,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Unnormalised ``K_unnorm`` per layer (float64 running sums; float32 on MPS) and the number of
    rows ``N`` per layer (real tokens only under a sample mask), on this process's probe, with the
    options of ``settings`` (default ``EstimatorSettings()``; passing them one by one is deprecated).

    With ``analytic_outputs=True`` a layer whose output is the model output ``f`` itself (see
    :mod:`diagnostics.output_layer`) gets no sum (``K = I`` exactly; only its rows are counted) and
    takes no part in the VJPs; the sums are allocated after the first forward pass, once those layers
    are known, and the other layers are then checked against ``max_k``. Layers missing from the
    returned sums but present in the counts are those; with no sample at all, the sums are empty."""
    settings, _ = legacy_settings("ptk_sums", settings, legacy_args, legacy_options, _SUMS_ORDER)
    settings.check()
    estimator, m = settings.estimator, settings.m
    adapters = hooks.adapters
    generator = _as_generator(settings.generator, next(iter(adapters.values())).weight_matrix().device)
    counts: dict[str, Any] = {name: 0 for name in adapters}  # ints, or 0-dim tensors under a mask (one sync)
    sums: dict[str, Tensor] = {}
    bufs: dict[str, Tensor] = {}
    analytic: set[str] | None = None
    plan = VJPPlan(allow_unused=settings.allow_unused)

    def visit(chunk: Chunk) -> None:
        nonlocal analytic
        found = model_output_layers(chunk) if analytic_outputs else set()
        if analytic is None:  # first chunk: allocate for the layers that need K
            analytic = found
            rest = {n: a for n, a in adapters.items() if n not in analytic}
            check_layer_sizes(rest, max_k)
            sums.update(_zero_sums(rest))
            scratch: dict[tuple, Tensor] = {}  # per-block Gram scratch, one per (k, dtype, device)
            with torch.inference_mode(False):
                for n, a in rest.items():
                    key = (a.k, work_dtype(a), sums[n].device)
                    if key not in scratch:
                        scratch[key] = torch.empty(a.k, a.k, dtype=key[1], device=key[2])
                    bufs[n] = scratch[key]
        elif found != analytic:
            raise ValueError(
                f"layers {sorted(found ^ analytic)} return the model output in some probe chunks but not "
                "in others; the model must compute its output the same way for every input"
            )
        names = [n for n, hs in chunk.outputs.items() for _ in hs]
        targets = [h for hs in chunk.outputs.values() for h in hs]
        keep = [chunk.row_mask(adapters[name], h) for name, h in zip(names, targets)]
        for name, h, rows in zip(names, targets, keep):
            counts[name] = counts[name] + (adapters[name].out_rows(h).shape[0] if rows is None else rows.sum())
        measured = [i for i, n in enumerate(names) if n not in analytic]
        names, targets, keep = ([seq[i] for i in measured] for seq in (names, targets, keep))
        if not targets:
            return
        plan.names = names
        step = block_size(chunk)
        total = chunk.num_outputs if estimator == "exact" else m
        for start in range(0, total, step):
            stop = min(total, start + step)
            if estimator == "exact":
                v = basis_cotangents(chunk.f, start, stop)
                scale = 1.0
            else:
                v = random_cotangents(chunk.f, stop - start, generator, settings.sketch)
                scale = 1.0 / m
            v = chunk.mask_cotangents(v)
            for grads in vjp(chunk.f, targets, v, plan):
                for name, g, rows in zip(names, grads, keep):
                    _add_gram(sums[name], bufs[name], adapters[name], g, scale, rows)

    for_each_chunk(
        model, hooks, probe_inputs, visit, output_fn=settings.output_fn, chunk_size=settings.chunk_size,
        sample_mask=settings.sample_mask,
    )
    return sums, {name: int(c) for name, c in counts.items()}


def ptk_sums_all_ranks(
    model: nn.Module,
    hooks: LayerHooks,
    probe_inputs: Any,
    settings: EstimatorSettings | None = None,
    *legacy_args: Any,
    process_group: Any = None,
    analytic_outputs: bool = False,
    max_k: int | None = None,
    **legacy_options: Any,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """:func:`ptk_sums` on this rank's shard, summed over the ranks of ``process_group``.

    If this rank's measurement raises, it still joins the collective (flagging the failure, so the
    other ranks raise instead of waiting) and then re-raises its own error. Raises ``ValueError``
    when no rank had a sample."""
    settings, rest = legacy_settings("ptk_sums_all_ranks", settings, legacy_args, legacy_options, _ALL_RANKS_ORDER)
    process_group = rest.get("process_group", process_group)
    try:
        sums, counts = ptk_sums(
            model, hooks, probe_inputs, settings, analytic_outputs=analytic_outputs, max_k=max_k
        )
    except Exception:
        if distributed.is_distributed(process_group):
            distributed.all_reduce_sums({}, {n: 0 for n in hooks.adapters}, process_group, failed=True)
        raise
    adapters = hooks.adapters
    sums, counts = distributed.all_reduce_sums(
        sums, counts, process_group, zeros=lambda n: _zero_sums({n: adapters[n]})[n]
    )
    if not any(counts.values()):
        raise ValueError("the probe has no samples: pass inputs with at least one sample (batch dimension first)")
    return sums, counts


def ptk_covariance(
    model: nn.Module,
    probe_inputs: Any,
    layers: str | Sequence[str] | None = None,
    estimator: str = "exact",
    m: int = 8,
    generator: torch.Generator | int | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    *,
    sketch: str = "rademacher",
    max_k: int | None = DEFAULT_MAX_K,
    process_group: Any = None,
    allow_unused: bool = False,
    sample_mask: SampleMask = None,
    max_memory: int | None = None,
) -> dict[str, Tensor]:
    """PTK feature covariance per layer, ``K = (1/N) sum_alpha sum_c g_{alpha,c} g_{alpha,c}^T``
    with ``g_{alpha,c} = df_c(x_alpha)/dh_l`` (k x k, divided by the number of samples/tokens ``N``).

    ``estimator="exact"`` uses one VJP per output; ``"sketch"`` uses ``m`` random projections of the
    outputs (``sketch="rademacher"`` or ``"gaussian"``, drawn from ``generator``, an int seed, or
    ``None`` for ``DEFAULT_SKETCH_SEED``; the global RNG state is left unchanged). A selected layer
    whose output the outputs ``f`` do not depend on is an error, unless ``allow_unused=True`` (its
    ``K`` is then 0). Under ``torch.distributed`` every rank must call this with its own shard of the
    probe; the sums are all-reduced and the result equals one process on the whole probe.

    Padding: with a sample mask (the probe's ``attention_mask``, or ``sample_mask=`` a ``(B, T)`` 0/1
    tensor; ``sample_mask=False`` for none) only real tokens are samples (``N`` counts them) and outputs
    at padded positions are left out; outputs and layer outputs of shape ``(B, features)`` belong to
    the whole sequence.

    Layers with ``k`` or ``d`` above ``max_k``, or a :func:`measure_memory` total above ``max_memory``
    bytes, are refused before any computation.
    """
    adapters = find_linear_layers(model, layers)
    check_memory(
        adapters, max_k, max_memory, summary=False, world_size=distributed.world_size(process_group)
    )
    settings = EstimatorSettings(estimator, m, generator, sketch, output_fn, chunk_size, allow_unused, sample_mask)
    sums, counts = ptk_sums_all_ranks(model, LayerHooks(adapters), probe_inputs, settings, process_group=process_group)
    return {n: covariance_from_sums(sums, counts, n, adapters[n]) for n in list(sums)}


def layer_jacobians(
    model: nn.Module,
    inputs: Any,
    layers: str | Sequence[str] | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    *,
    sample_mask: SampleMask = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Exact per-(sample, output) gradients: ``{name: (X, G)}`` with ``X`` (N, d) the layer inputs
    ``x_l`` (one row per sample/token) and ``G`` (C, N, k), ``G[c, alpha] = df_c(x_alpha)/dh_l``
    (``C`` = outputs per sample, e.g. positions*vocab). ``K_unnorm = sum_c G[c]^T G[c]``. Under a
    sample mask (see :func:`ptk_covariance`) the rows are the real tokens and ``G`` is zero for
    outputs at padded positions."""
    adapters = find_linear_layers(model, layers)
    hooks = LayerHooks(adapters)
    xs: dict[str, list[Tensor]] = {n: [] for n in adapters}
    gs: dict[str, list[Tensor]] = {n: [] for n in adapters}
    plan = VJPPlan()

    def visit(chunk: Chunk) -> None:
        names = [n for n, hs in chunk.outputs.items() for _ in hs]
        targets = [h for hs in chunk.outputs.values() for h in hs]
        plan.names = names
        keep = [chunk.row_mask(adapters[name], h) for name, h in zip(names, targets)]
        inputs_ = [x for xl in chunk.inputs.values() for x in xl]  # same order as targets
        for name, x, rows in zip(names, inputs_, keep):
            x = adapters[name].in_rows(x)
            xs[name].append(x if rows is None else x[rows])
        step = block_size(chunk)
        blocks: list[list[Tensor]] = [[] for _ in targets]
        for start in range(0, chunk.num_outputs, step):
            v = chunk.mask_cotangents(basis_cotangents(chunk.f, start, min(chunk.num_outputs, start + step)))
            for grads in vjp(chunk.f, targets, v, plan):
                for i, g in enumerate(grads):
                    g = adapters[names[i]].out_rows(g, lead=1).detach()
                    blocks[i].append(g if keep[i] is None else g[:, keep[i]])
        for name, parts in zip(names, blocks):
            gs[name].append(torch.cat(parts, dim=0))

    for_each_chunk(
        model, hooks, inputs, visit, output_fn=output_fn, chunk_size=chunk_size, keep_inputs=True,
        sample_mask=sample_mask,
    )
    return {n: (torch.cat(xs[n], dim=0), torch.cat(gs[n], dim=1)) for n in adapters}
