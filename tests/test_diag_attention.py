"""nn.MultiheadAttention projections as layers: K against an independent float64 reference, outputs
unchanged while measuring, layer naming and selection."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from diagnostics import AttentionProjectionAdapter, LayerAdapter, NFAMonitor, find_linear_layers, layer_jacobians, ptk_covariance

from test_diag_ptk import rel_err

PROJ = ("q", "k", "v", "out_proj")


# ----------------------------------------------------------------------------- independent reference


def ref_mha(mha: nn.MultiheadAttention, xq, xk, xv, eps: dict, prefix: str, kpm=None) -> torch.Tensor:
    """One sample, no batch dimension: xq (L, E), xk (S, kdim), xv (S, vdim); eps[prefix.role] is added
    to each projection's pre-activation. Plain per-head attention, written independently of torch's."""
    E, H = mha.embed_dim, mha.num_heads
    hd = E // H
    if mha._qkv_same_embed_dim:
        Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    else:
        Wq, Wk, Wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q = xq @ Wq.T + bq + eps[f"{prefix}.q"]
    k = xk @ Wk.T + bk + eps[f"{prefix}.k"]
    v = xv @ Wv.T + bv + eps[f"{prefix}.v"]
    scores = torch.einsum("lhd,shd->hls", q.view(-1, H, hd), k.view(-1, H, hd)) / math.sqrt(hd)
    if kpm is not None:
        scores = scores.masked_fill(kpm, float("-inf"))
    a = torch.einsum("hls,shd->lhd", scores.softmax(-1), v.view(-1, H, hd)).reshape(-1, E)
    return a @ mha.out_proj.weight.T + mha.out_proj.bias + eps[f"{prefix}.out_proj"]


def reference_K(one_sample, samples: tuple, shapes: dict, tokens: torch.Tensor | None = None) -> dict:
    """jacrev of ``one_sample(eps, *sample) -> (T, C)`` w.r.t. zero perturbations ``eps`` (one (rows, k)
    tensor per layer), vmap-ed over the samples; K = sum over samples, outputs and rows of g g^T / N.
    ``tokens`` (B, T): only those rows and the outputs at those positions count (rows = the T tokens)."""

    def jac(*sample):
        zeros = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        return jacrev(lambda eps: one_sample(eps, *sample).reshape(-1))(zeros)

    J = vmap(jac)(*samples)  # name -> (B, C, rows, k)
    out = {}
    for n, g in J.items():
        if tokens is not None:
            B, C, T = g.shape[:3]
            outputs = tokens[:, :, None].expand(B, T, C // T).reshape(B, C)
            g = g * (outputs[:, :, None] & tokens[:, None, :])[..., None]
        rows = g.shape[0] * g.shape[2] if tokens is None else int(tokens.sum())
        out[n] = torch.einsum("bcrk,bcrl->kl", g, g) / rows
    return out


class Encoder(nn.Module):
    """Linear -> nn.TransformerEncoder (2 layers) -> Linear; probe (B, T, 3) batch first either way."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 8)
        with warnings.catch_warnings():  # enable_nested_tensor needs batch_first: a construction-time warning
            warnings.simplefilter("ignore")
            layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.2, batch_first=batch_first)
            self.enc = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x: torch.Tensor, kpm: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=kpm)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)

    def reference(self, eps: dict, x: torch.Tensor, kpm: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + eps["inp"]
        for i, layer in enumerate(self.enc.layers):
            p = f"enc.layers.{i}"
            h = layer.norm1(h + ref_mha(layer.self_attn, h, h, h, eps, f"{p}.self_attn", kpm))
            ff = layer.linear2(torch.relu(layer.linear1(h) + eps[f"{p}.linear1"])) + eps[f"{p}.linear2"]
            h = layer.norm2(h + ff)
        return self.head(h) + eps["head"]


def encoder_probe(B: int = 5, T: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 2:] = True  # padded keys in two sequences
    kpm[3, 3:] = True
    return x, kpm


# ----------------------------------------------------------------------------- K against the reference


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_default_layers_match_reference(batch_first: bool) -> None:
    model = Encoder(batch_first).eval()
    x, kpm = encoder_probe()
    names = list(find_linear_layers(model))
    attn = [f"enc.layers.{i}.self_attn.{r}" for i in range(2) for r in PROJ]
    assert names == ["inp", *attn[:4], "enc.layers.0.linear1", "enc.layers.0.linear2",
                     *attn[4:], "enc.layers.1.linear1", "enc.layers.1.linear2", "head"]
    ref_out = vmap(lambda xi, ki: model.reference({n: 0.0 for n in names}, xi, ki))(x, kpm)
    assert torch.allclose(ref_out, model(x, kpm), rtol=0, atol=1e-12)  # the reference is the same model
    shapes = {n: (x.shape[1], find_linear_layers(model)[n].k) for n in names}
    ref = reference_K(model.reference, (x, kpm), shapes)
    K = ptk_covariance(model, (x, kpm), chunk_size=2)  # default layers, chunks of 2 sequences
    assert set(K) == set(names)
    for n in names:
        assert rel_err(K[n], ref[n]) < 1e-9, n
    W = find_linear_layers(model)["enc.layers.1.self_attn.v"].weight_matrix().detach()
    assert torch.equal(W, model.enc.layers[1].self_attn.in_proj_weight[16:24])
    # only the real tokens as samples: attention rows are (batch, tokens) whatever batch_first (the
    # sequence-first nn.Linear outputs inside the encoder are (tokens, batch), which a mask refuses)
    ref_real = reference_K(model.reference, (x, kpm), shapes, tokens=~kpm)
    with NFAMonitor(model, layers=None if batch_first else "enc.layers.*.self_attn") as mon:
        res = mon.measure((x, kpm), sample_mask=~kpm, keep_matrices=True)
    assert len(res) == (len(names) if batch_first else 8)
    for n in res:
        assert rel_err(res[n].K, ref_real[n]) < 1e-9, n
        assert res[n].n_samples == int((~kpm).sum())


class CrossAttention(nn.Module):
    """Queries from a sequence, keys and values from a memory with other widths (kdim, vdim != embed_dim)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_in = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
        self.head = nn.Linear(8, 2)
        self.double()

    def forward(self, x, mem_k, mem_v, kpm):  # type: ignore[no-untyped-def]
        out, _ = self.attn(self.q_in(x), mem_k, mem_v, key_padding_mask=kpm)  # need_weights=True path
        return self.head(torch.tanh(out))

    def reference(self, eps, x, mem_k, mem_v, kpm):  # type: ignore[no-untyped-def]
        q_in = self.q_in(x) + eps["q_in"]
        out = ref_mha(self.attn, q_in, mem_k, mem_v, eps, "attn", kpm)
        return self.head(torch.tanh(out)) + eps["head"]


def test_cross_attention_with_kdim_vdim_matches_reference() -> None:
    model = CrossAttention().eval()
    g = torch.Generator().manual_seed(2)
    B, T, S = 4, 3, 5
    probe = (torch.randn(B, T, 3, generator=g, dtype=torch.float64), torch.randn(B, S, 5, generator=g, dtype=torch.float64),
             torch.randn(B, S, 6, generator=g, dtype=torch.float64), torch.zeros(B, S, dtype=torch.bool))
    probe[3][1, 3:] = True
    layers = find_linear_layers(model)
    assert list(layers) == ["q_in", "attn.q", "attn.k", "attn.v", "attn.out_proj", "head"]
    assert [tuple(layers[f"attn.{r}"].weight_matrix().shape) for r in PROJ] == [(8, 8), (8, 5), (8, 6), (8, 8)]
    rows = {"q_in": T, "attn.q": T, "attn.k": S, "attn.v": S, "attn.out_proj": T, "head": T}
    ref = reference_K(model.reference, probe, {n: (rows[n], a.k) for n, a in layers.items()})
    with NFAMonitor(model, blocks={"attn.[qk]": 2}) as mon:  # per head
        res = mon.measure(probe, keep_matrices=True)
    assert rel_err(res["attn.k[1]"].K, ref["attn.k"][4:, 4:]) < 1e-9
    assert torch.equal(res["attn.q[0]"].K, res["attn.q"].K[:4, :4])
    for n in layers:
        assert rel_err(res[n].K, ref[n]) < 1e-9, n
        assert res[n].n_samples == B * rows[n], n  # keys and values: one row per memory token
    # layer inputs are the projections' inputs: X W^T + b reproduces the recorded pre-activations
    X, G = layer_jacobians(model, probe, ["attn.k"])["attn.k"]
    assert torch.equal(X, probe[1].reshape(-1, 5)) and G.shape == (T * 2, B * S, 8)


class Decoder(nn.Module):
    """nn.TransformerDecoder (1 layer): self-attention on the targets, cross-attention on a memory
    (key is value: the packed key-value projection)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 8)
        layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=12, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, num_layers=1)
        self.head = nn.Linear(8, 2)
        self.double()

    def forward(self, x, mem):  # type: ignore[no-untyped-def]
        return self.head(self.dec(self.inp(x), mem))

    def reference(self, eps, x, mem):  # type: ignore[no-untyped-def]
        layer, p = self.dec.layers[0], "dec.layers.0"
        h = self.inp(x) + eps["inp"]
        h = layer.norm1(h + ref_mha(layer.self_attn, h, h, h, eps, f"{p}.self_attn"))
        h = layer.norm2(h + ref_mha(layer.multihead_attn, h, mem, mem, eps, f"{p}.multihead_attn"))
        ff = layer.linear2(torch.relu(layer.linear1(h) + eps[f"{p}.linear1"])) + eps[f"{p}.linear2"]
        return self.head(layer.norm3(h + ff)) + eps["head"]


