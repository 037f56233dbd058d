"""The FLOP count of ``benchmarks/ptk_cost.py``: the GEMMs it times ``torch.mm`` on are the GEMMs exact ``K`` performs."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def ptk_cost():
    path = ROOT / "benchmarks" / "ptk_cost.py"
    spec = importlib.util.spec_from_file_location("bench_ptk_cost", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_flops_of_exact_K_on_the_authors_mlp(ptk_cost) -> None:
    flops = ptk_cost.exact_flops(2000)
    n, C, d, w = 2000, 10, 3072, 256  # forward, VJPs above the first layer, Grams of the 6 layers (full: k <= 256)
    assert flops["forward"] == 2 * n * (d * w + 4 * w * w + w * C)
    assert flops["vjps"] == 2 * C * n * (4 * w * w + w * C)
    assert flops["grams"] == 2 * C * n * (5 * w * w + C * C)
    assert sum(2.0 * r * i * c for _, r, i, c in ptk_cost._gemms(n)) == pytest.approx(sum(flops.values()), rel=1e-12)


def test_chunks_follow_the_engine(ptk_cost) -> None:
    from diagnostics.engine import chunk_samples

    assert ptk_cost._chunks(700) == [8, 256, 256, 180]
    f = torch.zeros(8, 10)  # the MLP's outputs and recorded layer outputs of 8 samples fit 256 per chunk
    assert chunk_samples(f, {"h": [torch.zeros(8, 256)] * 5 + [torch.zeros(8, 10)]}, 8) == 256


def test_counted_flops_are_the_gemms_exact_K_runs(ptk_cost, one_thread) -> None:
    # every GEMM aten op of one exact-K call, seen by the op timer, against the count from the shapes
    n = 300
    model, x = ptk_cost.authors_mlp(), ptk_cost.probe(n)
    with ptk_cost._OpTimer() as timer:
        ptk_cost.ours_K(model, x)
    assert timer.gemm_flops == pytest.approx(sum(ptk_cost.exact_flops(n).values()), rel=1e-12)
    assert timer.seconds["gemm"] > 0 and set(timer.seconds) == {"gemm", "relu masks", "float64 additions", "other ops"}


def test_where_the_time_goes_line(ptk_cost, one_thread) -> None:
    line = ptk_cost.time_by_op(64, 10.0, 1)  # a generous total: 'outside ops' is what the ops leave of it
    shares = [float(part.split()[-2]) for part in line.split(": ", 2)[2].split(" of ")[0].split(", ")]
    assert len(shares) == 5 and all(s >= 0 for s in shares) and sum(shares) == pytest.approx(100, abs=0.6)
