"""peft LoRA layers measured as one layer each, against references that use peft's forward only.

The effective weight comes from the wrapper's forward on the basis vectors (``W[:, j] = h(e_j) - h(0)``),
``K`` from ``jacrev`` of the logits of each unpadded sequence with respect to a perturbation of the
wrapper's output, and the correlations from plain float64 torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diagnostics import LoraAdapter, NFAMonitor, find_linear_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 11


def gpt2() -> nn.Module:
    """Conv1D bases."""
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    """nn.Linear bases."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


MODELS = {
    "gpt2": (gpt2, ["c_attn", "c_fc"], ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]),
    "llama": (llama, ["q_proj", "up_proj"], ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]),
}
PREFIX = "base_model.model."


def lora_model(kind: str, seed: int = 0, **config) -> tuple[nn.Module, list[str]]:
    build, targets, names = MODELS[kind]
    torch.manual_seed(seed)
    base = build().double()
    config = {"r": 3, "lora_alpha": 6, "lora_dropout": 0.2, "target_modules": targets, **config}
    model = peft.get_peft_model(base, peft.LoraConfig(fan_in_fan_out=kind == "gpt2", **config))
    return model, [PREFIX + n for n in names]


def train_adapters(model: nn.Module, steps: int = 3, seed: int = 1) -> None:
    """A few AdamW steps on the trainable (adapter) parameters, in train mode (dropout on)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (4, 6), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


@torch.no_grad()
def weight_by_forward(model: nn.Module, name: str) -> torch.Tensor:
    """``W`` (out, in) of the affine map the wrapper computes, from its forward on ``0`` and the basis vectors."""
    layer = module(model, name)
    was = layer.training
    layer.eval()
    d = module(model, name).in_features
    x = torch.cat([torch.zeros(1, d), torch.eye(d)]).double()
    h = layer(x)
    layer.train(was)
    return (h[1:] - h[:1]).t()


def K_by_jacrev(model: nn.Module, seqs: list[torch.Tensor], name: str) -> torch.Tensor:
    """``K = sum over real tokens and logits of g g^T / N`` with ``g = d logit / d h``, each sequence alone."""
    layer = module(model, name)
    model.eval()
    total, n = 0, 0
    for s in seqs:
        with torch.no_grad():
            k = layer(torch.zeros(1, len(s), layer.in_features, dtype=torch.float64)).shape[-1]

        def logits(eps: torch.Tensor, s=s) -> torch.Tensor:
            handle = layer.register_forward_hook(lambda m, i, o: o + eps)
            try:
                return model(input_ids=s[None]).logits.reshape(-1)
            finally:
                handle.remove()

        J = torch.func.jacrev(logits)(torch.zeros(1, len(s), k, dtype=torch.float64))  # (C, 1, L, k)
        rows = J.reshape(J.shape[0], len(s), k)
        total = total + torch.einsum("cpk,cpl->kl", rows, rows)
        n += len(s)
    return total / n


def pearson(A: torch.Tensor, B: torch.Tensor) -> float:
    A, B = A.detach(), B.detach()
    a, b = A.reshape(-1) - A.mean(), B.reshape(-1) - B.mean()
    return float(a @ b / (a.norm() * b.norm()))


def padded(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def sequences(seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 3, 4)]


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_wrapper_is_one_layer_named_as_the_wrapped_module(kind: str) -> None:
    model, names = lora_model(kind)
    found = find_linear_layers(model)
    for name in names:
        assert isinstance(found[name], LoraAdapter)
    assert not [n for n in found if any(part in n for part in ("base_layer", "lora_A", "lora_B"))]
    pattern = "*attn.c_attn" if kind == "gpt2" else "*self_attn.q_proj"
    assert list(find_linear_layers(model, [pattern])) == names[:1]
    assert list(find_linear_layers(model, names[1])) == names[1:]


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_nfa_matches_references_before_and_after_training_with_padding(kind: str) -> None:
    model, names = lora_model(kind)
    model.eval()
    seqs = sequences()
    W0 = {n: weight_by_forward(model, n) for n in names}
    K0 = {n: K_by_jacrev(model, seqs, n) for n in names}
    with NFAMonitor(model, layers=names) as mon:
        first = mon.measure(padded(seqs), keep_matrices=True, chunk_size=2)
        train_adapters(model)
        after = mon.measure(padded(seqs), keep_matrices=True, chunk_size=2)
        weights = {n: mon.adapters[n].weight_matrix().detach() for n in names}
    for n in names:
        W, K = weight_by_forward(model, n), K_by_jacrev(model, seqs, n)
        assert (W - W0[n]).norm() > 1e-3 * W.norm(), "the adapters were trained"
        assert torch.allclose(weights[n], W, rtol=0, atol=1e-12)
        assert torch.allclose(mon.W0[n], W0[n], rtol=0, atol=1e-12)
        assert first[n].n_samples == after[n].n_samples == 12
        assert torch.allclose(first[n].K, K0[n], rtol=1e-9, atol=1e-12)
        assert first[n].uc_nfa == pytest.approx(pearson(W0[n].t() @ W0[n], W0[n].t() @ K0[n] @ W0[n]), abs=1e-9)
        assert math.isnan(first[n].c_nfa)  # B = 0 at creation: no update yet
        assert torch.allclose(after[n].K, K, rtol=1e-9, atol=1e-12)
        assert after[n].uc_nfa == pytest.approx(pearson(W.t() @ W, W.t() @ K @ W), abs=1e-9)
        dW = W - W0[n]
        assert after[n].c_nfa == pytest.approx(pearson(dW.t() @ dW, dW.t() @ K @ dW), abs=1e-9)
        assert after[n].rel_change == pytest.approx(float(dW.norm() / W.norm()), rel=1e-9)


@pytest.mark.parametrize("kind", list(MODELS))
def test_merged_adapters_give_the_same_numbers(kind: str) -> None:
    model, names = lora_model(kind, lora_dropout=0.0)
    mon = NFAMonitor(model, layers=names)
    train_adapters(model)
    probe = padded(sequences())
    unmerged = mon.measure(probe)
    weights = {n: mon.adapters[n].weight_matrix().detach().clone() for n in names}
    model.merge_adapter()
    assert all(module(model, n).merged for n in names)
    merged = mon.measure(probe)
    for n in names:
        assert torch.allclose(mon.adapters[n].weight_matrix(), weights[n], rtol=0, atol=1e-12)
        assert merged[n].uc_nfa == pytest.approx(unmerged[n].uc_nfa, abs=1e-9)
        assert merged[n].c_nfa == pytest.approx(unmerged[n].c_nfa, abs=1e-9)
    # disabled while merged: the forward unmerges and runs the base layer alone
    with model.disable_adapter():
        for n in names:
            base = weight_by_forward(model, n)
            assert torch.allclose(mon.adapters[n].weight_matrix(), base, rtol=0, atol=1e-12)
            assert (base - weights[n]).norm() > 1e-3 * base.norm()
    mon.detach()


@pytest.mark.parametrize("kind", list(MODELS))
def test_disabled_and_several_active_adapters(kind: str) -> None:
    model, names = lora_model(kind)
    train_adapters(model)
    _, targets, _ = MODELS[kind]
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets,
                                                fan_in_fan_out=kind == "gpt2", init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    for n in names:
        assert module(model, n).active_adapters == ["default", "second"]
        assert torch.allclose(LoraAdapter(n, module(model, n), find_linear_layers(model, n)[n].base).weight_matrix(),
                              weight_by_forward(model, n), rtol=0, atol=1e-12)
    seqs = sequences()
    with NFAMonitor(model, layers=names) as mon:
        rec = mon.measure(padded(seqs), keep_matrices=True)
        with model.disable_adapter():
            off = mon.measure(padded(seqs), keep_matrices=True)
            W_off = {n: weight_by_forward(model, n) for n in names}
    for n in names:
        W = weight_by_forward(model, n)
        assert torch.allclose(rec[n].K, K_by_jacrev(model, seqs, n), rtol=1e-9, atol=1e-12)
        assert rec[n].uc_nfa == pytest.approx(pearson(W.t() @ W, W.t() @ rec[n].K @ W), abs=1e-9)
        base = W_off[n]
        assert off[n].rel_change == pytest.approx(float((base - W).norm() / base.norm()), rel=1e-9)
        assert off[n].uc_nfa == pytest.approx(pearson(base.t() @ base, base.t() @ off[n].K @ base), abs=1e-9)


def test_other_tuners_and_lora_variants_are_refused() -> None:
    torch.manual_seed(0)
    ia3 = peft.get_peft_model(gpt2(), peft.IA3Config(target_modules=["c_attn", "c_fc"],
                                                     feedforward_modules=["c_fc"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"peft\.tuners\.ia3\..*other than LoRA"):
        find_linear_layers(ia3)
    with pytest.raises(ValueError, match=r"c_attn.*cannot be measured.*ia3"):
        find_linear_layers(ia3, ["*c_attn"])
    # the other layers can still be selected by name
    assert list(find_linear_layers(ia3, ["*attn.c_proj"])) == [PREFIX + "transformer.h.0.attn.c_proj"]
    dora, _ = lora_model("llama", use_dora=True)
    with pytest.raises(ValueError, match="DoraLinearVariant.*DoRA"):
        NFAMonitor(dora)


def test_mixed_batch_forward_is_refused() -> None:
    model, names = lora_model("llama", lora_dropout=0.0)
    ids = torch.randint(1, VOCAB, (2, 4))
    with NFAMonitor(model, layers=names) as mon:
        with pytest.raises(ValueError, match="adapter_names"):
            mon.measure({"input_ids": ids, "adapter_names": ["default", "__base__"]})


def test_peft_is_not_imported_by_the_packages() -> None:
    import subprocess
    import sys

    code = ("import sys, diagnostics, slo_torch, torch; from diagnostics import NFAMonitor; "
            "from slo_torch import SLOptimizer; m = torch.nn.Linear(2, 2); NFAMonitor(m); "
            "SLOptimizer(torch.optim.SGD(m.parameters(), lr=1), model=m, speeds={'*': 1.0}); "
            "assert not [n for n in sys.modules if n.split('.')[0] == 'peft'], 'peft imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
