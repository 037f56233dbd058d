"""``speed_unit=``: each layer's step norm is ``lr * C_l * u_l`` with ``u_l`` = 1 (``"frobenius"``), ``sqrt(n_l)``
(``"rms"``) or ``||W_l||_F`` before the step (``"relative"``), checked against plain-torch references."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from conftest import cuda_host_syncs
from slo_torch import SLOptimizer, attach

SPEEDS = {"0": 5.0, "2": 0.5, "4": 0.2}
UNITS = ("frobenius", "rms", "relative")
LR = 0.01
BASES = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=LR),
    "momentum SGD": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1),
}


def make(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    return model, torch.randn(16, 5, dtype=dtype), torch.randn(16, 3, dtype=dtype)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    ((model(x) - y) ** 2).mean().backward()


def unit_factor(unit: str, tensors: list[torch.Tensor]) -> float:
    """``u_l`` of a layer made of ``tensors``, in plain torch."""
    if unit == "frobenius":
        return 1.0
    if unit == "rms":
        return math.sqrt(sum(t.numel() for t in tensors))
    norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))
    return norm if norm > 0 else 1.0


def joint_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def reference_step(model: nn.Module, opt: torch.optim.Optimizer, mode: str, unit: str,
                   speeds: dict[str, float] = SPEEDS) -> dict[str, float]:
    """One SLO step done by hand: rescale ``g_l`` to ``C_l u_l`` and step (grad), or step and rescale the change to
    ``lr C_l u_l`` (update). Returns each layer's target step norm ``lr C_l u_l``."""
    layers = {name: list(model.get_submodule(name).parameters()) for name in speeds}
    factors = {name: unit_factor(unit, ps) for name, ps in layers.items()}
    targets = {name: LR * speeds[name] * factors[name] for name in speeds}
    with torch.no_grad():
        if mode == "grad":
            for name, ps in layers.items():
                norm = joint_norm([p.grad for p in ps])
                for p in ps:
                    p.grad.mul_(speeds[name] * factors[name] / norm)
            opt.step()
        else:
            old = {p: p.detach().clone() for ps in layers.values() for p in ps}
            opt.step()
            for name, ps in layers.items():
                k = targets[name] / joint_norm([p - old[p] for p in ps])
                for p in ps:
                    p.copy_(old[p] + k * (p - old[p]))
    return targets


def limited(form: str, base: torch.optim.Optimizer, model: nn.Module, mode: str, unit: str, **kw):
    """(what to step, what reads out) for SLO set up by wrapping or by ``attach``."""
    if form == "wrap":
        opt = SLOptimizer(base, model=model, speeds=SPEEDS, mode=mode, speed_unit=unit, **kw)
        return opt, opt
    return base, attach(base, model, SPEEDS, mode=mode, speed_unit=unit, **kw)


@pytest.mark.parametrize("form", ["wrap", "attach"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unit", UNITS)
def test_every_layer_moves_by_its_target(unit: str, mode: str, base: str, form: str) -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    stepper, readout = limited(form, BASES[base](model.parameters()), model, mode, unit)
    ref_opt = BASES[base](ref.parameters())
    assert readout.speed_unit == unit
    for _ in range(3):
        for m, o in ((model, stepper), (ref, ref_opt)):
            o.zero_grad()
            backward(m, x, y)
        before = {name: [p.detach().clone() for p in model.get_submodule(name).parameters()] for name in SPEEDS}
        targets = reference_step(ref, ref_opt, mode, unit)
        stepper.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        if mode == "update" or base == "SGD":  # momentum and Adam step by their own rule in grad mode
            for name, old in before.items():
                moved = joint_norm([p - o for p, o in zip(model.get_submodule(name).parameters(), old)])
                assert moved == pytest.approx(targets[name], rel=1e-6), name
    if unit != "frobenius":  # the unit changes the steps: the test sees the factor
        assert any(t != pytest.approx(LR * SPEEDS[n]) for n, t in targets.items())


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_relative_all_zero_layer_moves_lr_times_speed(mode: str) -> None:
    model, x, y = make()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS, mode=mode,
                      speed_unit="relative")
    backward(model, x, y)
    before = [p.detach().clone() for p in model[2].parameters()]
    opt.step()
    moved = joint_norm([p - o for p, o in zip(model[2].parameters(), before)])
    assert moved == pytest.approx(LR * SPEEDS["2"], rel=1e-9)


@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unit", ["rms", "relative"])
def test_per_tensor_units_use_each_tensor_alone(unit: str, mode: str) -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds={"*": 2.0}, mode=mode,
                      per_tensor=True, speed_unit=unit)
    backward(model, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        target = LR * 2.0 * unit_factor(unit, [before[name]])
        assert float((p.detach() - before[name]).norm()) == pytest.approx(target, rel=1e-9), name


def _amp_run(fused: bool, scale: bool, mode: str, unit: str) -> nn.Module:
    model, x, y = make(dtype=torch.float32)
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, fused=fused), model=model,
                      speeds={"0": 5.0, "2": 0.5}, mode=mode, speed_unit=unit)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scale)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    return model


