"""K on the models people train: compiled models, checkpointing, unused layers, RNG, snapshots."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import diagnostics.vjps as vjps
from diagnostics import NFAMonitor, ptk_covariance
from diagnostics.memory import PASS_BYTES, estimate_memory

from test_diag_ptk import reference_K, rel_err


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def probe(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_gives_eager_records_without_recompiling(backend: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, x = mlp(), probe()
    ref = reference_K(model, x, ["0", "2", "4"])
    compiled = torch.compile(model, backend=backend)
    before = NFAMonitor(compiled)  # created before the first compiled call
    compiled(x).sum().backward()
    compiled(x)
    graphs = counters["stats"]["unique_graphs"]
    after = NFAMonitor(compiled)  # created after it
    for mon in (before, after):
        assert mon.layer_names == ["0", "2", "4"]
        res = mon.measure(x, keep_matrices=True)
        for name, rec in res.items():
            assert rec.n_samples == 12 and rel_err(rec.K, ref[name]) < 1e-9, (name, rec.K.norm())
    with NFAMonitor(model) as eager:
        eager_res = eager.measure(x)
    assert {n: r.uc_nfa for n, r in res.items()} == pytest.approx({n: r.uc_nfa for n, r in eager_res.items()})
    compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs  # measuring did not recompile the user's model
    # a compiled submodule and Module.compile() in place keep the user's names too
    inner = mlp()
    inner[2] = torch.compile(inner[2], backend=backend)
    inner.compile(backend=backend)
    K = ptk_covariance(inner, x)
    assert set(K) == {"0", "2", "4"} and all(rel_err(K[n], ref[n]) < 1e-9 for n in K)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- unused layers


class TwoHeads(nn.Module):
    """``main`` reaches the output; ``aux`` does not unless ``use_aux``."""

    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.main, self.aux = nn.Linear(5, 6), nn.Linear(6, 2), nn.Linear(6, 3)
        self.detach = detach

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        if self.detach:
            h = h.detach()
        return {"main": self.main(h), "aux": self.aux(h)}


def test_layer_that_does_not_reach_the_outputs_is_an_error_unless_allowed() -> None:
    model, x = TwoHeads().double(), probe()
    main_only = lambda out: out["main"]  # noqa: E731
    with pytest.raises(ValueError, match=r"layers \['aux'\].*gradient is None.*output_fn.*allow_unused=True"):
        ptk_covariance(model, x, output_fn=main_only)
    with NFAMonitor(model) as mon:
        with pytest.raises(ValueError, match=r"\['aux'\]"):
            mon.measure(x, output_fn=main_only)
        res = mon.measure(x, output_fn=main_only, allow_unused=True, keep_matrices=True)
    assert torch.count_nonzero(res["aux"].K) == 0 and res["aux"].n_samples == 12
    assert torch.count_nonzero(res["main"].K) > 0
    with pytest.raises(ValueError, match=r"layers \['body'\].*detached"):
        ptk_covariance(TwoHeads(detach=True).double(), x, layers=["body", "main"], output_fn=main_only)


class SharedEncoder(nn.Module):
    """``enc`` is called twice, once per branch; ``output_fn`` keeps the ``main`` branch only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.head, self.other = nn.Linear(5, 6), nn.Linear(6, 2), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self.head(torch.tanh(self.enc(x))), "aux": self.other(torch.tanh(self.enc(2 * x)))}


def test_layer_called_twice_with_one_call_reaching_the_outputs_is_measured() -> None:
    """K of ``enc``: the first call's per-sample Jacobian Grams (torch.func.jacrev) over N = 2B rows (the
    second call's rows have zero gradient); the same with allow_unused=True."""
    from torch.func import jacrev

    model, x = SharedEncoder().double(), probe()
    main_only = lambda out: out["main"]  # noqa: E731
    with torch.no_grad():
        h = model.enc(x)
    J = torch.stack([jacrev(lambda r: model.head(torch.tanh(r)))(row) for row in h])  # (B, 2, 6)
    expected = torch.einsum("bci,bcj->ij", J, J) / (2 * x.shape[0])
    for allow in (False, True):
        K = ptk_covariance(model, x, layers=["enc", "head"], output_fn=main_only, allow_unused=allow)
        assert rel_err(K["enc"], expected) < 1e-12
    with pytest.raises(ValueError, match=r"layers \['other'\]"):
        ptk_covariance(model, x, layers=["enc", "other"], output_fn=main_only)