def test_transformer_decoder_cross_attention_matches_reference() -> None:
    model = Decoder().eval()
    g = torch.Generator().manual_seed(3)
    B, T, S = 3, 4, 5
    probe = (torch.randn(B, T, 3, generator=g, dtype=torch.float64), torch.randn(B, S, 8, generator=g, dtype=torch.float64))
    layers = find_linear_layers(model)
    assert "dec.layers.0.multihead_attn.v" in layers and "dec.layers.0.multihead_attn.out_proj" in layers
    rows = {n: S if n.startswith("dec.layers.0.multihead_attn.") and n[-2:] in (".k", ".v") else T for n in layers}
    ref = reference_K(model.reference, probe, {n: (rows[n], a.k) for n, a in layers.items()})
    K = ptk_covariance(model, probe)
    for n in layers:
        assert rel_err(K[n], ref[n]) < 1e-9, n


# ----------------------------------------------------------------------------- outputs while measuring


class Call(nn.Module):
    """Calls one nn.MultiheadAttention the way ``mode`` says; batch-first probe and output."""

    def __init__(self, mode: str, mha_kwargs: dict, call_kwargs: dict) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.call_kwargs = mode, call_kwargs
        self.mha = nn.MultiheadAttention(8, 2, **mha_kwargs).double()

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        bf = self.mha.batch_first
        if self.mode == "unbatched":  # one sequence per call: the probe holds one sample
            return self.mha(x[0], x[0], x[0], **self.call_kwargs)[0].unsqueeze(0)
        if not bf:
            x, mem = x.transpose(0, 1), mem.transpose(0, 1)
        if self.mode == "self":
            out = self.mha(x, x, x, **self.call_kwargs)[0]
        elif self.mode == "memory":  # key is value: the packed key-value projection
            out = self.mha(x, mem, mem, **self.call_kwargs)[0]
        else:  # three different tensors
            out = self.mha(x, mem, mem * 2.0, **self.call_kwargs)[0]
        return out if bf else out.transpose(0, 1)