@pytest.mark.parametrize("fused", [False, True], ids=["AdamW", "fused AdamW"])
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unit", ["rms", "relative"])
def test_grad_scaler_equals_unscaled(unit: str, mode: str, fused: bool) -> None:
    scaled, plain = _amp_run(fused, True, mode, unit), _amp_run(fused, False, mode, unit)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_unknown_unit_names_the_choices() -> None:
    model, _, _ = make()
    with pytest.raises(ValueError, match=r"speed_unit 'fro'.*'frobenius', 'rms', 'relative'"):
        SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS, speed_unit="fro")
    with pytest.raises(ValueError, match="speed_unit"):
        attach(torch.optim.SGD(model.parameters(), lr=LR), model, SPEEDS, speed_unit="RMS")


def test_state_dict_records_the_unit_and_refuses_another() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model=model, speeds=SPEEDS, mode="update",
                      speed_unit="relative")
    backward(model, x, y)
    opt.step()
    saved = opt.state_dict()
    assert saved["slo_speed_unit"] == "relative"
    same = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model=model, speeds=SPEEDS, mode="update",
                       speed_unit="relative")
    same.load_state_dict(saved)
    assert same.state_dict()["state"].keys() == saved["state"].keys()
    other = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model=model, speeds={"*": 1.0}, mode="update")
    with pytest.raises(ValueError, match=r"speed_unit='relative'.*speed_unit='frobenius'"):
        other.load_state_dict(saved)
    assert len(other.state) == 0 and other.layer_speeds == {"0": 1.0, "2": 1.0, "4": 1.0}  # unchanged
    plain = {k: v for k, v in saved.items() if not k.startswith("slo_")}
    other.load_state_dict(plain)  # a plain optimizer's state dict carries no unit: loaded as it is
    assert len(other.state) == len(saved["state"])


def test_unit_appears_in_repr() -> None:
    model, _, _ = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS, speed_unit="rms")
    assert "speed_unit='rms'" in repr(opt)


def _host_reads(unit: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Calls that read a tensor's value on the host (a synchronisation on a GPU) during three steps."""
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model=model, speeds=SPEEDS,
                      mode=mode, speed_unit=unit)
    backward(model, x, y)
    opt.step()  # the first step builds state and, for "rms", counts the entries
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, **k: reads.append(1) or _real(self, *a, **k))
    for _ in range(3):
        opt.zero_grad()
        backward(model, x, y)
        opt.step()
    monkeypatch.undo()
    return len(reads)


@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unit", ["rms", "relative"])
def test_units_add_no_host_synchronisation(unit: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _host_reads(unit, mode, monkeypatch) == _host_reads("frobenius", mode, monkeypatch) == 3  # one a step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unit", ["rms", "relative"])
def test_cuda_step_with_a_unit_synchronises_with_the_host_once(unit: str, mode: str) -> None:
    model, x, y = make(dtype=torch.float32)
    model.cuda()
    x, y = x.cuda(), y.cuda()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model=model, speeds=SPEEDS,
                      mode=mode, speed_unit=unit)
    syncs = 0
    for i in range(4):  # the first step builds optimizer state and counts the entries
        opt.zero_grad()
        backward(model, x, y)
        syncs += cuda_host_syncs(opt.step) if i else 0
    assert syncs <= 3


@pytest.mark.parametrize("base, unit", [("momentum SGD", "relative"), ("AdamW", "rms")])
def test_resume_from_a_checkpoint_is_bit_identical(base: str, unit: str) -> None:
    def run(steps: int, checkpoint: dict | None = None) -> tuple[nn.Module, dict]:
        model, x, y = make()
        opt = SLOptimizer(BASES[base](model.parameters()), model=model, speeds=SPEEDS, speed_unit=unit)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["opt"])
        for _ in range(steps):
            opt.zero_grad()
            backward(model, x, y)
            opt.step()
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        return model, torch.load(buffer, weights_only=True)

    straight, _ = run(6)
    _, checkpoint = run(3)
    assert checkpoint["opt"]["slo_speed_unit"] == unit
    resumed, _ = run(3, checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))
