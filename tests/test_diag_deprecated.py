"""Deprecated names of the diagnostics package still work and warn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics import LayerAdapter, find_linear_layers
from diagnostics.engine import LayerHooks, for_each_chunk
from diagnostics.ptk import EstimatorSettings, ptk_sums, ptk_sums_all_ranks


def model_and_probe() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), torch.randn(5, 3, dtype=torch.float64)


def test_layer_adapter_kind_and_linear_adapter() -> None:
    model, _ = model_and_probe()
    adapter = find_linear_layers(model)["0"]
    with pytest.warns(DeprecationWarning, match="kind"):
        assert adapter.kind == "linear"
    import diagnostics.layers as layers

    with pytest.warns(DeprecationWarning, match="LinearAdapter"):
        assert layers.LinearAdapter is LayerAdapter


def test_chunk_n() -> None:
    model, x = model_and_probe()
    seen: list[int] = []

    def visit(chunk) -> None:
        with pytest.warns(DeprecationWarning, match="Chunk.n"):
            seen.append(chunk.n)

    for_each_chunk(model, LayerHooks(find_linear_layers(model)), x, visit, chunk_size=3)
    assert seen == [3, 2]


def test_estimator_options_one_by_one() -> None:
    model, x = model_and_probe()
    hooks = LayerHooks(find_linear_layers(model))
    ref, counts = ptk_sums(model, hooks, x, EstimatorSettings("sketch", 3, generator=1, chunk_size=2))
    with pytest.warns(DeprecationWarning, match="EstimatorSettings"):
        old, old_counts = ptk_sums(model, hooks, x, "sketch", 3, 1, chunk_size=2)
    with pytest.warns(DeprecationWarning, match="EstimatorSettings"):
        ranks, _ = ptk_sums_all_ranks(model, hooks, x, "sketch", 3, 1, None, 2, "rademacher", None)
    assert counts == old_counts and all(torch.equal(ref[n], old[n]) and torch.equal(ref[n], ranks[n]) for n in ref)
