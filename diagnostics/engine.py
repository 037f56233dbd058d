"""Hook capture of layer outputs and vector-Jacobian products through them.

The engine runs the model on a probe (in chunks of samples, in eval mode, with grad enabled),
records the output ``h`` of every selected layer through forward hooks, and returns
``v^T df/dh`` for blocks of cotangents ``v`` shaped like the model output ``f``. It knows nothing
of NFA: :mod:`diagnostics.ptk` turns these gradients into ``K``.

Hooks stay registered while a :class:`LayerHooks` is attached but do nothing unless a recording
is in progress. While recording, a hook returns a copy of the layer output, so downstream in-place
operations (``ReLU(inplace=True)``) cannot change the tensor we differentiate with respect to; the
values the model computes are unchanged.

Samples are assumed independent in eval mode (the output of sample ``b`` depends only on input
``b``), so a cotangent with entries at every sample at once yields every per-sample gradient.

The probe always runs eagerly (compiled models and compiled submodules run their original Python
code, nothing is recompiled), and the global CPU and CUDA random number generators are restored
afterwards, so measuring never changes the run it observes.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .common import check_choice
from .layers import LayerAdapter

__all__ = [
    "LayerHooks",
    "Chunk",
    "for_each_chunk",
    "vjp",
    "basis_cotangents",
    "random_cotangents",
    "probe_batch_size",
    "split_probe",
    "eval_mode",
    "default_output",
    "VJP_BUDGET_BYTES",
    "VJPPlan",
    "resolve_sample_mask",
    "CHUNK_BUDGET_BYTES",
    "FIRST_CHUNK_SAMPLES",
]

#: Memory allowed for one block of batched VJP results (cotangents plus layer gradients).
VJP_BUDGET_BYTES = 64 * 2**20
#: Most samples per forward pass when ``chunk_size=None``.
DEFAULT_CHUNK_SIZE = 256
#: With ``chunk_size=None``: memory allowed for one chunk's outputs ``f`` plus the recorded outputs of
#: the selected layers (for an LM, ``tokens x (vocab + sum of layer widths)`` elements), after the
#: first chunk; a single sample is always allowed.
CHUNK_BUDGET_BYTES = 256 * 2**20
#: With ``chunk_size=None``: samples in the first chunk, run before the size of the outputs is known.
FIRST_CHUNK_SAMPLES = 8

OutputFn = Callable[[Any], Tensor]


class LayerHooks:
    """Hooks on the selected layers that record their outputs (and optionally inputs) only inside
    :meth:`recording`; otherwise they return immediately and change nothing. How a layer is hooked
    is up to its adapter (:meth:`LayerAdapter.attach`); this class is the :class:`~diagnostics.layers.Recorder`
    the adapters report to."""

    def __init__(self, adapters: Mapping[str, LayerAdapter]) -> None:
        self.adapters = dict(adapters)
        self._handles: list[RemovableHandle] = []
        # an OrderedDict (weak-referenceable) so that RemovableHandle can remove entries
        self._contexts: OrderedDict[int, Callable[[], AbstractContextManager]] = OrderedDict()
        self._recording = False
        self._keep_inputs = False
        self._forward_done = False
        self.no_grad: list[str] = []  # selected layers that ran with gradients disabled
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in self.adapters}
        self.inputs: dict[str, list[Tensor]] = {n: [] for n in self.adapters}
        # per call: (weak reference to the tensor the layer handed on, its version counter then)
        self.returned: dict[str, list[tuple[weakref.ref, int]]] = {n: [] for n in self.adapters}
        self.current: str | None = None  # layer whose forward is running (for error messages)
        self.last_done: str | None = None  # last selected layer that finished its forward

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def is_recording(self) -> bool:
        """Inside :meth:`recording` and before :meth:`forward_done`."""
        return self._recording and not self._forward_done

    def attach(self) -> None:
        if self._handles:
            return
        groups: dict[tuple[type, int], list[LayerAdapter]] = {}  # adapters sharing a module are hooked together
        for adapter in self.adapters.values():
            groups.setdefault((type(adapter), id(adapter.module)), []).append(adapter)
        for (cls, _), members in groups.items():
            self._handles.extend(cls.attach(members, self))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached_for(self) -> Iterator["LayerHooks"]:
        """Attach for the duration of a block if not attached already."""
        owned = not self.attached
        self.attach()
        try:
            yield self
        finally:
            if owned:
                self.detach()

    @contextmanager
    def recording(self, keep_inputs: bool = False) -> Iterator["LayerHooks"]:
        """Record the outputs of one forward pass; :meth:`forward_done` ends the recording (layers
        that run again later, e.g. recomputed by activation checkpointing during a backward pass,
        are not recorded twice)."""
        self._clear()
        self._recording, self._keep_inputs = True, keep_inputs
        try:
            with ExitStack() as stack:
                for factory in list(self._contexts.values()):
                    stack.enter_context(factory())
                yield self
        finally:
            self._recording = self._keep_inputs = False
            self._clear()

    def forward_done(self) -> None:
        self._forward_done = True

    def while_recording(self, factory: Callable[[], AbstractContextManager]) -> RemovableHandle:
        """Enter ``factory()`` around every recording until the returned handle is removed."""
        handle = RemovableHandle(self._contexts)
        self._contexts[handle.id] = factory
        return handle

    def _clear(self) -> None:
        self.current = self.last_done = None
        self._forward_done = False
        self.no_grad = []
        for lst in (*self.outputs.values(), *self.inputs.values(), *self.returned.values()):
            lst.clear()

    def enter(self, name: str) -> None:
        self.current = name

    def record(self, name: str, h: Tensor, x: Tensor | None = None) -> Tensor:
        """Keep ``h`` (made to require grad) as layer ``name``'s output and return a copy for the
        model to use downstream, so later in-place operations cannot change ``h``."""
        if not torch.is_grad_enabled():  # e.g. inside torch.utils.checkpoint(use_reentrant=True)
            self.no_grad.append(name)
        if self._keep_inputs:
            if x is None:
                raise ValueError(f"layer {name!r}: its input could not be captured")
            self.inputs[name].append(x.detach().clone())
        target = h if h.requires_grad else h.detach().requires_grad_(True)
        self.outputs[name].append(target)
        self.current, self.last_done = None, name
        handed_on = target.clone()
        self.returned[name].append((weakref.ref(handed_on), handed_on._version))
        return handed_on


# ----------------------------------------------------------------------------- probe handling


def _entries(inputs: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The top-level entries of a probe (a tensor, a dict of keyword arguments or a tuple/list of positional
    ones) and a function that rebuilds a probe of the same kind from new entries (a dict for any mapping)."""
    if isinstance(inputs, Tensor):
        return [inputs], lambda values: values[0]
    if isinstance(inputs, Mapping):
        keys = list(inputs)
        return [inputs[k] for k in keys], lambda values: dict(zip(keys, values))
    if isinstance(inputs, (tuple, list)):
        return list(inputs), lambda values: type(inputs)(values)
    raise TypeError(
        f"probe inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(inputs).__name__}"
    )


