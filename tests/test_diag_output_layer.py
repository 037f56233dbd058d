"""Layers that return the model output: K = I analytically, never formed, same records as exact K."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics import NFAMonitor, matrix_correlation, ptk_covariance
from diagnostics import LayerHooks, engine
from diagnostics.nfa import nfa_summary
from diagnostics.output_layer import identity_kernel_alignment, output_layer_summary

transformers = pytest.importorskip("transformers")


def tiny_lm(vocab: int = 13) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=8, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def assert_record_matches(rec, W: torch.Tensor, W0: torch.Tensor, K: torch.Tensor, method: str, power: float) -> None:
    ref = nfa_summary(W, W0, K, method, power)
    for key in ("uc_nfa", "c_nfa", "rel_change", "kernel_alignment"):
        assert getattr(rec, key) == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    for key, value in ref["norms"].items():
        assert rec.norms[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    torch.testing.assert_close(rec.agop, ref["agop"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rec.nfm, ref["nfm"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method,power", [("pearson", 1.0), ("cosine", 0.5)])
def test_lm_head_with_tied_weights_matches_exact_K(method: str, power: float) -> None:
    model = tiny_lm()
    assert model.lm_head.weight is model.transformer.wte.weight  # GPT-2 ties the head to the embedding
    ids = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # right padding
    probe = {"input_ids": ids, "attention_mask": mask}
    mon = NFAMonitor(model, correlation=method, agop_power=power)
    W0 = {n: w.clone() for n, w in mon.W0.items()}
    perturb(model)
    rec = mon.measure(probe, keep_matrices=True, chunk_size=2)
    K = ptk_covariance(model, probe, chunk_size=2)  # exact estimator, every layer, k x k
    torch.testing.assert_close(K["lm_head"], torch.eye(13, dtype=torch.float64), rtol=0, atol=1e-12)
    for name, adapter in mon.adapters.items():
        W = adapter.weight_matrix().detach()
        assert_record_matches(rec[name], W, W0[name], K[name], method, power)
    head = rec["lm_head"]
    assert head.estimator == "analytic" and head.m is None and torch.equal(head.K, torch.eye(13, dtype=torch.float64))
    exact = NFAMonitor(model, layers=["transformer.h.0.mlp.c_fc"]).measure(probe, chunk_size=2)
    assert head.n_samples == exact["transformer.h.0.mlp.c_fc"].n_samples  # same rows as every other layer
    assert rec["transformer.h.0.mlp.c_fc"].estimator == "exact"


def test_vocab_larger_than_max_k_never_forms_k_by_k() -> None:
    model = tiny_lm(vocab=300)
    ids = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    mon = NFAMonitor(model, max_k=128)  # lm_head: k = 300 > max_k, d = 16
    perturb(model)
    rec = mon.measure(ids, estimator="sketch", m=4, generator=0, keep_matrices=True)
    head = rec["lm_head"]
    assert head.K is None and "lm_head" not in mon.last_K and head.nfm.shape == (16, 16)
    K = ptk_covariance(model, ids, layers=["lm_head"], max_k=None)["lm_head"]
    W = model.lm_head.weight.detach()
    assert_record_matches(head, W, mon.W0["lm_head"], K, "pearson", 1.0)
    # the sketch of the other layers is unaffected by leaving the head out of the VJPs
    others = NFAMonitor(model, layers=["transformer.h.*"], W0=mon.W0).measure(
        ids, estimator="sketch", m=4, generator=0, keep_matrices=True  # the same summary route as above
    )
    for name, r in others.items():
        assert r.uc_nfa == rec[name].uc_nfa and r.c_nfa == rec[name].c_nfa


class Scaled(nn.Module):
    """The readout's output modified in place after the layer returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).mul_(2.0)


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize(
    "model_fn,layer,output_fn",
    [
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), "2", lambda out: out * 2.0),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), "2", lambda out: out[:, :2]),
        (Scaled, "head", None),
        (Reused, "lin", None),
    ],
)
def test_only_the_unchanged_output_tensor_is_analytic(model_fn, layer, output_fn) -> None:
    torch.manual_seed(0)
    model = model_fn().double()
    x = torch.randn(7, 4, dtype=torch.float64)
    mon = NFAMonitor(model)
    perturb(model)
    rec = mon.measure(x, output_fn=output_fn, keep_matrices=True)[layer]
    assert rec.estimator == "exact"
    K = ptk_covariance(model, x, layers=[layer], output_fn=output_fn)[layer]
    assert not torch.allclose(K, torch.eye(K.shape[0], dtype=K.dtype))
    torch.testing.assert_close(rec.K, K, rtol=1e-12, atol=1e-14)


def test_plain_readout_is_analytic_and_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    mon = NFAMonitor(model)
    perturb(model)
    rec = mon.measure(x, keep_matrices=True)
    K = ptk_covariance(model, x)
    assert rec["2"].estimator == "analytic" and rec["0"].estimator == "exact"
    for name in ("0", "2"):
        assert_record_matches(rec[name], model.get_submodule(name).weight.detach(), mon.W0[name], K[name], "pearson", 1.0)


