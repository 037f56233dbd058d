"""Tiny GPT-2 (Conv1D layers, tokens as samples): exact K against the jacrev reference."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics import NFAMonitor, find_linear_layers, layer_jacobians, ptk_covariance
from diagnostics.layers import Conv1DAdapter
from diagnostics.nfa import nfa_summary

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
    assert isinstance(attn, Conv1DAdapter) and attn.weight_matrix().shape == (48, 16)
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


def ln_f_exact_K(ln: torch.nn.LayerNorm, x: torch.Tensor, W_head: torch.Tensor) -> torch.Tensor:
    """Exact K of a layer whose output h enters ``logits = W_head ln(r + h)`` token by token (float64).

    With ``J = d ln(x)/dx = diag(gamma) P / s``, ``P = I - (1 1^T + xh xh^T)/d`` (``xh`` the normalised
    input, ``s`` its standard deviation), ``K = (1/N) sum_tokens J^T W_head^T W_head J``."""
    x = x.double().reshape(-1, x.shape[-1])
    n, d = x.shape
    gamma = ln.weight.detach().double()
    s = (x.var(dim=-1, unbiased=False) + ln.eps).sqrt()
    xh = (x - x.mean(dim=-1, keepdim=True)) / s[:, None]
    Wh = W_head.detach().double()
    M = gamma[:, None] * (Wh.t() @ Wh) * gamma[None, :]
    w = s.pow(-2)
    B = torch.stack([torch.ones_like(xh), xh], dim=-1)  # (n, d, 2)
    S = torch.einsum("n,nai,nbi->ab", w, B, B)
    Q = torch.einsum("nai,ab,nbj->nij", B, M, B) * w[:, None, None]
    T = torch.einsum("nai,nij,nbj->ab", B, Q, B)
    return (w.sum() * M - (S @ M + M @ S) / d + T / d**2) / n


def test_ln_f_exact_K_matches_jacrev() -> None:
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x, W = torch.randn(5, 6, dtype=torch.float64), torch.randn(9, 6, dtype=torch.float64)
    J = torch.func.vmap(torch.func.jacrev(ln))(x)  # (5, 6, 6)
    ref = torch.einsum("nji,jk,nkl->il", J, W.t() @ W, J) / 5
    torch.testing.assert_close(ln_f_exact_K(ln, x, W), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_gpt2_small_default_layers_sketch() -> None:
    """GPT-2 small (124M, vocab 50257) from its config: every block layer and the LM head, sketch m=8
    on 4 x 128 tokens; the LM head and the last MLP projection checked against exact K."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    mon = NFAMonitor(model)
    assert len(mon.adapters) == 12 * 4 + 1 and mon.adapters["lm_head"].k == 50257
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(0))
    captured: list[torch.Tensor] = []
    handle = model.transformer.ln_f.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    rec = mon.measure(ids, estimator="sketch", m=8, generator=0, keep_matrices=True)
    handle.remove()
    assert all(r.n_samples == 512 and math.isfinite(r.uc_nfa) and math.isfinite(r.c_nfa) for r in rec.values())
    head = rec["lm_head"]
    assert head.estimator == "analytic" and head.K is None and head.nfm.shape == (768, 768)
    # exact estimator on the head: K = I without any VJP, the same record
    exact_head = NFAMonitor(model, layers=["lm_head"], W0=mon.W0).measure(ids, estimator="exact")["lm_head"]
    for key in ("uc_nfa", "c_nfa", "rel_change", "kernel_alignment"):
        assert getattr(exact_head, key) == getattr(head, key)
    assert head.uc_nfa == pytest.approx(1, abs=1e-6) and head.c_nfa == pytest.approx(1, abs=1e-6)
    # the last MLP projection feeds the head through ln_f only: exact K in closed form
    name = "transformer.h.11.mlp.c_proj"
    K = ln_f_exact_K(model.transformer.ln_f, torch.cat(captured), model.lm_head.weight)
    S = rec[name].K.double()
    # unbiased with the sketch's own spread: per entry Var ~ (K_ii K_jj + K_ij^2) / (m N), so
    # E|S - K|_F^2 ~ ((tr K)^2 + |K|_F^2) / (m N); the trace (the scale, and N) is far more precise
    spread = math.sqrt((K.trace() ** 2 + K.norm() ** 2) / (8 * 512)) / K.norm()
    assert 0.5 * spread < rel_err(S, K) < 1.5 * spread
    assert abs(S.trace() / K.trace() - 1) < 0.01
    W, W0 = mon.adapters[name].weight_matrix().detach().double(), mon.W0[name].double()
    ref, from_sketch = nfa_summary(W, W0, K), nfa_summary(W, W0, S)
    assert rec[name].rel_change == pytest.approx(ref["rel_change"], rel=1e-5)
    for key in ("nfm_init", "nfm_cross", "nfm_centered"):  # float32 norms of 3072 x 3072 matrices: ~4e-4
        assert rec[name].norms[key] == pytest.approx(ref["norms"][key], rel=2e-3)
    for key in ("uc_nfa", "c_nfa", "kernel_alignment"):
        assert getattr(rec[name], key) == pytest.approx(from_sketch[key], abs=1e-4)
        # m = 8 on 512 tokens of a 768-wide layer: the noise in K lowers the correlations
        assert 0 < ref[key] - getattr(rec[name], key) < 0.1, key
