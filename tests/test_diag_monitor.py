"""NFAMonitor behaviour: hooks, modes, .grad, history, save/load, and bad input."""

from __future__ import annotations

import json
import gc
import math
import os
import weakref

import pytest
import torch
from torch import nn

from diagnostics import LayerRecord, NFAMonitor, load_snapshot, nfa_correlation, ptk_covariance, write_snapshot


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def x_probe(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_attach_detach_bit_identical_and_hooks_removed() -> None:
    model = net().eval()
    x = x_probe()
    before = model(x)
    seen = []
    model[3].register_forward_pre_hook(lambda m, a: seen.append(hook_count(model)))
    mon = NFAMonitor(model)
    assert hook_count(model) == 1  # hooks only while measure() runs: training never sees them
    during = model(x)
    mon.measure(x)
    assert seen[-1] > 1
    after_measure = model(x)
    model[3]._forward_pre_hooks.clear()
    mon.detach()
    assert hook_count(model) == 0
    assert torch.equal(before, during) and torch.equal(before, after_measure) and torch.equal(before, model(x))
    with NFAMonitor(model) as mon2:
        assert torch.equal(model(x), before)
    assert hook_count(model) == 0 and not mon2.attached
    with pytest.raises(RuntimeError, match="detached"):
        mon2.measure(x)


def test_measure_leaves_grads_modes_and_graph_alone() -> None:
    model = net()
    model.train()
    model[2].eval()  # one submodule in a different mode: must be restored individually
    x = x_probe()
    loss = model(x).pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model[0].bias.grad = None
    with NFAMonitor(model) as mon:
        with torch.no_grad():  # grad is enabled inside measure()
            res = mon.measure(x, keep_matrices=True)
        res2 = mon.measure(x, keep_matrices=True)  # eval mode: dropout off, so measurements are deterministic
    assert model.training and not model[2].training and model[1].training
    assert model[0].bias.grad is None
    for n, p in model.named_parameters():
        if n != "0.bias":
            assert torch.equal(p.grad, grads[n])
    for name in res:
        assert res[name].K is not None and res[name].K.grad_fn is None and not res[name].K.requires_grad
        assert res[name].uc_nfa == res2[name].uc_nfa
    model.eval()
    K = ptk_covariance(model, x)
    assert torch.allclose(res["3"].K, K["3"])


def test_no_recorded_layer_output_outlives_measure() -> None:
    model = net()
    outputs: list[weakref.ref] = []
    handle = model[3].register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    with NFAMonitor(model) as mon:
        res = mon.measure(x_probe(), chunk_size=4, keep_matrices=True)
        handle.remove()
        gc.collect()
        assert len(outputs) == 4 and all(ref() is None for ref in outputs)
        assert res["3"].K is not None


def test_records_history_and_rows() -> None:
    model = net()
    x = x_probe()
    mon = NFAMonitor(model, correlation="cosine", agop_power=0.5)
    first = mon.measure(x)
    assert set(first) == {"0", "3", "5"}
    rec = first["0"]
    assert isinstance(rec, LayerRecord) and rec.step == 0 and rec.estimator == "exact" and rec.m is None
    assert rec.rel_change == 0.0 and math.isnan(rec.c_nfa)  # no change yet: C-NFA undefined
    assert rec.K is None and rec.nfm is None and rec.agop is None
    assert rec.n_samples == 16 and rec.correlation == "cosine" and rec.agop_power == 0.5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    second = mon.measure(x, estimator="sketch", m=4, generator=0, step=100, keep_matrices=True)
    rec = second["3"]
    assert rec.step == 100 and rec.estimator == "sketch" and rec.m == 4
    W = model[3].weight.detach()
    dW = W - mon.W0["3"]
    assert math.isclose(rec.rel_change, float(dW.norm() / W.norm()))
    assert math.isclose(rec.c_nfa, float(nfa_correlation(dW, rec.K, "cosine", 0.5)), rel_tol=1e-9)
    assert math.isclose(rec.uc_nfa, float(nfa_correlation(W, rec.K, "cosine", 0.5)), rel_tol=1e-9)
    rows = mon.to_rows()
    assert len(rows) == 6 and len(mon.history) == 2
    assert rows[-1]["step"] == 100 and rows[-1]["layer"] == "5"
    assert {"uc_nfa", "c_nfa", "rel_change", "kernel_alignment", "nfm_centered", "agop_cross"} <= set(rows[0])
    assert all(isinstance(v, (int, float, str, type(None))) for v in rows[-1].values())


def test_explicit_W0_and_layer_globs() -> None:
    model = net()
    init = net()
    with torch.no_grad():
        model[0].weight.mul_(2)
    mon = NFAMonitor(model, layers=["0", "[35]"], W0=init)
    assert mon.layer_names == ["0", "3", "5"]
    assert torch.equal(mon.W0["0"], init[0].weight)
    res = mon.measure(x_probe())
    assert math.isclose(res["0"].rel_change, 0.5)
    mon2 = NFAMonitor(model, layers="5", W0={"5": torch.zeros(3, 6, dtype=torch.float64)})
    assert math.isclose(mon2.measure(x_probe())["5"].rel_change, 1.0)
    with pytest.raises(ValueError, match="expected"):
        NFAMonitor(model, layers="5", W0={"5": torch.zeros(6, 3)})


def test_save_load_round_trip(tmp_path) -> None:
    model = net()
    mon = NFAMonitor(model)
    mon.measure(x_probe(), step=7)
    res = mon.measure(x_probe(), step=8, keep_matrices=True)
    path = tmp_path / "nfa-step8.safetensors"
    mon.save(path)
    assert os.listdir(tmp_path) == ["nfa-step8.safetensors"]  # no temporary file left
    snap = load_snapshot(path)
    assert snap.step == 8 and snap.layers == ["0", "3", "5"] and snap.estimator == "exact" and snap.m is None
    assert snap.correlation == "pearson" and json.dumps(snap.rows) == json.dumps(mon.to_rows())  # NaN-safe
    for name, rec in res.items():
        mats = snap.matrices[name]
        assert torch.equal(mats["K"], rec.K) and torch.equal(mats["nfm"], rec.nfm)
        assert torch.equal(mats["W0"], mon.W0[name])
        loaded = snap.records[name]
        assert loaded.uc_nfa == rec.uc_nfa and loaded.norms == rec.norms and torch.equal(loaded.K, rec.K)
    mon.save(path)  # overwrite in place
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="not an NFA snapshot"):
        load_snapshot(bad)