@pytest.mark.parametrize("method", ["pearson", "cosine"])
def test_identity_kernel_alignment_matches_dense(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    for k, d in ((9, 4), (3, 7), (1, 5)):
        W = torch.randn(k, d, generator=g, dtype=torch.float64) + 0.3
        dense = matrix_correlation(W @ W.t(), torch.eye(k, dtype=torch.float64), method)
        fast = identity_kernel_alignment(W, method)
        if torch.isnan(dense):
            assert torch.isnan(fast)
        else:
            assert float(fast) == pytest.approx(float(dense), rel=1e-12)
    W = torch.randn(6, 3, generator=g, dtype=torch.float64)
    W0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ref, got = nfa_summary(W, W0, torch.eye(6, dtype=torch.float64), method), output_layer_summary(W, W0, method)
    for key in ("uc_nfa", "c_nfa", "rel_change", "kernel_alignment"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12)
    assert got["norms"] == pytest.approx(ref["norms"], rel=1e-12)


def test_default_chunks_bound_outputs_by_tokens(monkeypatch) -> None:
    model = tiny_lm(vocab=50)
    ids = torch.randint(0, 50, (7, 6), generator=torch.Generator().manual_seed(0))
    adapters = NFAMonitor(model).adapters
    per_sample = 6 * (50 + sum(a.k for a in adapters.values())) * 8  # f plus every recorded output (float64)
    monkeypatch.setattr(engine, "CHUNK_BUDGET_BYTES", 3 * per_sample)
    monkeypatch.setattr(engine, "FIRST_CHUNK_SAMPLES", 1)
    sizes: list[int] = []
    hooks = LayerHooks(adapters)
    engine.for_each_chunk(model, hooks, ids, lambda chunk: sizes.append(chunk.f.shape[0]))
    assert sizes == [1, 3, 3]
    for chunk_size in (None, 7):
        rec = NFAMonitor(model).measure(ids, chunk_size=chunk_size)
        if chunk_size is None:
            by_memory = rec
    for name, r in rec.items():
        assert r.uc_nfa == pytest.approx(by_memory[name].uc_nfa, rel=1e-10)
        assert r.n_samples == by_memory[name].n_samples == 42


@pytest.mark.parametrize("method", ["pearson", "cosine"])
def test_output_layer_summary_in_row_blocks_gives_the_dense_values(monkeypatch, method: str) -> None:
    """Taken over blocks of rows (several forced, the last one shorter), the analytic summary equals the
    d x d route with K = I to 1e-12 in float64, also for a weight whose entries' mean dwarfs their spread."""
    import diagnostics.output_layer as output_layer

    g = torch.Generator().manual_seed(3)
    for k, d, base, scale in ((50, 7, 0.0, 1.0), (33, 12, 1.0, 1e-3), (9, 30, 0.3, 1.0)):
        monkeypatch.setattr(output_layer, "ROW_BLOCK", 4 * d)  # blocks of 4 rows
        W0 = base + scale * torch.randn(k, d, generator=g, dtype=torch.float64)
        W = W0 + 0.1 * scale * torch.randn(k, d, generator=g, dtype=torch.float64)
        eye = torch.eye(k, dtype=torch.float64)
        for power in (1.0, 0.5) if k > d else (1.0,):  # rank-deficient AGOP powers: eigh noise of the d x d route
            ref = nfa_summary(W, W0, eye, method, power, keep_matrices=True)
            got = output_layer_summary(W, W0, method, power, keep_matrices=False)
            for key in ("uc_nfa", "c_nfa", "rel_change", "kernel_alignment"):
                # power 1/2: eigh turns the rounding of G (summed from its terms on the d x d route) into ~1e-10
                tol = 1e-9 if power != 1 and key in ("uc_nfa", "c_nfa") else 1e-12
                assert got[key] == pytest.approx(ref[key], rel=tol), (k, d, power, key)
            assert got["norms"] == pytest.approx(ref["norms"], rel=1e-12)
            dense = matrix_correlation(W @ W.t(), eye, method)
            assert float(identity_kernel_alignment(W, method)) == pytest.approx(float(dense), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_layer_memory_bounds_what_the_summary_allocates(monkeypatch, dtype: torch.dtype) -> None:
    """A wide output layer (an LM head's shape, k >> d): the profiled peak of its summary is at most its
    estimate, and the estimate at most 1.25x the peak; no copy of the whole k x d weight is made."""
    import diagnostics.correlation as correlation
    from diagnostics.output_layer import output_layer_memory
    from test_diag_robust import _peak_bytes

    import diagnostics.output_layer as output_layer

    monkeypatch.setattr(correlation, "CORR_BLOCK", 1024)
    k, d = 20000, 48
    monkeypatch.setattr(output_layer, "ROW_BLOCK", 1000 * d, raising=False)
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(k, d, generator=g, dtype=dtype)
    W = W0 + 0.1 * torch.randn(k, d, generator=g, dtype=dtype)
    for method in ("pearson", "cosine"):
        peak = _peak_bytes(lambda: output_layer_summary(W, W0, method, keep_matrices=False))
        estimate = output_layer_memory(k, d, dtype.itemsize)
        assert peak <= estimate <= 1.25 * peak, (method, peak, estimate)
        assert peak < W.numel() * dtype.itemsize / 4  # not one whole copy of dW, let alone a float64 one
