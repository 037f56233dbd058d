"""Tiny GPT-2 (Conv1D layers, tokens as samples): exact K against the jacrev reference."""

from __future__ import annotations

import pytest
import torch

from diagnostics import NFAMonitor, find_linear_layers, layer_jacobians, ptk_covariance

transformers = pytest.importorskip("transformers")

from test_diag_ptk import reference_K, rel_err  # noqa: E402


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_conv1d_detected_and_transposed() -> None:
    model = tiny_gpt2()
    layers = find_linear_layers(model)
    assert "transformer.h.0.attn.c_attn" in layers and "lm_head" in layers
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.kind == "conv1d" and attn.weight_matrix().shape == (48, 16)
    assert torch.equal(attn.weight_matrix(), attn.module.weight.t())


def test_gpt2_exact_K_matches_reference_and_sketch_is_close() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    names = list(find_linear_layers(model))
    K = ptk_covariance(model, ids, chunk_size=2)
    ref = reference_K(model, ids, names)
    for n in names:
        assert rel_err(K[n], ref[n]) < 1e-9, n
    # tokens are the samples: dict probe (keyword arguments) gives the same K
    K_dict = ptk_covariance(model, {"input_ids": ids}, layers=["transformer.h.0.mlp.c_fc"])
    assert rel_err(K_dict["transformer.h.0.mlp.c_fc"], K["transformer.h.0.mlp.c_fc"]) < 1e-12
    S = ptk_covariance(model, ids, estimator="sketch", m=64, generator=torch.Generator().manual_seed(0))
    for n in names:
        assert rel_err(S[n], K[n]) < 0.35, n
    X, G = layer_jacobians(model, ids, ["transformer.h.0.mlp.c_proj"])["transformer.h.0.mlp.c_proj"]
    assert X.shape == (12, 64) and G.shape == (4 * 11, 12, 16)


def test_gpt2_monitor_records() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 11, (2, 5))
    with NFAMonitor(model, layers=["transformer.h.0.*"]) as mon:
        res = mon.measure({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, estimator="sketch", m=8)
    assert set(res) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    rec = res["transformer.h.0.mlp.c_fc"]
    assert rec.n_samples == 10 and rec.estimator == "sketch" and rec.m == 8
    assert -1 <= rec.uc_nfa <= 1
