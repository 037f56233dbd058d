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

from typing import Any, Collection, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .engine import for_each_chunk
from .hooks import LayerHooks
from .kernel import add_gram, covariance_from_sums, gram_scratch, zero_sums
from .layers import DEFAULT_MAX_K, check_layer_sizes, find_linear_layers
from .memory import check_memory, estimate_memory
from .output_layer import model_output_layers
from .probe import Chunk, OutputFn, SampleMask
from .settings import EstimatorSettings
from .vjps import VJPPlan, basis_cotangents, block_size, random_cotangents, vjp

__all__ = [
    "ptk_covariance",
    "ptk_sums",
    "ptk_sums_all_ranks",
    "grouped_sums",
    "layer_jacobians",
    "DEFAULT_SKETCH_SEED",
]

#: Seed of the sketch projections when no generator is given (the same call gives the same ``K``).
DEFAULT_SKETCH_SEED = 0


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



def _cotangent_blocks(
    chunk: Chunk, settings: EstimatorSettings, generator: torch.Generator
) -> Iterator[tuple[Tensor, float]]:
    """Blocks ``(v, scale)`` of cotangents (zero at padded positions) whose VJP Grams, times ``scale``, sum to
    ``K_unnorm``: output basis vectors (exact, scale 1) or ``m`` random vectors (sketch, scale ``1/m``)."""
    step = block_size(chunk)
    exact = settings.estimator == "exact"
    total = chunk.num_outputs if exact else settings.m
    for start in range(0, total, step):
        stop = min(total, start + step)
        if exact:
            v, scale = basis_cotangents(chunk.f, start, stop), 1.0
        else:
            v, scale = random_cotangents(chunk.f, stop - start, generator, settings.sketch), 1.0 / settings.m
        yield chunk.mask_cotangents(v), scale


