"""Eval mode for a block restores every submodule's own previous mode (also where a helper evaluates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics.common import eval_mode
from diagnostics.experiments.training import mse


def mixed() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a frozen batch-norm inside a training model
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_mixed_modes_also_on_error() -> None:
    model = mixed()
    before = modes(model)
    with eval_mode(model):
        assert not any(modes(model))
    assert modes(model) == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError
    assert modes(model) == before


def test_mse_evaluates_in_eval_mode_and_restores_mixed_modes() -> None:
    model = mixed()
    before = modes(model)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    with torch.no_grad(), eval_mode(model):
        expected = float(((model(x) - y) ** 2).mean())
    assert mse(model, x, y) == expected
    assert modes(model) == before
