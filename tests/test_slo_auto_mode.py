"""``mode="auto"`` (the default): ``"grad"`` where the base step scales with the gradient (SGD, ASGD), ``"update"``
for every other optimizer; an explicit ``"grad"`` over a scale-invariant optimizer warns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from slo_torch import SLOptimizer, attach, promote

GRAD_SCALED = {"SGD", "ASGD"}  # the step is lr times a linear function of the gradients
# the step does not scale with the gradient (Adam-type, Adagrad-type, signs, orthogonalised momentum, LBFGS)
SCALE_INVARIANT = {"Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "LBFGS", "Muon", "NAdam", "RAdam",
                   "RMSprop", "Rprop", "SparseAdam"}
CLASSES = sorted(n for n in GRAD_SCALED | SCALE_INVARIANT if hasattr(torch.optim, n))  # Muon, Adafactor: recent torch


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16, bias=bias), nn.ReLU(), nn.Linear(16, 16, bias=bias), nn.ReLU(),
                         nn.Linear(16, 1, bias=bias)).double()


def base(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return getattr(torch.optim, name)(model.parameters(), lr=1e-2)


def test_every_torch_optimizer_is_classified() -> None:
    known = {n for n in torch.optim.__all__ if isinstance(getattr(torch.optim, n), type)
             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"}
    assert known <= GRAD_SCALED | SCALE_INVARIANT, known - GRAD_SCALED - SCALE_INVARIANT


@pytest.mark.parametrize("name", CLASSES)
def test_auto_resolves_by_the_base_optimizer(name: str) -> None:
    expected = "grad" if name in GRAD_SCALED else "update"
    model = mlp(bias=name != "Muon")  # Muon takes 2-D parameters only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = SLOptimizer(base(name, model), model=model, speeds={"*": 1.0})
        handle = attach(base(name, model), model, {"*": 1.0})
        built = SLOptimizer(model.parameters(), base_optimizer=getattr(torch.optim, name), model=model,
                            speeds={"*": 1.0}, lr=1e-2)
    assert opt.mode == handle.mode == built.mode == expected
    assert repr(opt).startswith(f"SLOptimizer(mode='{expected}'")


@pytest.mark.parametrize("name", CLASSES)
def test_explicit_grad_mode_warns_where_it_cannot_set_the_step(name: str) -> None:
    model = mlp(bias=name != "Muon")
    if name in GRAD_SCALED:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            SLOptimizer(base(name, model), model=model, speeds={"*": 1.0}, mode="grad")
            attach(base(name, model), model, {"*": 1.0}, mode="grad")
        return
    for make in (lambda: SLOptimizer(base(name, model), model=model, speeds={"*": 1.0}, mode="grad"),
                 lambda: attach(base(name, model), model, {"*": 1.0}, mode="grad")):
        with pytest.warns(UserWarning, match=rf"step of {name} does not scale.*mode='update'") as caught:
            limited = make()
        assert limited.mode == "grad"  # what was asked for, with the warning
        assert caught[0].filename == __file__  # points at the caller


class OwnRule(torch.optim.Optimizer):
    """An optimizer SLO does not know: ``p <- p - lr * sign(g)``."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class QuietSGD(torch.optim.SGD):
    """SGD's step under another name."""


class NormalisedSGD(torch.optim.SGD):
    """A subclass with its own step: ``p <- p - lr * g / ||g||``, invariant to the gradient's scale."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad / p.grad.norm().clamp_min(1e-30), alpha=-group["lr"])


class QuietAdam(torch.optim.Adam):
    """Adam's step under another name."""


@pytest.mark.parametrize("cls, expected, warns", [
    (OwnRule, "update", False),  # unknown: update mode is exact whatever the rule; nothing to warn about
    (QuietSGD, "grad", False),  # keeps SGD's step: SGD's rule
    (NormalisedSGD, "update", False),  # its own step: treated as unknown
    (QuietAdam, "update", True),  # keeps Adam's step: Adam's rule
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_subclasses_follow_the_step_they_run(cls: type, expected: str, warns: bool) -> None:
    model = mlp()
    assert SLOptimizer(cls(model.parameters(), lr=0.1), model=model, speeds={"*": 1.0}).mode == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SLOptimizer(cls(model.parameters(), lr=0.1), model=model, speeds={"*": 1.0}, mode="grad")
    assert any("mode='update'" in str(w.message) for w in caught) is warns


def layer_steps(opt: torch.optim.Optimizer, model: nn.Module, steps: int) -> list[dict[str, float]]:
    """Each layer's step norm ``||W_l(t+1) - W_l(t)||_F`` over ``steps`` steps of a fixed regression batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randn(64, 1, generator=g, dtype=torch.float64)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        moved = {}
        for layer in ("0", "2", "4"):
            sq = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters()
                     if n.startswith(layer + "."))
            moved[layer] = math.sqrt(sq)
        out.append(moved)
    return out


def test_adamw_by_default_moves_each_layer_lr_times_speed() -> None:
    # the held layers (C = 0.1) move lr * 0.1 per step under AdamW, not AdamW's own step length
    lr = 1e-3
    model = mlp()
    speeds = promote(model, "2", 10.0)
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=lr), model=model, speeds=speeds)
    assert opt.mode == "update"
    for step in layer_steps(opt, model, 5):
        assert step == pytest.approx({"0": lr * 0.1, "2": lr * 10.0, "4": lr * 0.1}, rel=1e-9)


def test_sgd_by_default_rescales_gradients() -> None:
    model = mlp()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), model=model, speeds={"*": 1.0})
    assert opt.mode == "grad"
    layer_steps(opt, model, 2)
    grads = [p.grad for p in model[0].parameters()]  # grad mode leaves the limited gradient in p.grad
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) == pytest.approx(1.0, rel=1e-12)


def test_state_dict_records_the_mode_and_a_resume_with_auto_continues() -> None:
    model = mlp()
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, speeds={"*": 1.0})
    layer_steps(opt, model, 2)
    saved = opt.state_dict()
    assert saved["slo_mode"] == "update"
    resumed = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, speeds={"*": 1.0})
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["slo_mode"] == "update" and len(resumed.state) == len(opt.state)
    with pytest.warns(UserWarning, match="mode='update'"):
        other = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model, speeds={"*": 1.0},
                            mode="grad")
    with pytest.raises(ValueError, match=r"saved with mode='update'.*mode='grad'"):
        other.load_state_dict(saved)
    assert len(other.state) == 0  # unchanged