def test_edited_snapshot_metadata_names_the_file_and_field(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    mon = NFAMonitor(net())
    mon.measure(x_probe(), step=3)
    path = tmp_path / "nfa.safetensors"
    mon.save(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    for edit in ({"records": meta["records"][:-1]}, {"agop_power": "one"}):
        edited = tmp_path / "edited.safetensors"
        save_file(tensors, str(edited), metadata={**meta, **edit})
        (field,) = edit
        with pytest.raises(ValueError, match=f"edited.safetensors.*field '{field}' is not valid JSON"):
            load_snapshot(edited)
    save_file(tensors, str(edited), metadata={k: v for k, v in meta.items() if k != "m"})
    with pytest.raises(ValueError, match="edited.safetensors.*no field 'm'"):
        load_snapshot(edited)


def test_snapshot_is_plain_data_written_as_saved(tmp_path) -> None:
    model = net()
    mon = NFAMonitor(model, blocks={"3": 2})
    mon.measure(x_probe(), keep_matrices=True)
    snap = mon.snapshot()
    assert snap.layers == ["0", "3", "3[0]", "3[1]", "5"]
    write_snapshot(tmp_path / "a.safetensors", snap)
    mon.save(tmp_path / "b.safetensors")
    a, b = load_snapshot(tmp_path / "a.safetensors"), load_snapshot(tmp_path / "b.safetensors")
    assert (a.step, a.layers, a.estimator, a.m) == (b.step, b.layers, b.estimator, b.m)
    assert json.dumps(a.rows) == json.dumps(b.rows) == json.dumps(snap.rows)  # NaN-safe
    for layer, mats in snap.matrices.items():
        assert mats.keys() == a.matrices[layer].keys() == b.matrices[layer].keys()
        assert all(torch.equal(t, a.matrices[layer][kind]) for kind, t in mats.items())


def test_bad_inputs() -> None:
    model = net()
    x = x_probe()
    with pytest.raises(ValueError, match=r"no linear layer matches 'enc\*'; available layers: \['0', '3', '5'\]"):
        NFAMonitor(model, layers=["enc*"])
    with pytest.raises(ValueError, match="is a ReLU"):
        NFAMonitor(model, layers=["1"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        NFAMonitor(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="correlation"):
        NFAMonitor(model, correlation="spearman")
    mon = NFAMonitor(model)
    with pytest.raises(ValueError, match=r"layer '0'.*\(16, 4\)"):
        mon.measure(torch.randn(16, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="output_fn"):
        mon.measure(x, output_fn=lambda out: out.tolist())
    with pytest.raises(ValueError, match="batch"):
        mon.measure(x, output_fn=lambda out: out.sum())
    with pytest.raises(ValueError, match="m .*>= 1"):
        mon.measure(x, estimator="sketch", m=0)
    with pytest.raises(ValueError, match="unknown estimator 'exakt'"):
        mon.measure(x, estimator="exakt")
    with pytest.raises(ValueError, match="chunk_size"):
        mon.measure(x, chunk_size=0)
    with pytest.raises(TypeError, match="probe inputs"):
        mon.measure([1, 2, 3] and "not a tensor")
    assert mon.history == []
    assert torch.equal(model.eval()(x), model(x))


def test_size_guard() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 300))
    with pytest.raises(ValueError, match=r"max_k=7: '2' \(k=300, d=8, ~[\d.]+ [MK]iB\)\..*layers="):
        NFAMonitor(model, max_k=7)  # '2' has d > max_k; '0' (k > max_k >= d) is checked at measure()
    # '2' returns the model output (K = I, never formed) unless output_fn computes something from it
    mon = NFAMonitor(model, max_k=256)
    assert mon.measure(torch.randn(3, 4))["2"].estimator == "analytic"
    with pytest.raises(ValueError, match=r"'2' \(k=300, d=8\).*layers=.*max_k"):
        mon.measure(torch.randn(3, 4), output_fn=lambda out: out[:, :5])
    with pytest.raises(ValueError, match="max_k"):
        ptk_covariance(model, torch.randn(3, 4), max_k=256)
    K = ptk_covariance(model, torch.randn(3, 4), layers=["0"], max_k=256)
    assert K["0"].shape == (8, 8)


def test_no_graph_survives_measure() -> None:
    import gc
    import weakref

    model = net()
    seen: list[weakref.ref] = []
    handle = model[3].register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o)))
    with NFAMonitor(model) as mon:
        mon.measure(x_probe(), chunk_size=8)
    handle.remove()
    gc.collect()
    assert len(seen) == 2 and all(ref() is None for ref in seen)


def test_inference_mode_and_frozen_parameters() -> None:
    model = net().eval()
    x = x_probe()
    K = ptk_covariance(model, x)
    with torch.inference_mode():
        K_inf = ptk_covariance(model, x.clone())
    for p in model.parameters():
        p.requires_grad_(False)
    K_frozen = ptk_covariance(model, x)
    for n in K:
        assert torch.allclose(K_inf[n], K[n], rtol=1e-12) and torch.allclose(K_frozen[n], K[n], rtol=1e-12)
