"""Which modules count as linear layers, and how to read each one as ``h = W x (+ b)``.

A layer adapter knows three things about one module: its weight matrix ``W`` in ``(k, d)`` =
``(out, in)`` layout, how to turn the module's output (or a gradient shaped like it) into rows
``(N, k)`` with one row per sample (token, spatial position), and how to turn its input into the
matching rows ``(N, d)``. Nothing here knows about NFA or hooks.

Supported modules:

- ``nn.Linear``: ``W = weight``.
- modules with the shape contract of ``transformers``' ``Conv1D`` (GPT-2): a 2-D ``weight`` of shape
  ``(in, out)``, an attribute ``nf`` equal to ``out``, forward ``x @ weight + bias``; ``W = weight^T``.
  Detected by duck typing, without importing ``transformers``.
- ``nn.Conv2d`` (``groups=1``, zero padding), only when named explicitly in ``layers``: the input rows
  are the unfolded patches, ``W = weight.reshape(out, in*kh*kw)``, every spatial position is a row.
- ``nn.MultiheadAttention``: four layers ``<name>.q``, ``<name>.k``, ``<name>.v`` and ``<name>.out_proj``
  (see :mod:`diagnostics.attention`).
- ``peft`` LoRA layers over ``nn.Linear`` or ``Conv1D``: one layer named as the wrapped module, ``W`` the
  effective weight ``W + sum_a s_a B_a A_a`` (see :mod:`diagnostics.lora`); other ``peft`` tuners are
  refused (:class:`UnsupportedLayer`).

Each kind is one rule in a registry (:func:`register_adapter`): the rule for a module builds its
adapters, and the adapter class says how its outputs are captured (:meth:`LayerAdapter.attach`);
the engine never branches on layer types.
"""

from __future__ import annotations

import fnmatch
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "LayerAdapter",
    "Conv1DAdapter",
    "Conv2dAdapter",
    "Recorder",
    "UnsupportedLayer",
    "register_adapter",
    "find_linear_layers",
    "check_layer_sizes",
    "DEFAULT_MAX_K",
]

#: Largest layer dimension (``k`` for ``K``, ``d`` for the NFM/AGOP) accepted by default. Measuring
#: one float32 layer with k = d = 8192 allocates about 1.3 GiB (see ``diagnostics.memory.estimate_memory``).
DEFAULT_MAX_K = 8192


class Recorder(Protocol):
    """What an adapter reports to while the engine records (implemented by ``engine.LayerHooks``)."""

    @property
    def is_recording(self) -> bool: ...

    def enter(self, name: str) -> None:
        """The forward of layer ``name`` starts (for error messages)."""

    def record(self, name: str, h: Tensor, x: Tensor | None = None) -> Tensor:
        """Record the output ``h`` (and input ``x``) of layer ``name``; returns the tensor the model
        must use downstream instead of ``h`` (same values)."""

    def while_recording(self, factory: Callable[[], AbstractContextManager]) -> RemovableHandle:
        """Enter ``factory()`` around every recording until the returned handle is removed."""


class UnsupportedLayer(TypeError):
    """Raised by an adapter rule for a module that computes a layer no adapter reads exactly (e.g. a
    ``peft`` tuner other than LoRA); the module and its submodules are then no layers, and selecting
    it (by default or by name) raises ``ValueError`` with this message."""


