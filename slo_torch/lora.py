"""``peft`` adapters as layers: the adapter parameters of a tuner layer belong to the module it wraps.

A ``peft`` tuner layer (``peft.tuners.lora.Linear`` wrapping ``transformer.h.0.attn.c_attn``, and the
layers of IA³, LoHa, ...) keeps its trainable tensors in the submodules named by its
``adapter_layer_names`` (LoRA: ``lora_A.<adapter>``, ``lora_B.<adapter>``, DoRA's magnitude). Those
tensors form one layer named as the wrapper, so a speed bounds the joint update of ``A`` and ``B``:
``||(dA_a, dB_a)_a||_F = lr·C`` in update mode. Only the active adapters get gradients; the frozen base
layer keeps its own name (``<wrapper>.base_layer``). ``peft`` is never imported: a model holds peft
layers only if the program imported peft, so they are recognised through ``sys.modules``.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["adapter_owners", "owner_of"]


def adapter_owners(model: nn.Module) -> dict[str, str]:
    """``{name of an adapter submodule: name of its tuner layer}`` over ``model``'s peft tuner layers
    (``model.named_modules()`` names; ``{}`` without peft)."""
    utils = sys.modules.get("peft.tuners.tuners_utils")
    tuner = getattr(utils, "BaseTunerLayer", None)
    if tuner is None:
        return {}
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, tuner):
            for attr in module.adapter_layer_names:
                if isinstance(getattr(module, attr, None), nn.Module):
                    owners[f"{name}.{attr}" if name else attr] = name
    return owners


def owner_of(name: str, owners: dict[str, str]) -> str:
    """The tuner layer owning module ``name`` (an adapter submodule or anything below it), else ``name``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        owner = owners.get(".".join(parts[:i]))
        if owner is not None:
            return owner
    return name