# ----------------------------------------------------------------------------- checkpointing


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.reentrant = reentrant  # None: no checkpointing

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.reentrant is not None:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.c(h)


def test_non_reentrant_checkpointing_is_exact() -> None:
    x = probe()
    ref = reference_K(Checkpointed(None).double(), x, ["a", "b", "c"])
    K = ptk_covariance(Checkpointed(False).double(), x, chunk_size=5)
    assert all(rel_err(K[n], ref[n]) < 1e-9 for n in ref)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpointing_raises_and_leaves_batched_vjps_on() -> None:
    x = probe()
    model = Checkpointed(True).double()
    with pytest.raises(ValueError, match=r"layers \['b'\] ran with gradients disabled.*use_reentrant=False"):
        ptk_covariance(model, x)  # input of the checkpoint requires grad
    with pytest.raises(ValueError, match=r"\['b'\] ran with gradients disabled"):
        ptk_covariance(model, x, layers=["b", "c"])  # ... and when it does not
    with pytest.raises(RuntimeError, match="use_reentrant"):
        ptk_covariance(model, x, layers=["a"])  # autograd.grad cannot go through a reentrant checkpoint
    assert vjps.BATCHED_VJP is True
    K = ptk_covariance(model, x, layers=["c"])  # layers after the checkpoint are fine
    assert rel_err(K["c"], reference_K(Checkpointed(None).double(), x, ["c"])["c"]) < 1e-9


