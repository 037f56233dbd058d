"""Running a model on a probe and recording its selected layers: the hooks (:mod:`diagnostics.hooks`), the
probe (:mod:`diagnostics.probe`) and the vector-Jacobian products (:mod:`diagnostics.vjps`) meet here.

The engine runs the model on a probe (in chunks of samples, in eval mode, with grad enabled),
records the output ``h`` of every selected layer through forward hooks, and hands each chunk to a
callback while its graph is alive, for ``v^T df/dh`` with cotangents ``v`` shaped like the model
output ``f``. It knows nothing of NFA: :mod:`diagnostics.ptk` turns these gradients into ``K``.

The probe always runs eagerly (compiled models and compiled submodules run their original Python
code, nothing is recompiled), and the global CPU and CUDA random number generators are restored
afterwards, so measuring never changes the run it observes.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .common import eval_mode
from .hooks import LayerHooks
from .probe import (
    Chunk,
    OutputFn,
    SampleMask,
    call_on_probe,
    describe_probe,
    map_probe,
    probe_batch_size,
    probe_tensors,
    resolve_output,
    resolve_sample_mask,
    split_probe,
)

__all__ = ["for_each_chunk", "CHUNK_BUDGET_BYTES", "FIRST_CHUNK_SAMPLES"]

#: Most samples per forward pass when ``chunk_size=None``.
DEFAULT_CHUNK_SIZE = 256
#: With ``chunk_size=None``: memory allowed for one chunk's outputs ``f`` plus the recorded outputs of
#: the selected layers (for an LM, ``tokens x (vocab + sum of layer widths)`` elements), after the
#: first chunk; a single sample is always allowed.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: With ``chunk_size=None``: samples in the first chunk, run before the size of the outputs is known.
FIRST_CHUNK_SAMPLES = 8


def _cuda_devices(model: nn.Module, inputs: Any) -> list[int]:
    tensors = [*model.parameters(), *model.buffers(), *probe_tensors(inputs)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


@contextmanager
def _measuring(model: nn.Module, inputs: Any) -> Iterator[None]:
    """Eval mode with grad enabled, compiled code run eagerly (``torch.compiler.set_stance("force_eager")``:
    no recompilation, and forward hooks run), and the global CPU/CUDA RNG states restored afterwards."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    with (
        torch.random.fork_rng(devices=_cuda_devices(model, inputs)),
        set_stance("force_eager") if set_stance is not None else nullcontext(),
        eval_mode(model),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


def for_each_chunk(
    model: nn.Module,
    hooks: LayerHooks,
    inputs: Any,
    fn: Callable[[Chunk], None],
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    keep_inputs: bool = False,
    sample_mask: SampleMask = None,
) -> None:
    """Run ``model`` on the probe in chunks of ``chunk_size`` samples (eval mode, grad enabled, run
    eagerly even if compiled; previous train/eval mode of every submodule and the global RNG states
    restored) and call ``fn`` on each :class:`Chunk` while the graph of that chunk is alive. No graph
    survives the call. ``sample_mask``: see :func:`resolve_sample_mask`.

    ``chunk_size=None`` sizes chunks by memory, not by samples: the first chunk holds at most
    ``FIRST_CHUNK_SAMPLES`` samples, the next ones as many samples (at most ``DEFAULT_CHUNK_SIZE``)
    as keep the outputs ``f`` plus the recorded layer outputs within ``CHUNK_BUDGET_BYTES``
    (:func:`chunk_samples`)."""
    adaptive = chunk_size is None
    if adaptive:
        chunk_size = FIRST_CHUNK_SAMPLES
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n_total = probe_batch_size(inputs)
    mask = resolve_sample_mask(inputs, sample_mask)
    inner = getattr(model, "_orig_mod", None)  # the module a torch.compile wrapper compiles
    runner = inner if isinstance(inner, nn.Module) else model
    with hooks.attached_for(), _measuring(model, inputs):
        stop = 0
        while stop < n_total:
            start, stop = stop, min(stop + chunk_size, n_total)
            if mask is not None and stop - start == mask.shape[1] > 1:
                # a (b, T) chunk with b == T would let a (tokens, batch) layer output pass the mask's
                # shape check transposed; one sample less makes that layout a shape error
                stop -= 1
            part = split_probe(inputs, start, stop)
            part = map_probe(part, lambda t: t.clone() if t.is_inference() else t)
            n = stop - start
            with hooks.recording(keep_inputs):
                out = _forward(runner, hooks, part, inputs)
                hooks.forward_done()
                f = resolve_output(out, output_fn, n)
                _check_recorded(hooks, f)
                part_mask = None if mask is None else mask[start : start + n].to(f.device)
                if adaptive:
                    chunk_size = chunk_samples(f, hooks.outputs, n)
                fn(Chunk(f=f, outputs=dict(hooks.outputs), inputs=dict(hooks.inputs), mask=part_mask, start=start,
                         returned=dict(hooks.returned)))
                del out, f


def _forward(runner: nn.Module, hooks: LayerHooks, part: Any, inputs: Any) -> Any:
    """``runner(part)``; an error is re-raised naming the layer it came from and the probe's shapes."""
    try:
        return call_on_probe(runner, part)
    except Exception as err:
        layer, done = hooks.current, hooks.last_done
        if layer is not None:
            where = f" in layer {layer!r} ({hooks.adapters[layer]!r})"
        elif done is not None:
            where = f" after layer {done!r}"
        else:
            where = " before the first selected layer"
        raise ValueError(
            f"the model rejected the probe{where}; probe inputs: {describe_probe(inputs)}. "
            f"Original error: {type(err).__name__}: {err}"
        ) from err


def _check_recorded(hooks: LayerHooks, f: Tensor) -> None:
    """Every selected layer ran, with gradients enabled, and ``f`` depends on the recorded outputs."""
    missing = [name for name, hs in hooks.outputs.items() if not hs]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass of the probe")
    if hooks.no_grad:
        raise ValueError(
            f"layers {sorted(set(hooks.no_grad))} ran with gradients disabled, so their K cannot be "
            "measured: they run inside torch.utils.checkpoint(..., use_reentrant=True) (use "
            "use_reentrant=False, which is measured exactly), under torch.no_grad() or inside a "
            "custom autograd.Function. Exclude them with layers=[...]"
        )
    if not f.requires_grad:
        raise ValueError("the outputs f do not depend on any selected layer")


def chunk_samples(f: Tensor, outputs: Mapping[str, list[Tensor]], n: int, budget: int | None = None) -> int:
    """Samples per chunk such that ``f`` and the recorded layer outputs of a chunk of ``n`` samples,
    scaled to that many samples, take at most ``budget`` bytes (default ``CHUNK_BUDGET_BYTES``; at
    least 1 sample, at most ``DEFAULT_CHUNK_SIZE``)."""
    budget = CHUNK_BUDGET_BYTES if budget is None else budget
    numel = f.numel() + sum(h.numel() for hs in outputs.values() for h in hs)
    per_sample = max(1, numel * f.element_size() // max(n, 1))
    return max(1, min(DEFAULT_CHUNK_SIZE, budget // per_sample))
