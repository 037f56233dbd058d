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
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerAdapter",
    "LinearAdapter",
    "Conv1DAdapter",
    "Conv2dAdapter",
    "find_linear_layers",
    "check_layer_sizes",
    "DEFAULT_MAX_K",
]

#: Largest layer dimension (``k`` for ``K``, ``d`` for the NFM/AGOP) accepted by default.
#: A 8192 x 8192 float32 matrix takes 256 MiB.
DEFAULT_MAX_K = 8192


class LayerAdapter:
    """Read one module as a linear map ``h = W x (+ b)`` with ``W`` of shape ``(k, d)``."""

    kind = "linear"

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

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


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: ``W = weight`` (``(out, in)``)."""


class Conv1DAdapter(LayerAdapter):
    """GPT-2 style ``Conv1D``: ``weight`` is ``(in, out)``, so ``W = weight^T``."""

    kind = "conv1d"

    def weight_matrix(self) -> Tensor:
        return self.module.weight.t()


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` as a linear map on unfolded patches: ``W = weight.reshape(out, in*kh*kw)``."""

    kind = "conv2d"

    def weight_matrix(self) -> Tensor:
        w = self.module.weight
        return w.reshape(w.shape[0], -1)

    def out_rows(self, h: Tensor, lead: int = 0) -> Tensor:
        # (*L, B, C_out, H, W) -> (*L, B*H*W, C_out)
        h = h.movedim(lead + 1, -1)
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


def _adapter_for(name: str, module: nn.Module, include_conv: bool) -> LayerAdapter | None:
    if isinstance(module, nn.Linear):
        return LinearAdapter(name, module)
    if _is_conv1d_like(module):
        return Conv1DAdapter(name, module)
    if include_conv and isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            return None
        return Conv2dAdapter(name, module)
    return None


def _user_name(name: str) -> str:
    """Module name without the ``_orig_mod`` parts that ``torch.compile`` wrappers insert."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def find_linear_layers(
    model: nn.Module, layers: str | Sequence[str] | None = None
) -> dict[str, LayerAdapter]:
    """Select the linear layers of ``model`` by name, in model order.

    ``layers=None`` selects every ``nn.Linear`` and ``Conv1D``-like module. Otherwise ``layers`` is a
    name or glob pattern (``fnmatch``) or a list of them, matched against ``model.named_modules()``
    names (without the ``_orig_mod.`` of ``torch.compile``, so a compiled model has its eager names);
    explicit selections may also pick ``nn.Conv2d`` layers. Every entry must match at least one
    supported layer. Returns ``{name: adapter}`` with ``adapter.weight_matrix()`` of shape ``(k, d)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layers, str):
        layers = [layers]
    include_conv = layers is not None
    found: dict[str, LayerAdapter] = {}
    for name, module in model.named_modules():
        name = _user_name(name)
        adapter = _adapter_for(name, module, include_conv)
        if adapter is not None:
            found[name] = adapter
    if layers is None:
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
        hits = [n for n in found if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            if pattern in modules:
                raise ValueError(
                    f"layer {pattern!r} is a {type(modules[pattern]).__name__}, not a supported linear "
                    f"layer (nn.Linear, Conv1D, nn.Conv2d with groups=1); available: {list(found)}"
                )
            raise ValueError(f"no linear layer matches {pattern!r}; available layers: {list(found)}")
        chosen.update(hits)
    return {n: a for n, a in found.items() if n in chosen}


def check_layer_sizes(adapters: dict[str, LayerAdapter], max_k: int | None = DEFAULT_MAX_K) -> None:
    """Raise ``ValueError`` before any computation if a layer's ``K`` (k x k) or NFM (d x d) would be
    larger than ``max_k`` x ``max_k`` (``max_k=None`` disables the check)."""
    if max_k is None:
        return
    if not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be a positive int or None, got {max_k!r}")
    too_big = {n: (a.k, a.d) for n, a in adapters.items() if max(a.k, a.d) > max_k}
    if too_big:
        desc = ", ".join(f"{n!r} (k={k}, d={d})" for n, (k, d) in too_big.items())
        raise ValueError(
            f"layers too large for k x k / d x d matrices with max_k={max_k}: {desc}. "
            "Exclude them with layers=[...] (names or globs of the layers to keep), "
            "or raise the limit with max_k=... (a k x k float32 matrix takes 4*k*k bytes)"
        )