class _ItemBackward(torch.autograd.Function):
    """Doubles its input; the backward calls ``.item()``, which has no vmap batching rule."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * (2.0 if g.abs().max().item() >= 0 else 0.0)


def test_missing_batching_rule_falls_back_per_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"batched": 0, "looped": 0}
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["batched" if kwargs.get("is_grads_batched") else "looped"] += 1
        return grad(*args, **kwargs)

    model, x = mlp(), probe()
    ref = reference_K(model, x, ["0", "2"])
    odd = nn.Sequential(model[0], model[1], model[2], model[3])
    odd.append(type("Item", (nn.Module,), {"forward": lambda self, h: _ItemBackward.apply(h)})())
    odd.append(model[4])
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    K = ptk_covariance(odd, x, layers=["0", "2"], chunk_size=4)
    assert calls["batched"] == 1 and calls["looped"] > 0  # one failed batched try, then the loop
    for n in ("0", "2"):  # the doubling of the custom function: K x 4
        assert rel_err(K[n], 4 * ref[n]) < 1e-9
    calls.update(batched=0, looped=0)
    ptk_covariance(model, x, chunk_size=4)
    assert calls["batched"] > 0 and calls["looped"] == 0  # the next measurement is batched again


# ----------------------------------------------------------------------------- RNG state


def _train(measure: bool, estimator: str = "sketch") -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    X, Y = torch.randn(64, 5), torch.randn(64, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = NFAMonitor(model)
    for step in range(20):
        loss = nn.functional.mse_loss(model(X), Y)
        opt.zero_grad()
        loss.backward()
        if measure and step % 5 == 0:
            mon.measure(X[:16], estimator=estimator, m=4)
        opt.step()
    return nn.functional.mse_loss(model(X), Y).item()


def test_measuring_never_touches_the_global_rng() -> None:
    assert _train(measure=True) == _train(measure=False)
    model, x = mlp(), probe()
    state = torch.get_rng_state()
    a = ptk_covariance(model, x, estimator="sketch", m=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = ptk_covariance(model, x, estimator="sketch", m=3, generator=engine_seed())
    assert all(torch.equal(a[n], b[n]) for n in a)  # generator=None is the documented default seed
    assert torch.equal(torch.get_rng_state(), state)


def engine_seed() -> int:
    from diagnostics.ptk import DEFAULT_SKETCH_SEED

    return DEFAULT_SKETCH_SEED


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measuring_never_touches_the_cuda_rng() -> None:
    model, x = mlp().cuda(), probe().cuda()
    state = torch.cuda.get_rng_state()
    K = ptk_covariance(model, x, estimator="sketch", m=3)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    K_int = ptk_covariance(model, x, estimator="sketch", m=3, generator=engine_seed())
    assert all(torch.equal(K[n], K_int[n]) for n in K)


# ----------------------------------------------------------------------------- snapshot files


def test_snapshot_gets_the_umask_mode(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        with NFAMonitor(mlp()) as mon:
            mon.measure(probe())
            mon.save(tmp_path / "snap.safetensors")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "snap.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["plain", "snap.safetensors"]


# ----------------------------------------------------------------------------- padding


def test_right_padded_gpt2_equals_unpadded_sequences() -> None:
    pytest.importorskip("transformers")
    from test_diag_gpt2 import tiny_gpt2

    model = tiny_gpt2()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj", "lm_head"]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 11, (n,), generator=g) for n in (4, 2, 3)]
    ids = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    # reference: each sequence alone without padding, K weighted by its number of tokens
    refs = [reference_K(model, s[None], names) for s in seqs]
    ref = {n: sum(len(s) * r[n] for s, r in zip(seqs, refs)) / 9 for n in names}
    with NFAMonitor(model, layers=names) as mon:
        res = mon.measure({"input_ids": ids, "attention_mask": mask}, keep_matrices=True, chunk_size=2)
        unmasked = mon.measure({"input_ids": ids, "attention_mask": mask}, keep_matrices=True, sample_mask=False)
    for n in names:
        assert res[n].n_samples == 9 and rel_err(res[n].K, ref[n]) < 1e-9, n
        assert unmasked[n].n_samples == 12
        if n != "lm_head":  # the output layer's K is I whatever the samples
            assert rel_err(unmasked[n].K, ref[n]) > 1e-3
    # the same mask given as sample_mask on a plain tensor probe (GPT-2 then attends to the padding,
    # which only later positions see: right padding leaves the real tokens' outputs unchanged)
    K = ptk_covariance(model, ids, layers=names, sample_mask=mask.bool())
    assert all(rel_err(K[n], ref[n]) < 1e-9 for n in names)


class ValueHead(nn.Module):
    """A causal token model with one scalar output per token ``(B, T, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.body, self.value = nn.Embedding(11, 5), nn.Linear(5, 6), nn.Linear(6, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.body(self.emb(input_ids)))
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]  # position t sees tokens <= t
        return self.value(h)


def test_per_token_scalar_outputs_under_a_mask() -> None:
    """``(B, T, 1)`` outputs are masked per token (K of the sequences alone, jacrev); ``(B, T)`` outputs,
    the mask's own shape, are refused with an error naming the ways out."""
    model = ValueHead().double()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 11, (n,), generator=g) for n in (4, 2, 3)]
    ids, mask = torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    refs = [reference_K(model, s[None], ["body"]) for s in seqs]
    ref = sum(len(s) * r["body"] for s, r in zip(seqs, refs)) / 9
    probe_ = {"input_ids": ids, "attention_mask": mask}
    assert rel_err(ptk_covariance(model, probe_, layers=["body"])["body"], ref) < 1e-10
    with pytest.raises(ValueError, match=r"shape \(3, 4\), the shape of the sample mask.*\(batch, tokens, 1\).*sample_mask=False"):
        ptk_covariance(model, probe_, layers=["body"], output_fn=lambda out: out[..., 0])
    with NFAMonitor(model, layers=["body"]) as mon, pytest.raises(ValueError, match="sample_mask=False"):
        mon.measure(probe_, output_fn=lambda out: out[..., 0], estimator="sketch")
    unmasked = ptk_covariance(model, probe_, layers=["body"], output_fn=lambda out: out[..., 0], sample_mask=False)
    assert rel_err(unmasked["body"], ref) > 1e-3  # every position counts, as asked


