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


def test_estimator_options_one_by_one_are_checked_like_arguments() -> None:
    model, x = model_and_probe()
    hooks = LayerHooks(find_linear_layers(model))
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="unexpected keyword argument 'estimatr'"):
        ptk_sums(model, hooks, x, estimatr="sketch")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="at most 8 estimator options"):
        ptk_sums(model, hooks, x, "exact", 8, None, None, None, "rademacher", False, None, "extra")
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="multiple values for argument 'm'"):
        ptk_sums(model, hooks, x, "sketch", 3, m=4)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="unknown estimator None"):
        ptk_sums(model, hooks, x, None, 3)
    with pytest.raises(TypeError, match="not both"):
        ptk_sums(model, hooks, x, EstimatorSettings(), chunk_size=2)


@pytest.mark.parametrize(("module", "name", "home"), [
    ("diagnostics.engine", "BATCHED_VJP", "diagnostics.vjps"),
    ("diagnostics.engine", "LayerAdapter", "diagnostics.layers"),
    ("diagnostics.ptk", "format_bytes", "diagnostics.layers"),
    ("diagnostics.ptk", "summary_memory", "diagnostics.nfa"),
    ("diagnostics.io", "full_weight", "diagnostics.sharded"),
    ("diagnostics.monitor", "check_estimator", "diagnostics.settings"),
    ("diagnostics.output_layer", "psd_power", "diagnostics.nfa"),
])
def test_moved_names_still_import_and_warn(module: str, name: str, home: str) -> None:
    import importlib

    with pytest.warns(DeprecationWarning, match=f"{module}.{name} is deprecated; import it from {home}"):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        importlib.import_module(module).no_such_name  # noqa: B018


def test_chunk_fields_are_keyword_only() -> None:
    from diagnostics.engine import Chunk

    with pytest.raises(TypeError):
        Chunk(torch.zeros(2, 3), 2, {})  # the fields of the old positional order (f, n, outputs) are refused
