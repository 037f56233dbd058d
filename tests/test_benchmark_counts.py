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
