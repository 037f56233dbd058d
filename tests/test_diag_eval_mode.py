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


class LoRALinear(nn.Linear):
    """A loralib-style adapter: ``train(False)`` merges ``B A`` into the frozen weight, ``train(True)`` takes
    it out again, so the low-rank factors learn only in training mode."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__(d_in, d_out)
        self.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(0.1 * torch.randn(rank, d_in))
        self.lora_B = nn.Parameter(0.1 * torch.randn(d_out, rank))
        self.merged = False

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if mode == self.merged:
            with torch.no_grad():
                self.weight += (-1 if mode else 1) * self.lora_B @ self.lora_A
            self.merged = not mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.merged else out + x @ self.lora_A.t() @ self.lora_B.t()


@pytest.mark.parametrize("frozen_norm", [False, True])
def test_measure_leaves_a_lora_model_as_it_was(frozen_norm: bool) -> None:
    """Modes are switched through train()/eval() calls: the adapter merges for the measurement and unmerges
    afterwards, and the next training step still trains it."""
    from diagnostics import NFAMonitor

    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    model.train()
    if frozen_norm:
        model[1].eval()
    before = modes(model), model[0].merged, model[0].weight.clone()
    x = torch.randn(8, 4)
    NFAMonitor(model, layers=["3"]).measure(x)
    assert (modes(model), model[0].merged) == before[:2]
    assert torch.equal(model[0].weight, before[2])
    model(x).pow(2).sum().backward()
    assert model[0].lora_A.grad is not None and model[0].lora_A.grad.abs().sum() > 0