class LayerAdapter:
    """Read one module as a linear map ``h = W x (+ b)`` with ``W`` of shape ``(k, d)``.

    ``module_name`` is the name of the module that computes the layer (``name`` itself, except for
    layers inside a module such as the projections of ``nn.MultiheadAttention``). The base class reads
    ``nn.Linear``: ``W = weight`` (``(out, in)``). An adapter class with ``covers_submodules = True``
    reads its whole module (a wrapper such as a LoRA layer): the module's submodules are no layers."""

    covers_submodules = False

    def __init__(self, name: str, module: nn.Module, module_name: str | None = None) -> None:
        self.name = name
        self.module = module
        self.module_name = name if module_name is None else module_name

    @classmethod
    def attach(cls, adapters: Sequence["LayerAdapter"], recorder: Recorder) -> list[RemovableHandle]:
        """Hooks that report the layers ``adapters`` (all of this class, sharing one module) to
        ``recorder`` while it records. Default: the module's output is the layer's output ``h``, its
        first argument the input ``x``."""
        (adapter,) = adapters
        name = adapter.name

        def pre(module: nn.Module, args: tuple) -> None:
            if recorder.is_recording:
                recorder.enter(name)

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not recorder.is_recording:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, expected a tensor")
            x = args[0] if args else next(iter(kwargs.values()), None)
            return recorder.record(name, output, x)

        module = adapter.module
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post, with_kwargs=True)]

    @property
    def k(self) -> int:
        """Output features (rows of ``W``)."""
        return self.weight_matrix().shape[0]

    @property
    def d(self) -> int:
        """Input features (columns of ``W``)."""
        return self.weight_matrix().shape[1]

    def weight_matrix(self) -> Tensor:
        """The current weight as a ``(k, d)`` view (no copy, still attached to the parameter)."""
        return self.module.weight

    def out_rows(self, h: Tensor, lead: int = 0) -> Tensor:
        """Reshape an output-shaped tensor ``(*L, *h_shape)`` with ``lead = len(L)`` to ``(*L, N, k)``."""
        return h.reshape(*h.shape[:lead], -1, h.shape[-1])

    def in_rows(self, x: Tensor) -> Tensor:
        """Reshape the layer input to rows ``(N, d)`` matching :meth:`out_rows`."""
        return x.reshape(-1, x.shape[-1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, k={self.k}, d={self.d})"


class Conv1DAdapter(LayerAdapter):
    """GPT-2 style ``Conv1D``: ``weight`` is ``(in, out)``, so ``W = weight^T``."""

    def weight_matrix(self) -> Tensor:
        return self.module.weight.t()


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` as a linear map on unfolded patches: ``W = weight.reshape(out, in*kh*kw)``."""

    def weight_matrix(self) -> Tensor:
        w = self.module.weight
        return w.reshape(w.shape[0], -1)

    def out_rows(self, h: Tensor, lead: int = 0) -> Tensor:
        # (*L, B, C_out, H, W) -> (*L, B*H*W, C_out); an unbatched call's (*L, C_out, H, W) -> (*L, H*W, C_out)
        h = h.movedim(-3, -1)
        return h.reshape(*h.shape[:lead], -1, h.shape[-1])

    def in_rows(self, x: Tensor) -> Tensor:
        m = self.module
        padding = 0 if m.padding == "valid" else m.padding
        if isinstance(padding, str):
            raise ValueError(
                f"layer {self.name!r}: Conv2d padding={padding!r} is not supported for layer inputs; "
                "use explicit integer padding"
            )
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])


AdapterRule = Callable[[str, nn.Module], "list[LayerAdapter]"]
_RULES: list[tuple[Callable[[nn.Module], bool], AdapterRule, bool]] = []


def register_adapter(
    match: type | tuple[type, ...] | Callable[[nn.Module], bool], *, explicit_only: bool = False
) -> Callable[[AdapterRule], AdapterRule]:
    """Decorator registering ``rule(name, module) -> [LayerAdapter, ...]`` for the modules ``match``
    selects (a module class, a tuple of classes, or a predicate). The first registered rule that
    matches a module is used; an empty list means the module is not supported, :class:`UnsupportedLayer`
    that it computes a layer that cannot be read exactly. ``explicit_only`` rules apply only when
    ``layers`` names the module (not with ``layers=None``)."""
    if isinstance(match, (type, tuple)):
        classes = match
        match = lambda module: isinstance(module, classes)  # noqa: E731
    if not callable(match):
        raise TypeError(f"match must be a module class, a tuple of classes or a predicate, got {match!r}")

    def decorator(rule: AdapterRule) -> AdapterRule:
        _RULES.append((match, rule, explicit_only))
        return rule

    return decorator


def _is_conv1d_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        isinstance(weight, Tensor)
        and weight.dim() == 2
        and isinstance(nf, int)
        and weight.shape[1] == nf
        and not isinstance(module, nn.Linear)
    )


@register_adapter(nn.Linear)
def _linear(name: str, module: nn.Module) -> list[LayerAdapter]:
    return [LayerAdapter(name, module)]


@register_adapter(_is_conv1d_like)
def _conv1d(name: str, module: nn.Module) -> list[LayerAdapter]:
    return [Conv1DAdapter(name, module)]


def _conv2d_limit(module: nn.Module) -> str:
    """Why an ``nn.Conv2d`` is not measured (``""`` when it is, and for other modules)."""
    if not isinstance(module, nn.Conv2d):
        return ""
    if module.groups != 1:
        return f"it has groups={module.groups} (only groups=1 is supported)"
    if module.padding_mode != "zeros":
        return f"it has padding_mode={module.padding_mode!r} (only zero padding, padding_mode='zeros', is supported)"
    return ""


@register_adapter(nn.Conv2d, explicit_only=True)
def _conv2d(name: str, module: nn.Module) -> list[LayerAdapter]:
    return [] if _conv2d_limit(module) else [Conv2dAdapter(name, module)]


def adapters_for(name: str, module: nn.Module, explicit: bool) -> list[LayerAdapter]:
    """The adapters of the first registered rule matching ``module`` (``[]``: none, or an
    ``explicit_only`` rule while ``explicit`` is false)."""
    for match, rule, explicit_only in _RULES:
        if match(module):
            return rule(name, module) if explicit or not explicit_only else []
    return []


def _user_name(name: str) -> str:
    """Module name without the ``_orig_mod`` parts that ``torch.compile`` wrappers insert."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def find_linear_layers(
    model: nn.Module, layers: str | Sequence[str] | None = None
) -> dict[str, LayerAdapter]:
    """Select the linear layers of ``model`` by name, in model order.

    ``layers=None`` selects every ``nn.Linear``, ``Conv1D``-like module and the four projections of
    every ``nn.MultiheadAttention`` (``<name>.q``, ``.k``, ``.v``, ``.out_proj``). Otherwise ``layers``
    is a name or glob pattern (``fnmatch``) or a list of them, matched against the layer names and
    the names of the modules that compute them (``"enc.self_attn"`` selects its four projections),
    without the ``_orig_mod.`` of ``torch.compile`` (a compiled model has its eager names);
    explicit selections may also pick ``nn.Conv2d`` layers. Every entry must match at least one
    supported layer. Returns ``{name: adapter}`` with ``adapter.weight_matrix()`` of shape ``(k, d)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        layers = [layers]
    found: dict[str, LayerAdapter] = {}
    refused: dict[str, str] = {}  # modules that compute a layer no adapter reads: the reason
    covered: str | None = None  # prefix of the submodules of a module whose adapter reads all of it
    for name, module in model.named_modules():
        name = _user_name(name)
        if covered is not None and name.startswith(covered):  # named_modules lists a subtree in one run
            continue
        try:
            adapters = adapters_for(name, module, explicit=layers is not None)
        except UnsupportedLayer as exc:
            refused[name], adapters, covered = str(exc), [], f"{name}." if name else ""
        for adapter in adapters:
            # parents come first: a layer a parent already claimed (the out_proj of an
            # nn.MultiheadAttention, which its forward never calls) keeps the parent's adapter
            found.setdefault(adapter.name, adapter)
            if adapter.covers_submodules:
                covered = f"{name}." if name else ""
    if layers is None:
        if refused:
            raise ValueError(
                "the model has layers that cannot be measured: "
                + "; ".join(f"{n!r}: {why}" for n, why in refused.items())
                + ". Select the other layers with layers=[...] (names or globs)"
            )
        if not found:
            kinds = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(
                "model has no nn.Linear or Conv1D layers to measure (module types: "
                f"{', '.join(kinds)}); pass layers=[...] naming supported layers such as nn.Conv2d"
            )
        return found
    if not isinstance(layers, (list, tuple)) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"layers must be None, a name/glob or a list of names/globs, got {layers!r}")
    if len(layers) == 0:
        raise ValueError("layers=[] selects nothing; pass None for every linear layer or a list of names")
    modules = {_user_name(n): m for n, m in model.named_modules()}
    chosen: set[str] = set()
    for pattern in layers:
        bad = [n for n in refused if pattern == n or fnmatch.fnmatchcase(n, pattern)]
        if bad:
            raise ValueError(f"layer {bad[0]!r} (matched by {pattern!r}) cannot be measured: {refused[bad[0]]}")
        hits = [
            n for n, a in found.items()
            if pattern in (n, a.module_name)
            or fnmatch.fnmatchcase(n, pattern)
            or fnmatch.fnmatchcase(a.module_name, pattern)
        ]
        if not hits:
            if pattern in modules:
                limit = _conv2d_limit(modules[pattern])
                raise ValueError(
                    f"layer {pattern!r} is a {type(modules[pattern]).__name__}, not a supported linear "
                    "layer (nn.Linear, Conv1D, nn.Conv2d with groups=1 and zero padding, nn.MultiheadAttention)"
                    f"{': ' + limit if limit else ''}; available: {list(found)}"
                )
            raise ValueError(f"no linear layer matches {pattern!r}; available layers: {list(found)}")
        chosen.update(hits)
    return {n: a for n, a in found.items() if n in chosen}


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"1.5 GiB"``, ``"328 MiB"`` or ``"12 KiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KiB"


def check_layer_sizes(
    adapters: dict[str, LayerAdapter], max_k: int | None = DEFAULT_MAX_K, memory: dict[str, int] | None = None
) -> None:
    """Raise ``ValueError`` before any computation if a layer's ``K`` (k x k) or NFM (d x d) would be
    larger than ``max_k`` x ``max_k`` (``max_k=None`` disables the check); ``memory`` (bytes per layer
    and ``"total"``, from :func:`diagnostics.memory.estimate_memory`) is quoted in the message."""
    if max_k is None:
        return
    if not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be a positive int or None, got {max_k!r}")
    too_big = {n: (a.k, a.d) for n, a in adapters.items() if max(a.k, a.d) > max_k}
    if too_big:
        size = (lambda n: f", ~{format_bytes(memory[n])}") if memory else (lambda n: "")
        desc = ", ".join(f"{n!r} (k={k}, d={d}{size(n)})" for n, (k, d) in too_big.items())
        total = f" Measuring all selected layers needs about {format_bytes(memory['total'])}." if memory else ""
        raise ValueError(
            f"layers too large for k x k / d x d matrices with max_k={max_k}: {desc}.{total} "
            "Exclude them with layers=[...] (names or globs of the layers to keep), "
            "or raise the limit with max_k=... (see diagnostics.memory.estimate_memory for the memory needed)"
        )