T_LEN = 4
CAUSAL = torch.triu(torch.ones(T_LEN, T_LEN, dtype=torch.bool), 1)
KPM = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True]])
CASES = {
    "self-batch-first-sdpa-kpm": ("self", {"batch_first": True, "dropout": 0.3},
                                  {"need_weights": False, "key_padding_mask": KPM}),
    "self-seq-first-weights-mask": ("self", {}, {"attn_mask": CAUSAL, "average_attn_weights": False}),
    "self-causal-hint": ("self", {"batch_first": True}, {"attn_mask": CAUSAL, "is_causal": True, "need_weights": False}),
    "memory-float-masks": ("memory", {"batch_first": True},
                           {"key_padding_mask": torch.zeros(3, 5, dtype=torch.float64).masked_fill(KPM.repeat(1, 2)[:, :5], -1e9)}),
    "separate-kdim-vdim": ("separate", {"kdim": 6, "vdim": 6, "batch_first": True}, {"need_weights": False}),
    "bias-kv-zero-attn": ("separate", {"add_bias_kv": True, "add_zero_attn": True},
                          {"key_padding_mask": KPM.repeat(1, 2)[:, :5]}),
    "no-bias": ("memory", {"bias": False}, {}),
    "unbatched": ("unbatched", {}, {"attn_mask": CAUSAL}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_outputs_unchanged_while_measuring(case: str) -> None:
    mode, mha_kwargs, call_kwargs = CASES[case]
    model = Call(mode, mha_kwargs, call_kwargs).eval()
    g = torch.Generator().manual_seed(0)
    B = 1 if mode == "unbatched" else 3
    x = torch.randn(B, T_LEN, 8, generator=g, dtype=torch.float64)
    mem = torch.randn(B, 5, 6 if mha_kwargs.get("kdim") else 8, generator=g, dtype=torch.float64)
    seen: list = []
    handle = model.mha.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.enable_grad():  # torch's non-fused path, the one measure() reproduces step by step
        model(x, mem)
    expected = seen.pop()
    with NFAMonitor(model) as mon:
        assert mon.layer_names == [f"mha.{r}" for r in PROJ]
        res = mon.measure((x, mem))
        measured = seen.pop()
    handle.remove()
    assert torch.equal(measured[0], expected[0]), case  # bitwise
    assert (measured[1] is None) == (expected[1] is None) and (expected[1] is None or torch.equal(measured[1], expected[1]))
    rows = B * T_LEN
    assert res["mha.q"].n_samples == rows and res["mha.out_proj"].n_samples == rows
    assert res["mha.k"].n_samples == (rows if mode in ("self", "unbatched") else B * 5)
    assert all(math.isfinite(r.uc_nfa) for r in res.values())
    assert "forward" not in vars(model.mha) and torch.backends.mha.get_fastpath_enabled()
    assert not model.mha._forward_hooks and not model.mha._forward_pre_hooks


def test_fast_path_output_and_frozen_encoder() -> None:
    """The fused paths (taken by torch without grad) give the same function; a frozen encoder, which would
    otherwise turn padded batches into nested tensors, is measured like a trainable one."""
    model = Encoder(batch_first=True).eval()
    x, kpm = encoder_probe()
    with torch.no_grad():
        fused = model(x, kpm)  # nested tensors + fused encoder layers
    with torch.enable_grad():
        plain = model(x, kpm)
    assert torch.allclose(fused[~kpm], plain[~kpm], rtol=0, atol=1e-12)
    K = ptk_covariance(model, (x, kpm), layers="enc.*")
    for p in model.parameters():  # nothing before the encoder requires grad now
        p.requires_grad_(False)
    K_frozen = ptk_covariance(model, (x, kpm), layers="enc.*")
    for n in K:
        assert rel_err(K_frozen[n], K[n]) < 1e-12, n


# ----------------------------------------------------------------------------- selection


def test_selection_by_module_name_and_glob() -> None:
    model = Encoder(batch_first=True)
    names = list(find_linear_layers(model, "enc.layers.0.self_attn"))
    assert names == [f"enc.layers.0.self_attn.{r}" for r in PROJ]
    assert list(find_linear_layers(model, "*.self_attn.[qk]")) == [
        f"enc.layers.{i}.self_attn.{r}" for i in range(2) for r in "qk"]
    out_proj = find_linear_layers(model, "enc.layers.1.self_attn.out_proj")["enc.layers.1.self_attn.out_proj"]
    assert isinstance(out_proj, AttentionProjectionAdapter) and out_proj.weight_matrix() is model.enc.layers[1].self_attn.out_proj.weight
    with pytest.raises(ValueError, match="is a TransformerEncoderLayer"):
        find_linear_layers(model, "enc.layers.0")

    class Patched(nn.MultiheadAttention):  # a custom forward: its projections cannot be read
        def forward(self, q, k, v):  # type: ignore[override]
            return F.linear(q, self.out_proj.weight), None

    layers = find_linear_layers(nn.ModuleDict({"a": Patched(8, 2)}))
    assert list(layers) == ["a.out_proj"] and type(layers["a.out_proj"]) is LayerAdapter


def test_hooks_change_nothing_outside_measure() -> None:
    model = Encoder(batch_first=True).eval()
    x, kpm = encoder_probe()
    seen: dict[str, list] = {"before": [], "after": []}
    first = model.head.register_forward_hook(lambda m, a, out: seen["before"].append(out))
    with NFAMonitor(model) as mon:
        last = model.head.register_forward_hook(lambda m, a, out: seen["after"].append(out))
        mon.measure((x, kpm))
        seen["before"].clear(), seen["after"].clear()
        model(x, kpm)
        assert seen["before"][0] is seen["after"][0]  # the monitor's hook passed the output through untouched
        assert "forward" not in vars(model.enc.layers[0].self_attn)
    first.remove(), last.remove()
