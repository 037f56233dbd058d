"""The adapter tensors of a peft LoRA layer form one SLO layer named as the wrapped module."""

from __future__ import annotations

import pytest
import torch

from slo_torch import SLOptimizer, promote, promote_lowest, resolve_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_diag_lora import PREFIX, VOCAB, lora_model  # noqa: E402

C_ATTN = PREFIX + "transformer.h.0.attn.c_attn"
C_FC = PREFIX + "transformer.h.0.mlp.c_fc"


def adapter_params(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    layer = dict(model.named_modules())[name]
    return [p for sub in (layer.lora_A, layer.lora_B) for p in sub.parameters()]


def loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def test_adapter_tensors_are_one_layer_named_as_the_wrapped_module() -> None:
    model, _ = lora_model("gpt2", lora_bias=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = resolve_layers(model, {"*attn.c_attn": 2.0, "*": 1.0}, params=trainable)
    assert [(layer.name, layer.speed) for layer in layers] == [(C_ATTN, 2.0), (C_FC, 1.0)]
    a = dict(model.named_modules())[C_ATTN]
    assert layers[0].params == (a.lora_A["default"].weight, a.lora_B["default"].weight, a.lora_B["default"].bias)
    # every parameter: the frozen base layers keep their own names
    names = [layer.name for layer in resolve_layers(model, {"*": 1.0})]
    assert C_ATTN in names and C_ATTN + ".base_layer" in names
    assert not [n for n in names if "lora_" in n]


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_speed_bounds_the_joint_step_of_A_and_B(mode: str) -> None:
    model, _ = lora_model("gpt2", lora_dropout=0.0)
    model.train()
    lr, C = 0.01, 3.0
    base = torch.optim.AdamW if mode == "update" else torch.optim.SGD
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SLOptimizer(base(trainable, lr=lr), model=model, speeds={"*attn.c_attn": C}, mode=mode)
    assert opt.layer_names == [C_ATTN]
    for step in range(3):
        before = {name: [p.detach().clone() for p in adapter_params(model, name)] for name in (C_ATTN, C_FC)}
        loss(model, step).backward()
        opt.step()
        opt.zero_grad()
        moved = {name: torch.stack([(p - q).detach().norm() for p, q in zip(adapter_params(model, name), before[name])])
                 for name in before}
        assert float(moved[C_ATTN].norm()) == pytest.approx(lr * C, rel=1e-6)  # A and B together ...
        if step > 0:  # ... both moving (at step 0 B = 0, so A has no gradient)
            assert float(moved[C_ATTN].min()) > 1e-3 * lr * C
        assert float(moved[C_FC].norm()) != pytest.approx(lr * C, rel=1e-2)  # no speed: untouched


def test_promote_names_the_wrapped_module() -> None:
    model, _ = lora_model("gpt2")
    assert promote(model, C_FC, 10.0) == {C_FC: 10.0, "*": 0.1}
    assert promote_lowest(model, {C_ATTN: 0.9, C_FC: 0.2}, 10.0) == {C_FC: 10.0, "*": 0.1}
    with pytest.raises(ValueError, match="Unknown layer"):
        promote(model, C_FC + ".lora_A.default", 10.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    layers = resolve_layers(model, promote(model, C_FC, 10.0), params=trainable)
    assert {layer.name: layer.speed for layer in layers} == {C_ATTN: 0.1, C_FC: 10.0}