def test_sample_mask_checks() -> None:
    model, x = mlp(), probe(4)
    seq = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    xs = torch.randn(4, 3, 5, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]])
    K = ptk_covariance(seq, xs, sample_mask=keep)
    rows = xs[keep.bool()]  # per-token model: the kept tokens alone give the same K
    ref = reference_K(seq, rows, ["0", "2"])
    assert all(rel_err(K[n], ref[n]) < 1e-9 for n in ref)
    with pytest.raises(ValueError, match=r"sample_mask must have shape \(batch, tokens\) with batch = 4"):
        ptk_covariance(seq, xs, sample_mask=keep[:2])
    with pytest.raises(ValueError, match="0/1"):
        ptk_covariance(seq, xs, sample_mask=keep * 2.5)
    with pytest.raises(ValueError, match=r"output of layer '0' has shape \(\d+, 3, 6\).*\(\d+, 7\).*sample_mask=False"):
        ptk_covariance(seq, xs, sample_mask=torch.ones(4, 7))
    K_mlp = ptk_covariance(model, x, sample_mask=torch.ones(4, 7))  # per-sample rows: the mask does not apply
    assert all(torch.equal(K_mlp[n], ptk_covariance(model, x)[n]) for n in K_mlp)
    with pytest.raises(TypeError, match="sample_mask"):
        ptk_covariance(model, x, sample_mask="attention_mask")


