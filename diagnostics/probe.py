"""Probes (a tensor, a dict of keyword arguments or a tuple of positional ones, batch first), the outputs
``f`` a model returns for them, sample masks, and :class:`Chunk`, one forward pass over part of a probe."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "OutputFn",
    "SampleMask",
    "Chunk",
    "probe_batch_size",
    "split_probe",
    "describe_probe",
    "probe_tensors",
    "map_probe",
    "call_on_probe",
    "resolve_output",
    "move_probe",
    "default_output",
    "resolve_sample_mask",
]

OutputFn = Callable[[Any], Tensor]


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


def probe_tensors(inputs: Any) -> list[Tensor]:
    """The tensors among the probe's top-level entries, in order."""
    return [v for v in _entries(inputs)[0] if isinstance(v, Tensor)]


def probe_batch_size(inputs: Any) -> int:
    """Number of samples in the probe: the leading dimension of its first tensor."""
    tensors = probe_tensors(inputs)
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("probe inputs must contain a tensor with a leading batch dimension")
    return tensors[0].shape[0]


def map_probe(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The probe with ``fn`` applied to each of its tensors."""
    values, rebuild = _entries(inputs)
    return rebuild([fn(v) if isinstance(v, Tensor) else v for v in values])


def move_probe(inputs: Any, device: torch.device | str) -> Any:
    """The probe with each of its tensors moved to ``device``."""
    return map_probe(inputs, lambda t: t.to(device))


def split_probe(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every probe tensor whose leading dimension is the batch size."""
    n = probe_batch_size(inputs)
    return map_probe(inputs, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t)


def describe_probe(inputs: Any) -> str:
    """The shapes of the probe's tensors (the type names of its other entries), for error messages."""
    values, _ = _entries(inputs)
    shown = [str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in values]
    if isinstance(inputs, Tensor):
        return f"tensor {shown[0]}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {v}" for k, v in zip(inputs, shown)) + "}"
    return "(" + ", ".join(shown) + ")"


def call_on_probe(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(**kwargs)`` or ``model(*args)`` for a tensor, dict or tuple probe."""
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


def resolve_output(out: Any, output_fn: OutputFn | None, n: int) -> Tensor:
    """The outputs ``f = output_fn(out)`` (default :func:`default_output`) of a chunk of ``n`` samples;
    an error unless ``f`` is a floating-point tensor with ``n`` leading rows."""
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


@dataclass(kw_only=True)
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
        """Zero a block of cotangents ``(b, *f.shape)`` at padded positions (outputs there do not count).

        Outputs ``f`` of exactly the mask's shape ``(B, T)`` are refused: per-token scalars (a value head)
        and per-sample features that happen to number ``T`` cannot be told apart."""
        if self.mask is not None and tuple(v.shape[1:]) == tuple(self.mask.shape):
            raise ValueError(
                f"the outputs f have shape {tuple(v.shape[1:])}, the shape of the sample mask (attention_mask or "
                "sample_mask=): per-token scalar outputs cannot be told from per-sample features. For one "
                "output per token (a value head) return them as (batch, tokens, 1), e.g. "
                "output_fn=lambda out: out[..., :1], so padded positions are masked; for per-sample features "
                "pass sample_mask=False"
            )
        view = self._token_view(v, "the outputs f", lead=1)
        return v if view is None else v * view.to(v.dtype)