def _tensors(inputs: Any) -> list[Tensor]:
    return [v for v in _entries(inputs)[0] if isinstance(v, Tensor)]


def probe_batch_size(inputs: Any) -> int:
    """Number of samples in the probe: the leading dimension of its first tensor."""
    tensors = _tensors(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("probe inputs must contain a tensor with a leading batch dimension")
    return tensors[0].shape[0]


def _map(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The probe with ``fn`` applied to each of its tensors."""
    values, rebuild = _entries(inputs)
    return rebuild([fn(v) if isinstance(v, Tensor) else v for v in values])


def split_probe(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every probe tensor whose leading dimension is the batch size."""
    n = probe_batch_size(inputs)
    return _map(inputs, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t)


def describe_probe(inputs: Any) -> str:
    """The shapes of the probe's tensors (the type names of its other entries), for error messages."""
    values, _ = _entries(inputs)
    shown = [str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in values]
    if isinstance(inputs, Tensor):
        return f"tensor {shown[0]}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in zip(inputs, shown)) + "}"
    return "(" + ", ".join(shown) + ")"


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def default_output(out: Any) -> Any:
    """The model output itself if it is a tensor, else its ``.logits`` (``["logits"]`` for dicts)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    return out


def _resolve_output(out: Any, output_fn: OutputFn | None, n: int) -> Tensor:
    f = output_fn(out) if output_fn is not None else default_output(out)
    if not isinstance(f, Tensor):
        where = "output_fn" if output_fn is not None else "the model (which has no .logits)"
        raise TypeError(
            f"{where} returned {type(f).__name__}; the outputs f must be a tensor with a leading batch "
            "dimension: pass output_fn=lambda out: ... returning one"
        )
    if f.dim() == 0 or f.shape[0] != n:
        raise ValueError(
            f"outputs f have shape {tuple(f.shape)} but the probe chunk has {n} samples; output_fn must "
            "return per-sample outputs with the batch as the leading dimension (do not reduce over it)"
        )
    if not f.is_floating_point():
        raise TypeError(f"outputs f must be floating point, got {f.dtype}")
    return f


SampleMask = Tensor | bool | None


def resolve_sample_mask(inputs: Any, sample_mask: SampleMask = None) -> Tensor | None:
    """The per-token sample mask ``(B, T)`` (bool) of a probe, or ``None`` (every row is a sample).

    ``sample_mask=None``: the probe's ``attention_mask`` (dict probes, 0/1 of shape ``(B, T)``) if it has
    one; ``False``: no mask; a ``(B, T)`` tensor of 0/1 or bools: that mask (left padding, packed
    sequences, prompt tokens to leave out)."""
    if sample_mask is False:
        return None
    what = "sample_mask"
    if sample_mask is None or sample_mask is True:
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            return None
        what = "the probe's attention_mask"
    elif isinstance(sample_mask, Tensor):
        mask = sample_mask
    else:
        raise TypeError(
            f"sample_mask must be None (use the probe's attention_mask), False or a (batch, tokens) tensor, "
            f"got {type(sample_mask).__name__}"
        )
    n = probe_batch_size(inputs)
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(
            f"{what} must have shape (batch, tokens) with batch = {n} (the probe's), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{what} must hold 0/1 or bools (1 = a real token), e.g. not an additive float mask")
        mask = mask != 0
    return mask


@dataclass
class Chunk:
    """One forward pass: outputs ``f`` (B, ...) and per layer the recorded outputs/inputs; ``mask``
    (B, T) marks the real tokens (``None``: every row is a sample)."""

    f: Tensor
    outputs: dict[str, list[Tensor]]
    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    mask: Tensor | None = None
    start: int = 0  # index of the chunk's first sample in the probe
    #: per layer and call: (weak reference to the tensor the layer handed on, its version then)
    returned: dict[str, list[tuple[weakref.ref, int]]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Deprecated: the number of samples, ``f.shape[0]``."""
        warnings.warn("Chunk.n is deprecated; use chunk.f.shape[0]", DeprecationWarning, stacklevel=2)
        return self.f.shape[0]

    @property
    def num_outputs(self) -> int:
        """Outputs per sample ``C`` (for a sequence output (B, T, V): T*V)."""
        return self.f[0].numel()

    def _token_view(self, t: Tensor, what: str, lead: int = 0) -> Tensor | None:
        """The mask viewed to broadcast over ``t`` (``(*L, B, T, ...)``, ``lead = len(L)``) when ``t`` is per
        token, ``None`` when ``t`` is per sample (``(*L, B, features)``)."""
        mask = self.mask
        if mask is None or t.dim() - lead <= 2:
            return None
        if tuple(t.shape[lead : lead + 2]) != tuple(mask.shape):
            raise ValueError(
                f"{what} has shape {tuple(t.shape[lead:])} but the sample mask (attention_mask or sample_mask) "
                f"has shape {tuple(mask.shape)}: per-token tensors must be (batch, tokens, ...). Pass "
                "sample_mask=False to count every position, or a sample_mask matching this layout"
            )
        return mask.view(*mask.shape, *([1] * (t.dim() - lead - 2)))

    def row_mask(self, adapter: Any, h: Tensor) -> Tensor | None:
        """Bool ``(N,)`` over the rows ``adapter.out_rows(h)`` of a layer output: ``True`` for real tokens."""
        view = self._token_view(h, f"the output of layer {adapter.name!r}")
        if view is None:
            return None
        return adapter.out_rows(view.expand(h.shape))[:, 0]

    def mask_cotangents(self, v: Tensor) -> Tensor:
        """Zero a block of cotangents ``(b, *f.shape)`` at padded positions (outputs there do not count)."""
        view = self._token_view(v, "the outputs f", lead=1)
        return v if view is None else v * view.to(v.dtype)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; afterwards (also on error) every submodule gets back its own
    previous ``training`` flag (``model.train(was_training)`` would not restore mixed modes)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _cuda_devices(model: nn.Module, inputs: Any) -> list[int]:
    tensors = [*model.parameters(), *model.buffers(), *_tensors(inputs)]
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
            part = _map(part, lambda t: t.clone() if t.is_inference() else t)
            n = stop - start
            with hooks.recording(keep_inputs):
                try:
                    out = _call(runner, part)
                except Exception as err:  # re-raise with the layer and the input shapes
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
                hooks.forward_done()
                f = _resolve_output(out, output_fn, n)
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
                part_mask = None if mask is None else mask[start : start + n].to(f.device)
                if adaptive:
                    chunk_size = chunk_samples(f, hooks.outputs, n)
                fn(Chunk(f, dict(hooks.outputs), dict(hooks.inputs), mask=part_mask, start=start,
                         returned=dict(hooks.returned)))
                del out, f


def chunk_samples(f: Tensor, outputs: Mapping[str, list[Tensor]], n: int, budget: int | None = None) -> int:
    """Samples per chunk such that ``f`` and the recorded layer outputs of a chunk of ``n`` samples,
    scaled to that many samples, take at most ``budget`` bytes (default ``CHUNK_BUDGET_BYTES``; at
    least 1 sample, at most ``DEFAULT_CHUNK_SIZE``)."""
    budget = CHUNK_BUDGET_BYTES if budget is None else budget
    numel = f.numel() + sum(h.numel() for hs in outputs.values() for h in hs)
    per_sample = max(1, numel * f.element_size() // max(n, 1))
    return max(1, min(DEFAULT_CHUNK_SIZE, budget // per_sample))


# ----------------------------------------------------------------------------- VJPs

# One batched VJP per block of cotangents (`is_grads_batched=True`, i.e. vmap over the backward)
# measured faster than a Python loop of single VJPs (1 thread, 2-core CPU): exact K on a tiny
# GPT-2 (many small ops, 44 outputs per sequence) 0.17 s batched vs 1.0 s looped; on the benchmark
# MLP (6 layers of width 256, 10 outputs, 2000 samples, few large ops) 0.35 s vs 0.31 s. Blocks are
# sized by VJP_BUDGET_BYTES. Ops without a vmap batching rule fall back to the loop (per measurement).
#: Whether a measurement starts with batched VJPs (read at the start of each measurement, never written).
BATCHED_VJP = True


def _missing_batching_rule(err: BaseException) -> bool:
    """True for the error vmap raises on an op it cannot batch (the only error that falls back to the loop)."""
    msg = str(err)
    return isinstance(err, (RuntimeError, NotImplementedError)) and (
        "atching rule not implemented" in msg or msg.startswith("vmap:")
    )


class VJPPlan:
    """How the VJPs of one measurement run: batched until an op without a vmap batching rule is met,
    then one cotangent at a time for the rest of that measurement (nothing outlives it).

    ``names`` label the targets in errors; ``allow_unused=True`` gives zero gradients for targets that
    the outputs do not depend on (otherwise that is an error naming them)."""

    def __init__(self, names: list[str] | None = None, allow_unused: bool = False, batched: bool | None = None) -> None:
        self.names = names
        self.allow_unused = allow_unused
        self.batched = BATCHED_VJP if batched is None else batched

    def _complete(self, grads: tuple[Tensor | None, ...], targets: list[Tensor], b: int) -> list[Tensor]:
        unused = [i for i, g in enumerate(grads) if g is None]
        if unused and not self.allow_unused:
            names = self.names or [f"target {i}" for i in range(len(targets))]
            which = sorted({names[i] for i in unused})
            raise ValueError(
                f"the outputs f do not depend on the recorded output of layers {which} (the gradient is None), "
                "so their K would be silently 0. Likely causes: the layer feeds a branch that output_fn does not "
                "use, its output is detached (.detach(), an integer cast), or it runs in code that autograd "
                "cannot see (a compiled graph, torch.utils.checkpoint(..., use_reentrant=True)). Exclude them "
                "with layers=[...], or pass allow_unused=True to record K = 0 for layers the outputs do not use"
            )
        return [g if g is not None else t.new_zeros((b, *t.shape)) for g, t in zip(grads, targets)]

    def __call__(self, f: Tensor, targets: list[Tensor], cotangents: Tensor) -> Iterator[list[Tensor]]:
        if self.batched:
            try:
                grads = torch.autograd.grad(
                    f, targets, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
            except (RuntimeError, NotImplementedError) as err:
                if not _missing_batching_rule(err):
                    raise
                self.batched = False  # an op without a vmap batching rule: loop for this measurement
            else:
                yield self._complete(grads, targets, cotangents.shape[0])
                return
        for v in cotangents:
            grads = torch.autograd.grad(f, targets, v, retain_graph=True, allow_unused=True)
            yield self._complete(tuple(g if g is None else g.unsqueeze(0) for g in grads), targets, 1)


def vjp(
    f: Tensor, targets: list[Tensor], cotangents: Tensor, plan: VJPPlan | None = None
) -> Iterator[list[Tensor]]:
    """Vector-Jacobian products ``v^T df/dt`` for a block of cotangents ``(b, *f.shape)``.

    Yields lists with one tensor ``(b', *t.shape)`` per target (``b'`` = 1 per step in the loop,
    ``b`` when batched). A target that ``f`` does not depend on is an error unless the ``plan``
    allows it (then zeros). Uses ``torch.autograd.grad``: no parameter ``.grad`` is touched, and the
    graph is kept for further blocks. Pass one :class:`VJPPlan` for all blocks of a measurement."""
    yield from (plan if plan is not None else VJPPlan())(f, targets, cotangents)


def block_size(chunk: Chunk, budget: int = VJP_BUDGET_BYTES) -> int:
    """How many cotangents fit in one batched VJP within ``budget`` bytes."""
    per_vector = chunk.f.numel() + sum(t.numel() for ts in chunk.outputs.values() for t in ts)
    return max(1, budget // max(1, per_vector * chunk.f.element_size()))


def basis_cotangents(f: Tensor, start: int, stop: int) -> Tensor:
    """Output basis vectors ``e_c`` for ``c in [start, stop)``, each set at every sample:
    shape ``(stop - start, *f.shape)``."""
    n, c = f.shape[0], f[0].numel()
    v = f.new_zeros(stop - start, n, c)
    idx = torch.arange(stop - start, device=f.device)
    v[idx, :, start + idx] = 1
    return v.view(stop - start, *f.shape)


#: Distributions of the sketch vectors.
SKETCHES = ("rademacher", "gaussian")


def random_cotangents(
    f: Tensor, count: int, generator: torch.Generator | None, dist: str = "rademacher"
) -> Tensor:
    """``count`` random vectors with the full shape of ``f`` and ``E[v v^T] = I`` (i.i.d. entries,
    Gaussian or Rademacher): shape ``(count, *f.shape)``."""
    check_choice("sketch distribution", dist, SKETCHES)
    shape = (count, *f.shape)
    device = generator.device if generator is not None else f.device
    if dist == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=f.dtype)
    else:  # rademacher  # 8 signs per random byte: ~3x faster than randint(0, 2) per entry
        numel = math.prod(shape)
        octets = torch.randint(0, 256, ((numel + 7) // 8,), generator=generator, device=device, dtype=torch.uint8)
        bits = (octets.unsqueeze(-1) >> torch.arange(8, device=device, dtype=torch.uint8)) & 1
        v = bits.reshape(-1)[:numel].to(f.dtype).mul_(2).sub_(1).view(shape)
    return v.to(f.device)
