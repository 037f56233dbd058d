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


C_ATTN = "transformer.h.0.attn.c_attn"


def test_c_attn_blocks_are_diagonal_blocks_of_K(tmp_path) -> None:
    from diagnostics import load_snapshot, nfa_correlation

    model = tiny_gpt2()
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    W0 = model.transformer.h[0].attn.c_attn.weight.detach().t().clone()  # Conv1D stores W^T: (in, out)
    mon = NFAMonitor(model, layers=C_ATTN, blocks={"transformer.h.*.attn.c_attn": ["q", "k", "v"]})
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(0.05 * torch.randn(16, 48, generator=torch.Generator().manual_seed(1)))
    ref = reference_K(model, ids, [C_ATTN])[C_ATTN]  # (48, 48), perturbing the whole packed output
    res = mon.measure(ids, keep_matrices=True)
    assert list(res) == [C_ATTN, f"{C_ATTN}[q]", f"{C_ATTN}[k]", f"{C_ATTN}[v]"]
    W = model.transformer.h[0].attn.c_attn.weight.detach().t()
    for i, label in enumerate("qkv"):
        rows = slice(16 * i, 16 * (i + 1))
        rec = res[f"{C_ATTN}[{label}]"]
        K_bb, W_b, dW_b = ref[rows, rows], W[rows], (W - W0)[rows]
        assert rel_err(rec.K, K_bb) < 1e-9 and rec.n_samples == 12
        assert rel_err(rec.agop, W_b.t() @ K_bb @ W_b) < 1e-9
        assert rec.uc_nfa == pytest.approx(float(nfa_correlation(W_b, K_bb)), abs=1e-9)
        assert rec.c_nfa == pytest.approx(float(nfa_correlation(dW_b, K_bb)), abs=1e-9)
        assert rec.rel_change == pytest.approx(float(dW_b.norm() / W_b.norm()), rel=1e-9)
    mon.save(tmp_path / "blocks.safetensors")
    snap = load_snapshot(tmp_path / "blocks.safetensors")
    assert snap.layers == list(res)
    mats = snap.matrices[f"{C_ATTN}[k]"]
    assert torch.equal(mats["W"], W[16:32]) and torch.equal(mats["W0"], W0[16:32])
    assert torch.equal(mats["K"], res[f"{C_ATTN}[k]"].K) and snap.records[f"{C_ATTN}[k]"].c_nfa == res[f"{C_ATTN}[k]"].c_nfa
    mon.detach()

    # per head: n equal blocks "[0]".."[n-1]"; or {label: rows}
    with NFAMonitor(model, layers=C_ATTN, blocks={C_ATTN: 6}) as heads:
        per_head = heads.measure(ids, keep_matrices=True)
    assert list(per_head)[1:] == [f"{C_ATTN}[{i}]" for i in range(6)]
    assert rel_err(per_head[f"{C_ATTN}[4]"].K, ref[32:40, 32:40]) < 1e-9
    with NFAMonitor(model, layers=C_ATTN, blocks={C_ATTN: {"q": 16, "kv": 32}}) as sized:
        kv = sized.measure(ids, keep_matrices=True)[f"{C_ATTN}[kv]"]
    assert rel_err(kv.K, ref[16:, 16:]) < 1e-9


@pytest.mark.parametrize(
    "blocks, error, match",
    [
        ({C_ATTN: 5}, ValueError, r"k=48 output rows, which do not split into 5 equal blocks"),
        ({"*.mlp.*": 2}, ValueError, r"blocks pattern '\*.mlp.\*' matches no measured layer"),
        ({C_ATTN: ["q", "q", "v"]}, ValueError, "distinct"),
        ({C_ATTN: {"q": 16, "k": 16}}, ValueError, "cover 32 rows but the layer has k=48"),
        ({C_ATTN: 3, "*.c_attn": 3}, ValueError, "matches the blocks patterns"),
        ({C_ATTN: "qkv"}, TypeError, "an int, a list of labels or a dict"),
        (["q", "k", "v"], TypeError, "blocks must be a dict"),
    ],
)
def test_bad_blocks(blocks, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        NFAMonitor(tiny_gpt2(), layers=C_ATTN, blocks=blocks)