class _TokensFirst(nn.Module):
    """Takes (batch, tokens, d) and runs its layers on (tokens, batch, d), as sequence-first models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("chunk_size", [None, 3, 4, 8])
def test_square_chunks_cannot_read_a_tokens_first_layer_transposed(chunk_size) -> None:
    # batch == tokens == 3: a (tokens, batch) layer output has the mask's shape; it must be an error,
    # never the mask applied transposed
    xs = torch.randn(3, 3, 5, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"output of layer 'body.0' has shape .*per-token tensors must be \(batch, tokens"):
        ptk_covariance(_TokensFirst(), xs, layers=["body.0"], sample_mask=keep, chunk_size=chunk_size)
    # the same sizes on a batch-first model stay exact
    seq = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    K = ptk_covariance(seq, xs, sample_mask=keep, chunk_size=chunk_size)
    ref = reference_K(seq, xs[keep.bool()], ["0", "2"])
    assert all(rel_err(K[n], ref[n]) < 1e-9 for n in ref)


# ----------------------------------------------------------------------------- memory


def _peak_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs (``benchmarks/memory_use.py``)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_use.py"
    spec = importlib.util.spec_from_file_location("benchmarks_memory_use", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_bytes(fn)


@pytest.mark.parametrize(
    "widths, dtype, power, keep, blocks",
    [
        ((384,), torch.float32, 1.0, False, None),
        ((384,), torch.float32, 0.5, True, None),
        ((160, 384), torch.float64, 1.0, True, None),
        ((384, 160, 256), torch.bfloat16, 1.0, False, None),
        ((384,), torch.float32, 1.0, True, {"2": 3}),
    ],
)
def test_memory_estimate_bounds_what_measure_allocates(
    monkeypatch: pytest.MonkeyPatch, widths: tuple[int, ...], dtype: torch.dtype, power: float, keep: bool,
    blocks: dict | None,
) -> None:
    import diagnostics.correlation as correlation
    import diagnostics.nfa as nfa

    for module in (correlation, nfa):  # small float64 blocks: the matrices dominate
        monkeypatch.setattr(module, "CORR_BLOCK", 1024)
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(8, 64), nn.Tanh()]
    for a, b in zip((64, *widths), (*widths, 64)):
        mods += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(64, 2)).to(dtype)
    names = [str(2 * i) for i in range(1, len(widths) + 2)]
    x = torch.randn(4, 8, dtype=dtype)
    NFAMonitor(model, layers=names, agop_power=power, blocks=blocks).measure(x, keep_matrices=keep)  # warm-up
    mon = NFAMonitor(model, layers=names, agop_power=power, blocks=blocks)  # fresh: no earlier K to free
    records: list = []
    peak = _peak_bytes(lambda: records.append(mon.measure(x, keep_matrices=keep)))
    estimate = mon.memory_estimate["total"] if keep else estimate_memory(mon.adapters, agop_power=power)["total"]
    slack = 2**18  # the forward/backward passes of the tiny probe are not part of the estimate
    assert peak - slack <= estimate <= 1.25 * peak, (peak, estimate)
    K_peak = _peak_bytes(lambda: ptk_covariance(model, x, layers=names))
    K_estimate = estimate_memory(mon.adapters, summary=False)["total"]
    assert K_peak - slack <= K_estimate <= 1.25 * K_peak, (K_peak, K_estimate)


def test_memory_guard_reports_the_estimate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 300))
    with pytest.raises(ValueError, match=r"'2' \(k=300, d=8, ~[\d.]+ MiB\).*about [\d.]+ MiB.*max_k"):
        NFAMonitor(model, max_k=7)  # with max_k=256 '2' would wait for measure(): it may return the model output
    est = NFAMonitor(model).memory_estimate
    # one float32 layer with k = 300: float64 sum, scratch, K, and the k x k kernel-alignment term
    assert est["2"] >= (8 + 4 + 4) * 300 * 300 and est["total"] >= est["2"]
    budget = PASS_BYTES + est["0"] + 2**10  # layer '0' fits, layer '2' does not even alone
    with pytest.raises(ValueError, match=rf"layer '2' \(.*k=300.*\) alone needs about [\d.]+ MiB .* more than max_memory={budget}"):
        NFAMonitor(model, max_memory=budget)
    with pytest.raises(ValueError, match=rf"layer '2' .* more than max_memory={budget}"):
        ptk_covariance(model, torch.randn(3, 4), max_memory=budget)
    mon = NFAMonitor(model, max_memory=est["total"] + PASS_BYTES)
    assert mon.memory_estimate == est and mon.groups == [["0", "2"]]


@pytest.mark.parametrize(
    "k, d, dtype, power, keep",
    [
        (1, 300, torch.float32, 1.0, False),  # k x k route: rows of w entries as large as the blocks
        (3, 700, torch.float32, 1.0, False),  # several column blocks
        (4, 500, torch.float64, 1.0, False),
        (40, 60, torch.float32, 1.0, False),
        (60, 40, torch.float32, 1.0, False),  # d x d route: k > d, k = d, power 0.5, kept matrices
        (50, 50, torch.float64, 1.0, False),
        (30, 50, torch.float32, 0.5, False),
        (30, 50, torch.float32, 1.0, True),
    ],
)
def test_summary_memory_bounds_what_nfa_summary_allocates(
    monkeypatch: pytest.MonkeyPatch, k: int, d: int, dtype: torch.dtype, power: float, keep: bool
) -> None:
    import diagnostics.correlation as correlation
    import diagnostics.nfa as nfa
    import diagnostics.output_space as output_space

    for module in (correlation, nfa):  # small float64 blocks: the matrices dominate
        monkeypatch.setattr(module, "CORR_BLOCK", 256)
    monkeypatch.setattr(output_space, "COLUMN_BLOCK", 1024)
    torch.manual_seed(0)
    J = torch.randn(k, 2 * k, dtype=torch.float64)
    K = (J @ J.t() / (2 * k)).to(dtype)
    W0 = torch.randn(k, d, dtype=dtype)
    W = W0 + 0.1 * torch.randn(k, d, dtype=dtype)
    out: list = []
    peak = _peak_bytes(lambda: out.append(nfa.nfa_summary(W, W0, K, "pearson", power, keep)))
    estimate = nfa.summary_memory(k, d, W.element_size(), power, keep, W.device)
    assert peak - 2**8 <= estimate <= 1.5 * peak, (peak, estimate)  # 2**8: the record's scalars