def ptk_sums(
    model: nn.Module,
    hooks: LayerHooks,
    probe_inputs: Any,
    settings: EstimatorSettings | None = None,
    *,
    analytic_outputs: bool = False,
    max_k: int | None = None,
    measured: Collection[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Unnormalised ``K_unnorm`` per layer (float64 running sums; float32 on MPS) and the number of
    rows ``N`` per layer (real tokens only under a sample mask), on this process's probe, with the
    options of ``settings`` (default ``EstimatorSettings()``).

    With ``analytic_outputs=True`` a layer whose output is the model output ``f`` itself (see
    :mod:`diagnostics.output_layer`) gets no sum (``K = I`` exactly; only its rows are counted) and
    takes no part in the VJPs; the sums are allocated after the first forward pass, once those layers
    are known, and the other layers are then checked against ``max_k``. Layers missing from the
    returned sums but present in the counts are those; with no sample at all, the sums are empty.

    ``measured``: the layers that get sums and counts (default: all of ``hooks``); every layer of ``hooks``
    is recorded, so the chunks and the sketch vectors do not depend on which layers are measured."""
    if settings is None:
        settings = EstimatorSettings()
    if not isinstance(settings, EstimatorSettings):
        raise TypeError(f"settings must be an EstimatorSettings, e.g. EstimatorSettings(estimator='sketch', m=8), "
                        f"got {type(settings).__name__}")
    settings.check()
    adapters = hooks.adapters
    wanted = set(adapters if measured is None else measured)
    generator = _as_generator(settings.generator, next(iter(adapters.values())).weight_matrix().device)
    counts: dict[str, Any] = {name: 0 for name in adapters if name in wanted}  # ints, or 0-dim tensors under a mask
    sums: dict[str, Tensor] = {}
    bufs: dict[str, Tensor] = {}
    analytic: set[str] | None = None
    plan = VJPPlan(allow_unused=settings.allow_unused)

    def visit(chunk: Chunk) -> None:
        nonlocal analytic
        found = model_output_layers(chunk) if analytic_outputs else set()
        if analytic is None:  # first chunk: allocate for the layers that need K
            analytic = found
            rest = {n: a for n, a in adapters.items() if n not in analytic and n in wanted}
            check_layer_sizes(rest, max_k)
            sums.update(zero_sums(rest))
            bufs.update(gram_scratch(rest))
        elif found != analytic:
            raise ValueError(
                f"layers {sorted(found ^ analytic)} return the model output in some probe chunks but not "
                "in others; the model must compute its output the same way for every input"
            )
        names = [n for n, hs in chunk.outputs.items() if n in wanted for _ in hs]
        targets = [h for n, hs in chunk.outputs.items() if n in wanted for h in hs]
        keep = [chunk.row_mask(adapters[name], h) for name, h in zip(names, targets)]
        for name, h, rows in zip(names, targets, keep):
            counts[name] = counts[name] + (adapters[name].out_rows(h).shape[0] if rows is None else rows.sum())
        summed = [i for i, n in enumerate(names) if n not in analytic]
        names, targets, keep = ([seq[i] for i in summed] for seq in (names, targets, keep))
        if not targets:
            return
        plan.names = names
        for v, scale in _cotangent_blocks(chunk, settings, generator):
            for grads in vjp(chunk.f, targets, v, plan):
                for name, g, rows in zip(names, grads, keep):
                    add_gram(sums[name], bufs[name], adapters[name], g, scale, rows)

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
    *,
    process_group: Any = None,
    analytic_outputs: bool = False,
    max_k: int | None = None,
    measured: Collection[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """:func:`ptk_sums` on this rank's shard, summed over the ranks of ``process_group``.

    If this rank's measurement raises, it still joins the collective (flagging the failure, so the
    other ranks raise instead of waiting) and then re-raises its own error. Raises ``ValueError``
    when no rank had a sample."""
    try:
        sums, counts = ptk_sums(
            model, hooks, probe_inputs, settings, analytic_outputs=analytic_outputs, max_k=max_k, measured=measured
        )
    except Exception:
        if distributed.is_distributed(process_group):
            names = hooks.adapters if measured is None else measured
            distributed.all_reduce_sums({}, {n: 0 for n in names}, process_group, failed=True)
        raise
    adapters = hooks.adapters
    sums, counts = distributed.all_reduce_sums(
        sums, counts, process_group, zeros=lambda n: zero_sums({n: adapters[n]})[n]
    )
    if not any(counts.values()):
        raise ValueError("the probe has no samples: pass inputs with at least one sample (batch dimension first)")
    return sums, counts


def grouped_sums(
    model: nn.Module,
    hooks: LayerHooks,
    probe_inputs: Any,
    settings: EstimatorSettings,
    groups: Sequence[Sequence[str]],
    **options: Any,
) -> Iterator[tuple[dict[str, Tensor], dict[str, int]]]:
    """:func:`ptk_sums_all_ranks` (with ``options``) for each group of layers in turn, each with its own
    forward and VJP passes over the probe. Every pass records all layers of ``hooks`` and starts from the
    same state of ``settings.generator``, so each group sees the chunks and sketch vectors of a one-group
    measurement; the generator ends as after one pass."""
    generator = settings.generator
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    for group in groups:
        if state is not None:
            generator.set_state(state)
        yield ptk_sums_all_ranks(model, hooks, probe_inputs, settings, measured=group, **options)


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
    ``None`` for ``DEFAULT_SKETCH_SEED``: repeated calls then draw the same projections; one generator
    passed to every call draws independent ones; the global RNG state is left unchanged). A selected layer
    whose output the outputs ``f`` do not depend on is an error, unless ``allow_unused=True`` (its
    ``K`` is then 0); a layer called several times of which only some calls reach ``f`` is measured
    (the other calls' rows have zero gradient). Under ``torch.distributed`` every rank must call this with its own shard of the
    probe; the sums are all-reduced and the result equals one process on the whole probe.

    Padding: with a sample mask (the probe's ``attention_mask``, or ``sample_mask=`` a ``(B, T)`` 0/1
    tensor; ``sample_mask=False`` for none) only real tokens are samples (``N`` counts them) and outputs
    at padded positions are left out; outputs and layer outputs of shape ``(B, features)`` belong to
    the whole sequence.

    Layers with ``k`` or ``d`` above ``max_k`` are refused before any computation. With ``max_memory``
    (bytes) the layers are measured in the fewest groups that fit it (:func:`diagnostics.memory.layer_groups`,
    each group its own passes over the probe, the same ``K`` as one group); a layer that does not fit
    alone is refused; the returned ``K`` come on top of the budget.
    """
    adapters = find_linear_layers(model, layers)
    _, groups = check_memory(
        adapters, max_k, max_memory, summary=False, world_size=distributed.world_size(process_group)
    )
    settings = EstimatorSettings(estimator, m, generator, sketch, output_fn, chunk_size, allow_unused, sample_mask)
    out: dict[str, Tensor] = {}
    passes = grouped_sums(
        model, LayerHooks(adapters), probe_inputs, settings, groups, process_group=process_group
    )
    for sums, counts in passes:
        out.update({n: covariance_from_sums(sums, counts, n, adapters[n]) for n in list(sums)})
    return {n: out[n] for n in adapters if n in out}


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
