"""Layers measured in groups under a memory budget (``max_memory``): the same records and ``K`` as one group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics import NFAMonitor, ptk_covariance
from diagnostics.memory import PASS_BYTES, layer_groups, estimate_memory

from test_diag_robust import _peak_bytes


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 96), nn.Tanh(), nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 64), nn.Tanh(),
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 5),
    ).to(dtype)


LAYERS = ["0", "2", "4", "6"]


def _smallest_budget(build) -> int:
    """The smallest budget (in steps of 4 KiB) for which ``build(max_memory)`` does not refuse a layer."""
    budget = PASS_BYTES
    while True:
        try:
            build(budget)
            return budget
        except ValueError:
            budget += 4096


def _values(records: dict) -> dict:
    return {
        n: [r.uc_nfa, r.c_nfa, r.rel_change, r.kernel_alignment, r.n_samples, *r.norms.values()]
        for n, r in records.items()
    }


@pytest.mark.parametrize("estimator, generator", [("exact", None), ("sketch", 3), ("sketch", "object")])
def test_grouped_records_equal_one_group(estimator: str, generator) -> None:
    model = _mlp()
    W0 = {n: model[int(n)].weight.detach().clone() for n in LAYERS}
    with torch.no_grad():  # move the weights away from W0 so the C-NFA is defined
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    one = NFAMonitor(model, layers=LAYERS, W0=W0, blocks={"2": 2})
    budget = _smallest_budget(lambda b: NFAMonitor(model, layers=LAYERS, W0=W0, blocks={"2": 2}, max_memory=b))
    grouped = NFAMonitor(model, layers=LAYERS, W0=W0, blocks={"2": 2}, max_memory=budget)
    assert len(grouped.groups) >= 2 and [n for g in grouped.groups for n in g] == LAYERS
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)] if generator == "object" else [generator] * 2
    kw = dict(estimator=estimator, m=3, chunk_size=16)
    ref = one.measure(x, generator=gens[0], **kw)
    got = grouped.measure(x, generator=gens[1], **kw)
    assert list(got) == list(ref)  # layers, then their blocks, in the same order
    for name, values in _values(ref).items():
        assert _values(got)[name] == pytest.approx(values, rel=1e-6, abs=1e-9), name
        torch.testing.assert_close(grouped.last_K[name], one.last_K[name], rtol=1e-6, atol=1e-9)
    if generator == "object":  # the generator ends as after one pass
        assert torch.equal(gens[0].get_state(), gens[1].get_state())


def test_grouped_ptk_covariance_equals_one_group() -> None:
    model = _mlp(torch.float64)
    x = torch.randn(30, 6, dtype=torch.float64)
    adapters = NFAMonitor(model, layers=LAYERS).adapters
    budget = _smallest_budget(lambda b: layer_groups(adapters, b, summary=False))
    groups, _ = layer_groups(adapters, budget, summary=False)
    assert len(groups) >= 2
    for kw in ({}, {"estimator": "sketch", "m": 4, "generator": 5}):
        ref = ptk_covariance(model, x, layers=LAYERS, chunk_size=7, **kw)
        got = ptk_covariance(model, x, layers=LAYERS, chunk_size=7, max_memory=budget, **kw)
        assert list(got) == list(ref)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-12, atol=0)


def test_grouped_measure_stays_within_its_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnostics.correlation as correlation
    import diagnostics.nfa as nfa

    for module in (correlation, nfa):  # small float64 blocks: the matrices dominate
        monkeypatch.setattr(module, "CORR_BLOCK", 1024)
    torch.manual_seed(0)  # wide outputs, narrow inputs: the k x k sums dominate
    model = nn.Sequential(*[m for _ in range(2) for m in (nn.LazyLinear(512), nn.Tanh(), nn.Linear(512, 16), nn.Tanh())])
    model.append(nn.Linear(16, 4))
    x = torch.randn(8, 16)
    model(x)
    layers = ["0", "4"]  # k = 512, d = 16
    one = NFAMonitor(model, layers=layers)
    one.measure(x)  # warm-up
    budget = _smallest_budget(lambda b: NFAMonitor(model, layers=layers, max_memory=b))
    mon = NFAMonitor(model, layers=layers, max_memory=budget)
    assert len(mon.groups) >= 2
    peak = _peak_bytes(lambda: mon.measure(x))
    one_peak = _peak_bytes(lambda: NFAMonitor(model, layers=layers).measure(x))
    kept = sum(4 * a.k * a.k for a in mon.adapters.values())  # the K kept as results come on top
    slack = 2**18  # the passes of the tiny probe
    assert peak - slack <= budget - PASS_BYTES + kept
    assert peak < one_peak


def test_groups_are_fewest_and_consecutive() -> None:
    adapters = NFAMonitor(_mlp(), layers=LAYERS).adapters
    total = estimate_memory(adapters)["total"]
    groups, peak = layer_groups(adapters, PASS_BYTES + total)
    assert groups == [LAYERS] and peak <= total  # the kept K are not part of the working memory
    budget = _smallest_budget(lambda b: layer_groups(adapters, b))
    groups, peak = layer_groups(adapters, budget)
    assert len(groups) >= 2 and [n for g in groups for n in g] == LAYERS
    assert peak + PASS_BYTES <= budget < total + PASS_BYTES
    with pytest.raises(ValueError, match="alone needs"):
        layer_groups(adapters, budget - 4096)
