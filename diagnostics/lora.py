"""``peft`` LoRA layers as one linear layer each: ``h = (W + sum_a s_a B_a A_a) x + b``.

A LoRA-wrapped module (``peft.tuners.lora.Linear`` over an ``nn.Linear`` or a GPT-2 ``Conv1D``) is one
layer, named as the wrapped module (``transformer.h.0.attn.c_attn``); its ``base_layer``, ``lora_A``
and ``lora_B`` submodules are no layers of their own. Its weight in ``(out, in)`` layout is the
effective weight

    W_eff = W + sum_{a active, unmerged} s_a B_a A_a       (s_a = peft's ``scaling[a]``)

with ``W`` the base layer's weight (``Conv1D``: ``weight^T``; ``B_a A_a`` is ``(out, in)`` whatever
``fan_in_fan_out``). When adapters are merged (``merge_adapter()``) the base weight already holds
them and the forward adds nothing: ``W_eff = W``, the same numbers. Inside ``disable_adapter()`` the
forward computes the base layer alone, after unmerging: ``W_eff = W - sum_{a merged} s_a B_a A_a``.
``lora_dropout`` is the identity in eval mode, where every measurement runs; ``lora_bias`` adds to
``b`` only. ``K`` is the covariance of the wrapper's output.

Refused with an error that names them: LoRA variants (DoRA ``use_dora``, aLoRA, ... — peft's
``lora_variant``), LoRA over other modules (``nn.Conv2d``; ``nn.Embedding`` is no linear layer and
is skipped like the embedding itself), subclasses with their own forward (quantized bases), the
mixed-batch forward (``adapter_names=``), FSDP-sharded LoRA weights, and every other peft tuner (IA³,
LoHa, LoKr, OFT, ...). ``peft`` is never imported here: a model holds peft layers only if the
program imported peft, so the layers are recognised through ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .layers import Conv1DAdapter, LayerAdapter, Recorder, UnsupportedLayer, adapters_for, register_adapter

__all__ = ["LoraAdapter"]


def _peft_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` was imported (by peft, by the program), else ``None``."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is_tuner_layer(module: nn.Module) -> bool:
    base = _peft_class("peft.tuners.tuners_utils", "BaseTunerLayer")
    return base is not None and isinstance(module, base)


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


class LoraAdapter(LayerAdapter):
    """A ``peft`` LoRA ``Linear``: ``W_eff`` of the module docstring, read through the base layer's
    adapter ``base`` (``nn.Linear``: ``weight``; ``Conv1D``: ``weight^T``)."""

    covers_submodules = True

    def __init__(self, name: str, module: nn.Module, base: LayerAdapter) -> None:
        super().__init__(name, module)
        self.base = base

    @property
    def k(self) -> int:
        return self.base.k

    @property
    def d(self) -> int:
        return self.base.d

    def weight_matrix(self) -> Tensor:
        """``W_eff`` (a new tensor, attached to the parameters; ``W`` itself when no adapter adds to it)."""
        m = self.module
        if m.disable_adapters:
            added, sign = list(m.merged_adapters), -1.0  # the forward unmerges, then runs the base layer
        elif m.merged:
            added, sign = [], 1.0
        else:
            added, sign = [a for a in m.active_adapters if a in m.lora_A], 1.0
        W = self.base.weight_matrix()
        if not added:
            return W
        deltas = [self._delta(a) for a in added]
        dtype = torch.promote_types(W.dtype, deltas[0].dtype)
        out = W.to(dtype)
        for delta in deltas:
            out = out + sign * delta.to(dtype)
        return out

    def _delta(self, adapter: str) -> Tensor:
        """``s_a B_a A_a`` in ``(out, in)`` layout."""
        m = self.module
        variant = getattr(m, "lora_variant", {}).get(adapter) or getattr(m, "use_dora", {}).get(adapter)
        if variant:
            raise TypeError(
                f"layer {self.name!r}: LoRA adapter {adapter!r} uses the variant "
                f"{type(variant).__name__ if variant is not True else 'DoRA'} (e.g. DoRA, use_dora=True), which "
                "is not a plain low-rank update W + s·B·A and cannot be measured"
            )
        A, B = m.lora_A[adapter].weight, m.lora_B[adapter].weight
        _check_local(self.name, A, B)
        delta = (B @ A) * m.scaling[adapter]
        if tuple(delta.shape) != (self.k, self.d):
            raise TypeError(
                f"layer {self.name!r}: LoRA adapter {adapter!r} has B·A of shape {tuple(delta.shape)}, not the "
                f"base layer's (out, in) = {(self.k, self.d)}"
            )
        return delta

    @classmethod
    def attach(cls, adapters: Sequence[LayerAdapter], recorder: Recorder) -> list[RemovableHandle]:
        """The default hooks on the wrapper, refusing peft's mixed-batch forward (``adapter_names=``:
        each sample through another adapter, so no single ``W_eff``)."""
        (adapter,) = adapters
        name = adapter.name

        def check(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            # a forward hook sees the keywords as peft's own pre-hooks leave them
            if recorder.is_recording and kwargs.get("adapter_names") is not None:
                raise ValueError(
                    f"layer {name!r}: a forward with adapter_names= sends the samples through different "
                    "LoRA adapters, so the layer has no single weight; measure without adapter_names"
                )

        handle = adapter.module.register_forward_hook(check, with_kwargs=True, prepend=True)
        return [handle, *super().attach(adapters, recorder)]


def _check_local(name: str, *tensors: Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return
    if any(isinstance(t, DTensor) for t in tensors):
        raise TypeError(
            f"layer {name!r}: FSDP-sharded LoRA weights are not supported; monitor an unsharded copy of the model"
        )


@register_adapter(_is_tuner_layer)
def _peft_layer(name: str, module: nn.Module) -> list[LayerAdapter]:
    lora = _peft_class("peft.tuners.lora.layer", "Linear")
    lora_embedding = _peft_class("peft.tuners.lora.layer", "Embedding")
    if lora_embedding is not None and type(module).forward is lora_embedding.forward:
        return []  # an embedding, like nn.Embedding itself: no linear layer
    if lora is None or not isinstance(module, lora) or type(module).forward is not lora.forward:
        raise UnsupportedLayer(
            f"{_describe(module)} is a peft tuner layer other than LoRA over nn.Linear or Conv1D; only "
            "peft.tuners.lora.Linear (plain LoRA, no DoRA or other variants) is measured"
        )
    variants = {a: type(v).__name__ for a, v in getattr(module, "lora_variant", {}).items()}
    variants.update({a: "DoRA" for a, dora in getattr(module, "use_dora", {}).items() if dora and a not in variants})
    if variants:
        raise UnsupportedLayer(
            f"its LoRA adapters use variants {variants} (DoRA: use_dora=True, aLoRA, ...), which are not a "
            "plain low-rank update W + s·B·A"
        )
    base = module.get_base_layer()
    inner = adapters_for(name, base, explicit=False)
    if len(inner) != 1 or type(inner[0]) not in (LayerAdapter, Conv1DAdapter):
        raise UnsupportedLayer(
            f"LoRA over {type(base).__name__} is not supported; only LoRA over nn.Linear and Conv1D is measured"
        )
    return [LoraAdapter(name, module, inner[0])]

