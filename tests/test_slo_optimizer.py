"""SLOptimizer and attach(): the maths, the torch.optim contract, AMP, schedulers, checkpoints."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import cuda_host_syncs
from slo_torch import SLOptimizer, attach, promote

# grad mode over Adam-type optimizers is tested here for its mechanics; the warning it earns, in test_slo_auto_mode.py
pytestmark = pytest.mark.filterwarnings("ignore:mode='grad' rescales the gradients:UserWarning")
SPEEDS = {"0": 5.0, "2": 0.5, "*": 0.2}
LAYERS = {"0": 5.0, "2": 0.5, "4": 0.2}


def make(seed: int = 0, dtype: torch.dtype = torch.float64, bias: bool = True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8, bias=bias), nn.Tanh(), nn.Linear(8, 8, bias=bias), nn.Tanh(),
                          nn.Linear(8, 3, bias=bias)).to(dtype)
    x = torch.randn(16, 5, dtype=dtype)
    y = torch.randn(16, 3, dtype=dtype)
    return model, x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def layer_norm(tensors: dict[str, torch.Tensor], layer: str) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in tensors.items() if n.rsplit(".", 1)[0] == layer))


def layer_deltas(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    diff = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return {layer: layer_norm(diff, layer) for layer in LAYERS}


def state_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, dict):
            if not state_equal(x, y):
                return False
        elif x != y:
            return False
    return True


# ----------------------------------------------------------------------------- the maths
def test_sgd_grad_mode_moves_each_layer_lr_times_speed() -> None:
    model, x, y = make()
    lr = 0.1
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model=model, speeds=SPEEDS)
    assert opt.layer_names == list(LAYERS)
    for _ in range(4):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = snapshot(model)
        opt.step()
        for layer, C in LAYERS.items():
            assert layer_deltas(model, before)[layer] == pytest.approx(lr * C, rel=1e-12)
            assert float(opt.last_grad_norms[layer]) == pytest.approx(layer_norm(grads, layer), rel=1e-12)
            assert opt.last_grad_norms[layer].dim() == 0


def test_grad_mode_formula_with_eps_and_adam() -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    eps = 0.3
    opt = SLOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model=model, speeds=SPEEDS, mode="grad",
                      slo_eps=eps)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, x, y).backward()
        for layer, C in LAYERS.items():  # manual g <- C g / (||g|| + eps)
            mod = ref.get_submodule(layer)
            norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in mod.parameters()))
            for p in mod.parameters():
                p.grad.mul_(C / (norm + eps))
        opt.step()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layers_without_speed_step_like_the_base() -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, speeds={"0": 1.0})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for m, o in ((model, opt), (ref, ref_opt)):  # one step: later gradients depend on layer "0"
        loss_of(m, x, y).backward()
        o.step()
    assert opt.layer_names == ["0"]
    assert not torch.equal(model[0].weight, ref[0].weight)
    for name in ("2.weight", "2.bias", "4.weight", "4.bias"):
        assert torch.equal(model.get_parameter(name), ref.get_parameter(name))


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_no_speed_limited_layer_in_the_optimizer_steps_like_the_base(mode: str) -> None:
    # the speeds name only a layer that is not (yet) optimized, e.g. one added later by add_param_group
    model, x, y = make()
    ref = copy.deepcopy(model)
    opt = SLOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model, speeds={"4": 3.0}, mode=mode)
    ref_opt = torch.optim.SGD(ref[0].parameters(), lr=0.1)
    for m, o in ((model, opt), (ref, ref_opt)):
        loss_of(m, x, y).backward()
        o.step()
    assert opt.layer_names == []
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_zero_gradient_stays_zero_and_missing_gradients_are_skipped() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    loss_of(model, x, y).backward()
    for p in model[2].parameters():
        p.grad.zero_()
    model[4].bias.grad = None
    before = snapshot(model)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model[2].weight, before["2.weight"]) and torch.equal(model[4].bias, before["4.bias"])
    assert torch.count_nonzero(model[2].weight.grad) == 0
    assert float(opt.last_grad_norms["2"]) == 0.0
    assert (model[4].weight - before["4.weight"]).norm().item() == pytest.approx(0.1 * 0.2, rel=1e-12)
    assert layer_deltas(model, before)["0"] == pytest.approx(0.1 * 5.0, rel=1e-12)


def test_per_tensor_mode() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"*": 2.0}, per_tensor=True)
    loss_of(model, x, y).backward()
    before = snapshot(model)
    opt.step()
    assert len(opt.layer_names) == 6
    for name, p in model.named_parameters():
        assert (p - before[name]).norm().item() == pytest.approx(0.2, rel=1e-12)


def _optimizer_cases() -> list[type[torch.optim.Optimizer]]:
    return [
        cls for name in torch.optim.__all__
        if isinstance(cls := getattr(torch.optim, name), type) and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    ]


class TwoTables(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(10, 4, sparse=True)
        self.b = nn.Embedding(10, 4, sparse=True)


@pytest.mark.parametrize("cls", _optimizer_cases(), ids=lambda c: c.__name__)
def test_update_mode_moves_each_layer_lr_times_speed_for_every_optimizer(cls) -> None:
    lr = 0.01
    if cls is torch.optim.SparseAdam:
        torch.manual_seed(0)
        model = TwoTables().double()
        idx = torch.tensor([1, 3, 3, 7])

        def loss_fn() -> torch.Tensor:
            return (model.a(idx) * model.b(idx).flip(0)).sum().pow(2)

        speeds, layers = {"a": 3.0, "*": 0.5}, {"a": 3.0, "b": 0.5}
    else:
        model, x, y = make(bias=cls.__name__ != "Muon")  # Muon (torch >= 2.9) takes 2-D parameters only

        def loss_fn() -> torch.Tensor:
            return loss_of(model, x, y)

        speeds, layers = SPEEDS, LAYERS
    opt = SLOptimizer(cls(model.parameters(), lr=lr), model=model, speeds=speeds, mode="update")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(3):
        before = snapshot(model)
        if cls is torch.optim.LBFGS:
            opt.step(closure)
        else:
            closure()
            opt.step()
        diff = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        for layer, C in layers.items():
            assert layer_norm(diff, layer) == pytest.approx(lr * C, rel=1e-9), layer
            assert float(opt.last_update_norms[layer]) > 0


def test_update_mode_follows_group_lr() -> None:
    model, x, y = make()
    groups = [{"params": model[0].parameters(), "lr": 0.5}, {"params": list(model[2].parameters()) + list(model[4].parameters())}]
    opt = SLOptimizer(groups, base_optimizer=torch.optim.AdamW, model=model, speeds=SPEEDS, mode="update", lr=0.01)
    loss_of(model, x, y).backward()
    before = snapshot(model)
    opt.step()
    d = layer_deltas(model, before)
    assert d["0"] == pytest.approx(0.5 * 5.0, rel=1e-10)
    assert d["2"] == pytest.approx(0.01 * 0.5, rel=1e-10)


# ------------------------------------------------------------------- the optimizer contract
def test_shares_containers_with_the_base() -> None:
    model, x, y = make()
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = SLOptimizer(base, model=model, speeds=SPEEDS)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.base_optimizer is base
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    loss_of(model, x, y).backward()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert len(opt.state) == 6
    text = repr(opt)
    assert "SLOptimizer(mode='update'" in text and "0: C=5" in text and "Adam (" in text


def test_built_from_class_and_kwargs() -> None:
    model, _, _ = make()
    opt = SLOptimizer(model.parameters(), base_optimizer=torch.optim.AdamW, model=model,
                      speeds=promote(model, "0", 500.0), mode="update", lr=3e-4, weight_decay=0.1)
    assert type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.defaults["weight_decay"] == 0.1
    assert opt.layer_speeds == {"0": 500.0, "2": 0.002, "4": 0.002}


def test_hooks_zero_grad_and_closure() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    before = snapshot(model)
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert layer_deltas(model, before)["0"] == pytest.approx(0.5, rel=1e-12)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model, speeds={"*": 1.0, "4": 3.0})
    assert opt.layer_names == ["0"]
    opt.add_param_group({"params": model[4].parameters(), "lr": 0.2})
    assert opt.layer_names == ["0", "4"] and len(opt.param_groups) == 2
    loss_of(model, x, y).backward()
    before = snapshot(model)
    opt.step()
    assert layer_deltas(model, before)["4"] == pytest.approx(0.2 * 3.0, rel=1e-12)
    with pytest.raises(ValueError, match="not parameters of the given model"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters()})
    assert len(opt.param_groups) == 2


def test_state_dict_is_torch_format() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), model=model, speeds=SPEEDS, mode="update")
    loss_of(model, x, y).backward()
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "slo_speeds", "slo_speed_unit", "slo_mode"}
    assert sd["slo_speeds"] == SPEEDS
    assert state_equal(sd["state"], opt.base_optimizer.state_dict()["state"])
    plain = torch.optim.AdamW(make()[0].parameters(), lr=0.01)
    plain.load_state_dict(sd)  # loadable by the plain optimizer too, which ignores the speeds
    assert state_equal(plain.state_dict(), opt.base_optimizer.state_dict())


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from slo_torch import SLOptimizer
    phase, path = sys.argv[1], sys.argv[2]
    for mode in ("grad", "update"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
        base = torch.optim.AdamW(model.parameters(), lr=0.01) if mode == "update" else \\
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        opt = SLOptimizer(base, model=model, speeds={"0": 4.0, "*": 0.25}, mode=mode)
        if phase != "second":  # speeds changed after construction are part of the checkpoint
            opt.set_speeds({"0": 0.5, "*": 2.0})
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        if phase == "second":
            ckpt = torch.load(f"{path}.{mode}.ckpt")
            model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["opt"]); sched.load_state_dict(ckpt["sched"])
        for _ in range(3 if phase != "straight" else 6):
            opt.zero_grad(); ((model(x) - y) ** 2).mean().backward(); opt.step(); sched.step()
        if phase == "first":
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
                       f"{path}.{mode}.ckpt")
        else:
            torch.save(model.state_dict(), f"{path}.{mode}.{phase}")
""")


def test_resume_in_fresh_process_is_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    path = str(tmp_path / "run")
    run = lambda phase: subprocess.Popen([sys.executable, str(script), phase, path])  # noqa: E731
    for batch in (("first", "straight"), ("second",)):
        procs = [run(phase) for phase in batch]
        try:
            assert all(p.wait(timeout=120) == 0 for p in procs)
        finally:
            for p in procs:
                p.kill()
    for mode in ("grad", "update"):
        resumed, straight = torch.load(f"{path}.{mode}.second"), torch.load(f"{path}.{mode}.straight")
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)
        first = torch.load(f"{path}.{mode}.ckpt")["model"]
        assert not all(torch.equal(first[k], straight[k]) for k in straight)


# ------------------------------------------------------------------------ non-finite steps
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("where", ["2.weight", "4.bias"])
def test_nonfinite_gradient_skips_the_whole_step(mode: str, where: str) -> None:
    model, x, y = make()
    speeds = SPEEDS if where == "2.weight" else {"0": 5.0, "2": 1.0}  # "4" has no speed
    opt = SLOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model=model, speeds=speeds, mode=mode)
    loss_of(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model.get_parameter(where).grad[0] = float("nan")
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="Non-finite gradient"):
        opt.step()
    assert opt.nonfinite_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert state_equal(opt.state_dict(), state)
    opt.zero_grad()
    loss_of(model, x, y).backward()
    opt.step()  # training continues
    assert opt.nonfinite_steps == 1 and not torch.equal(model[0].weight, before["0.weight"])


def test_nonfinite_raise() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS, on_nonfinite="raise")
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"Non-finite gradient in \['0'\]"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_normalises_once_per_step() -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, speeds=SPEEDS)
    ref_opt = SLOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), model=ref, speeds=SPEEDS)
    for _ in range(3):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            (loss_of(model, xb, yb) / 4).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_of(ref, x, y).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------- schedulers
def _schedulers():
    L = torch.optim.lr_scheduler
    return {
        "StepLR": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
        "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
        "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.9),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=4),
        "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=2),
        "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.5, total_steps=10),
        "LambdaLR": lambda o: L.LambdaLR(o, lambda s: 1 / (1 + s)),
        "LinearLR": lambda o: L.LinearLR(o, start_factor=0.2, total_iters=3),
        "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=4, power=2.0),
        "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.5, total_iters=2), L.ExponentialLR(o, 0.9)], [2]),
        "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5),
        "CyclicLR": lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2, cycle_momentum=True),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
def test_lr_schedulers_drive_it(name: str) -> None:
    factory = _schedulers()[name]
    model, x, y = make()
    ref = copy.deepcopy(model)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, speeds=SPEEDS)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched, ref_sched = factory(opt), factory(ref_opt)
        for step in range(6):
            for m, o, s in ((model, opt, sched), (ref, ref_opt, ref_sched)):
                o.zero_grad()
                loss_of(m, x, y).backward()
                o.step()
                s.step(1.0) if name == "ReduceLROnPlateau" else s.step()
            assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
            assert opt.param_groups[0]["momentum"] == ref_opt.param_groups[0]["momentum"]
    assert not [w for w in caught if "lr_scheduler" in str(w.message) or "optimizer.step" in str(w.message)]


# ----------------------------------------------------------------------------------- AMP
def _amp_run(fused: bool, scale: bool, mode: str, inf_step: int | None = None, unscale_first: bool = False,
             init_scale: float = 2.0**12):
    model, x, y = make(dtype=torch.float32)
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused), model=model,
                      speeds={"0": 5.0, "2": 0.5}, mode=mode)  # layer "4" untouched: scaled grads reach the base
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=scale)
    norms = []
    for step in range(4):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        if step == inf_step:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if unscale_first:  # e.g. to clip: the base then gets found_inf but no grad_scale
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        norms.append({k: float(v) for k, v in opt.last_grad_norms.items()})
    return model, opt, scaler, norms


@pytest.mark.parametrize("fused", [False, True], ids=["AdamW", "fused AdamW"])
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["", "unscale_ first"])
def test_grad_scaler_equals_unscaled(fused: bool, mode: str, unscale_first: bool) -> None:
    scaled, opt, _, norms = _amp_run(fused, True, mode, unscale_first=unscale_first)
    plain, _, _, ref_norms = _amp_run(fused, False, mode)
    assert opt._step_supports_amp_scaling is fused
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n, r in zip(norms, ref_norms):
        assert n == pytest.approx(r, rel=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["AdamW", "fused AdamW"])
def test_grad_scaler_overflow_is_skipped_by_the_scaler(fused: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, opt, scaler, _ = _amp_run(fused, True, "grad", inf_step=3)
    ref, _, _, _ = _amp_run(fused, True, "grad", inf_step=None)
    assert opt.nonfinite_steps == 0  # the scaler's own overflow handling, not counted as ours
    assert scaler.get_scale() == 2.0**11
    assert sum(int(s["step"]) for s in opt.state.values()) == 3 * 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_fused_optimizer_at_a_huge_loss_scale_equals_unscaled(mode: str) -> None:
    # ||S g||^2 with S = 2**70 overflows float32 although S g and g are finite
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        scaled, opt, scaler, norms = _amp_run(True, True, mode, init_scale=2.0**70)
    plain, _, _, ref_norms = _amp_run(True, False, mode)
    assert opt.nonfinite_steps == 0 and opt.taken_steps == 4 and scaler.get_scale() == 2.0**70
    for a, b in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n, r in zip(norms, ref_norms):
        assert n == pytest.approx(r, rel=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["AdamW", "fused AdamW"])
def test_skipped_scaler_step_keeps_the_norms_of_the_last_step_taken(fused: bool) -> None:
    _, opt, _, norms = _amp_run(fused, True, "grad", inf_step=2)
    assert opt.taken_steps == 3
    assert norms[2] == norms[1] and all(math.isfinite(v) for n in norms for v in n.values())
    assert norms[3] != norms[1]


def test_nonfinite_skip_keeps_the_norms_of_the_last_step_taken() -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    loss_of(model, x, y).backward()
    opt.step()
    taken = {k: float(v) for k, v in opt.last_grad_norms.items()}
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="Non-finite gradient"):
        opt.step()
    assert {k: float(v) for k, v in opt.last_grad_norms.items()} == taken
    assert opt.taken_steps == 1 and opt.nonfinite_steps == 1


# ----------------------------------------------------------------------------- precision
def _complex_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, dtype=torch.complex128), nn.Tanh(), nn.Linear(8, 8, dtype=torch.complex128),
                          nn.Tanh(), nn.Linear(8, 3, dtype=torch.complex128))
    return model, torch.randn(16, 5, dtype=torch.complex128), torch.randn(16, 3, dtype=torch.complex128)


@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize("case", ["double() after construction", "complex128"])
def test_norms_accumulate_in_the_parameters_precision(case: str, mode: str) -> None:
    if case == "complex128":
        model, x, y = _complex_model()
    else:
        model, x, y = make(dtype=torch.float32)
    lr = 0.01
    opt = SLOptimizer(torch.optim.Adam(model.parameters(), lr=lr), model=model, speeds=SPEEDS, mode=mode)
    if case != "complex128":
        model.double()
        x, y = x.double(), y.double()
    for _ in range(2):
        opt.zero_grad()
        (model(x) - y).abs().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = snapshot(model)
        opt.step()
        deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        for layer, C in LAYERS.items():
            ref = math.sqrt(sum(float(g.abs().pow(2).sum()) for n, g in grads.items() if n.startswith(layer + ".")))
            assert opt.last_grad_norms[layer].dtype == torch.float64
            assert float(opt.last_grad_norms[layer]) == pytest.approx(ref, rel=1e-13)
            if mode == "update":
                moved = math.sqrt(sum(float(d.abs().pow(2).sum()) for n, d in deltas.items()
                                      if n.startswith(layer + ".")))
                assert moved == pytest.approx(lr * C, rel=1e-12)


def test_grad_mode_rescales_in_double_after_double() -> None:
    model, x, y = make(dtype=torch.float32)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    model.double()
    loss_of(model, x.double(), y.double()).backward()
    before = snapshot(model)
    opt.step()
    for layer, C in LAYERS.items():
        assert layer_deltas(model, before)[layer] == pytest.approx(0.1 * C, rel=1e-13)


# -------------------------------------------------------------------------------- attach
def test_attach_equals_wrapper_and_removes() -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    handle = attach(base, model, SPEEDS)
    ref_opt = SLOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), model=ref, speeds=SPEEDS)
    for _ in range(3):
        for m, o in ((model, base), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert handle.layer_names == list(LAYERS) and set(handle.last_grad_norms) == set(LAYERS)
    handle.remove()
    base.zero_grad()
    loss_of(model, x, y).backward()
    grad = model[0].weight.grad.clone()
    before = model[0].weight.detach().clone()
    base.step()
    buf = base.state[model[0].weight]["momentum_buffer"]
    torch.testing.assert_close(model[0].weight, before - 0.1 * buf)
    assert torch.equal(model[0].weight.grad, grad)  # no longer normalised


def test_attach_handle_sees_param_groups_added_later() -> None:
    model, x, y = make()
    base = torch.optim.SGD(model[0].parameters(), lr=0.1)
    handle = attach(base, model, SPEEDS)
    base.add_param_group({"params": model[4].parameters()})
    assert handle.layer_names == ["0", "4"]  # before any step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_cuda_layers_on_two_devices_and_model_moved_after_construction(mode: str) -> None:
    # norms and coefficients cross between host and device: copies to the host must complete before use
    model, x, y = make(dtype=torch.float32)
    moved = copy.deepcopy(model)
    model[2:].cuda()
    forward = lambda: model[4](model[3](model[2](model[1](model[0](x)).cuda())))  # noqa: E731
    opt = SLOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model=model, speeds=SPEEDS, mode=mode)
    opt_moved = SLOptimizer(torch.optim.Adam(moved.parameters(), lr=0.01), model=moved, speeds=SPEEDS, mode=mode)
    moved.cuda()  # after the optimizer was built: the plan follows the parameters to the device
    big = torch.randn(4096, 4096, device="cuda")
    for m, o, out in ((model, opt, forward), (moved, opt_moved, lambda: moved(x.cuda()))):
        for _ in range(3):
            o.zero_grad()
            ((out() - y.cuda()) ** 2).mean().backward()
            before = snapshot(m)
            for _ in range(20):  # keep the device busy so that an unfinished copy would be read
                big = big @ big / 4096**0.5
            o.step()
            deltas = {n: p.detach().cpu() - before[n].cpu() for n, p in m.named_parameters()}
            if mode == "update":
                for layer, C in LAYERS.items():
                    assert layer_norm(deltas, layer) == pytest.approx(0.01 * C, rel=1e-4)
            norms = {k: float(v) for k, v in o.last_grad_norms.items()}
            assert all(math.isfinite(v) and v > 0 for v in norms.values()) and set(norms) == set(LAYERS)
    # the norms (and so the coefficients) are computed where the moved parameters now are
    assert {v.device.type for v in opt_moved.last_grad_norms.values()} == {"cuda"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_cuda_step_synchronises_with_the_host_once(mode: str) -> None:
    # a parameter without gradient (frozen) and an lr that changes every step take the slow paths
    model, x, y = make(dtype=torch.float32)
    model.cuda()
    x, y = x.cuda(), y.cuda()
    model[2].bias.requires_grad_(False)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model, speeds=SPEEDS,
                      mode=mode)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    steps = 3
    syncs = 0
    for i in range(steps + 1):  # the first step builds optimizer state
        opt.zero_grad()
        loss_of(model, x, y).backward()
        syncs += cuda_host_syncs(opt.step)
        sched.step()
        if i == 0:
            syncs = 0
    assert syncs <= steps  # the skip decision only, not one per index or lr tensor


def test_attach_update_mode_and_nonfinite() -> None:
    model, x, y = make()
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    handle = attach(base, model, SPEEDS, mode="update")
    loss_of(model, x, y).backward()
    before = snapshot(model)
    base.step()
    for layer, C in LAYERS.items():
        assert layer_deltas(model, before)[layer] == pytest.approx(0.01 * C, rel=1e-10)
    base.zero_grad()
    loss_of(model, x, y).backward()
    model[2].bias.grad[0] = float("nan")
    before, state = snapshot(model), copy.deepcopy(base.state_dict())
    with pytest.warns(RuntimeWarning):
        base.step()
    assert handle.nonfinite_steps == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert state_equal(base.state_dict(), state)
    with pytest.raises(RuntimeError, match="closure"):
        base.step(lambda: loss_of(model, x, y))
    with pytest.raises(ValueError, match="already attached"):
        attach(base, model, SPEEDS)


# ----------------------------------------------------------- torch.optim contract details
def _wrapped(form: str, model: nn.Module, **kw):
    """(optimizer to step, handle or wrapper) for the four ways of setting SLO up."""
    if form == "attach grad" or form == "attach update":
        base = torch.optim.Adam(model.parameters(), lr=0.01)
        return base, attach(base, model, SPEEDS, mode=form.split()[1], **kw)
    opt = SLOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model=model, speeds=SPEEDS, mode=form, **kw)
    return opt, opt


FORMS = ["grad", "update", "attach grad", "attach update"]


@pytest.mark.parametrize("form", FORMS)
def test_step_without_any_gradient_is_a_noop(form: str) -> None:
    model, x, y = make()
    opt, _ = _wrapped(form, model)
    before = snapshot(model)
    opt.step()  # e.g. the optimizer of a frozen part: no parameter has a gradient
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and len(opt.state) == 0
    loss_of(model, x, y).backward()
    opt.step()  # later steps are normal
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_grad_mode_leaves_the_limited_gradient_in_p_grad() -> None:
    # like clip_grad_norm_, grad mode rescales p.grad in place; last_grad_norms keeps the raw norms
    for form in FORMS:
        model, x, y = make()
        opt, handle = _wrapped(form, model)
        loss_of(model, x, y).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for layer, C in LAYERS.items():
            norm = layer_norm(raw, layer)
            assert float(handle.last_grad_norms[layer]) == pytest.approx(norm, rel=1e-12)
            for name in (f"{layer}.weight", f"{layer}.bias"):
                expected = raw[name] * (C / norm) if "grad" in form else raw[name]
                torch.testing.assert_close(model.get_parameter(name).grad, expected, rtol=1e-12, atol=0)


def test_attach_step_none_means_no_closure() -> None:
    model, x, y = make()
    ref = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(base, model, SPEEDS)
    ref_opt = SLOptimizer(torch.optim.SGD(ref.parameters(), lr=0.1), model=ref, speeds=SPEEDS)
    for call in (lambda o: o.step(None), lambda o: o.step(closure=None)):
        for m, o in ((model, base), (ref, ref_opt)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            call(o)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_attach_and_wrap_exclude_each_other() -> None:
    model, _, _ = make()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = attach(base, model, SPEEDS)
    with pytest.raises(ValueError, match=r"attached to this optimizer \(attach\(\)\); call handle.remove\(\)"):
        SLOptimizer(base, model=model, speeds={"*": 1.0})
    handle.remove()
    opt = SLOptimizer(base, model=model, speeds={"*": 1.0})
    with pytest.raises(ValueError, match="wrapped by an SLOptimizer"):
        attach(base, model, SPEEDS)
    with pytest.raises(ValueError, match="wrapped by an SLOptimizer"):
        attach(copy.deepcopy(opt).base_optimizer, model, SPEEDS)


def test_global_step_hooks_run_once_per_step() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    model, x, y = make()
    calls: list[tuple[str, type]] = []
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    base.register_step_pre_hook(lambda o, a, k: calls.append(("base pre", type(o))))
    opt = SLOptimizer(base, model=model, speeds=SPEEDS)
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o))))
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o)))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", type(o))))]
    try:
        loss_of(model, x, y).backward()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    S, B = SLOptimizer, torch.optim.SGD
    assert calls == [("global pre", S), ("pre", S), ("base pre", B), ("global post", S)]


def test_failed_load_state_dict_leaves_the_optimizer_unchanged() -> None:
    model, x, y = make()
    groups = [{"params": model[0].parameters(), "speed": 2.0}, {"params": list(model[2:].parameters())}]
    opt = SLOptimizer(groups, base_optimizer=torch.optim.Adam, model=model, lr=0.01)
    loss_of(model, x, y).backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    plain = torch.optim.Adam([{"params": model[0].parameters()}, {"params": list(model[2:].parameters())}], lr=0.5)
    with pytest.raises(ValueError, match=r"Cannot load this state dict \(the optimizer is unchanged\).*No speeds"):
        opt.load_state_dict(plain.state_dict())  # its groups carry no "speed"
    assert state_equal(opt.state_dict(), before) and opt.layer_speeds == {"0.weight": 2.0, "0.bias": 2.0}
    bad = copy.deepcopy(before)
    bad["slo_speeds"] = {"nope": 1.0}
    bad["param_groups"] = [{k: v for k, v in g.items() if k != "speed"} for g in bad["param_groups"]]
    with pytest.raises(ValueError, match="match no layer"):
        opt.load_state_dict(bad)
    assert state_equal(opt.state_dict(), before)
    opt.step()  # still works


def test_set_speeds_are_saved_and_loaded() -> None:
    model, _, _ = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    opt.set_speeds({"0": np.float32(7.0), "*": 1.0})
    sd = opt.state_dict()
    assert sd["slo_speeds"] == {"0": 7.0, "*": 1.0}
    other = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS)
    other.load_state_dict(sd)
    assert other.layer_speeds == {"0": 7.0, "2": 1.0, "4": 1.0}
    other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())  # plain: speeds kept
    assert other.layer_speeds == {"0": 7.0, "2": 1.0, "4": 1.0}


@pytest.mark.parametrize("form", ["grad", "update"])
def test_deepcopy_and_pickle_after_a_scheduler_behave_as_torch(form: str, tmp_path: Path) -> None:
    model, x, y = make()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=SPEEDS, mode=form)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # puts a step wrapper on the instance
    opt.register_step_pre_hook(lambda o, a, k: None)  # local hooks are not copied, as in torch
    loss_of(model, x, y).backward()
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(twin_params, model.parameters()):
        p.grad = q.grad.clone()  # deepcopy does not copy gradients
    before, twin_before = snapshot(model), [p.detach().clone() for p in twin_params]
    twin.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original is untouched
    deltas = [float((p.detach() - b).norm()) for p, b in zip(twin_params, twin_before)]
    assert math.hypot(deltas[0], deltas[1]) == pytest.approx(0.1 * 5.0, rel=1e-12)
    assert twin.layer_speeds == opt.layer_speeds and not twin._optimizer_step_pre_hooks
    torch.save(opt, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=False)
    assert state_equal(loaded.state_dict()["state"], opt.state_dict()["state"])
    assert loaded.layer_speeds == opt.layer_speeds


def test_eps_of_the_base_reaches_it_and_slo_eps_is_slo_s() -> None:
    model, _, _ = make()
    opt = SLOptimizer(model.parameters(), base_optimizer=torch.optim.AdamW, model=model, speeds=SPEEDS,
                      lr=1e-3, eps=1e-6, slo_eps=0.5)
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.defaults["eps"] == 1e-6 and opt.slo_eps == 0.5
    with pytest.raises(TypeError, match=r"not both.*kwargs=\['eps'\]"):  # an instance takes no base keywords
        SLOptimizer(torch.optim.AdamW(model.parameters()), model=model, speeds=SPEEDS, eps=0.25)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eps'"):
        attach(torch.optim.SGD(model.parameters(), lr=0.1), model, SPEEDS, eps=0.25)
    with pytest.raises(TypeError, match="SGD takes no eps; SLO's own eps is slo_eps="):
        SLOptimizer(model.parameters(), base_optimizer=torch.optim.SGD, model=model, speeds=SPEEDS, lr=0.1, eps=0.1)

    class WithMode(torch.optim.SGD):  # a base optimizer with a keyword of SLO's own
        def __init__(self, params, lr: float = 0.1, mode: str = "fast") -> None:
            super().__init__(params, lr=lr)

    with pytest.raises(TypeError, match=r"WithMode has its own \['mode'\] keyword.*wrap the instance"):
        SLOptimizer(model.parameters(), base_optimizer=WithMode, model=model, speeds=SPEEDS, mode="update")


def test_meta_parameters_let_the_base_optimizer_speak() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), fused=True), model=model, speeds={"*": 1.0})
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad()
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


def test_update_mode_is_exact_when_the_base_step_dwarfs_the_parameters() -> None:
    # the base moves parameters by ~1e12 (LBFGS on a degenerate loss does); the result must still be
    # p_old + lr C delta / ||delta||, not p_new + (1 - k)(p_old - p_new), which cancels p_old
    model, x, y = make(dtype=torch.float32)
    ref = copy.deepcopy(model)
    speeds = {name: C * 1e-12 for name, C in SPEEDS.items()}  # lr * C_l as in LAYERS
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=1e12), model=model, speeds=speeds, mode="update")
    loss_of(model, x, y).backward()
    loss_of(ref, x, y).backward()
    opt.step()
    for layer, C in LAYERS.items():
        grads = [p.grad.double() for p in ref.get_submodule(layer).parameters()]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        for p, p0, g in zip(model.get_submodule(layer).parameters(), ref.get_submodule(layer).parameters(), grads):
            expected = p0.detach().double() - C * g / norm
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="on torch 2.6 update mode's LBFGS strong-Wolfe line search raises IndexError on this loss")
def test_update_mode_lbfgs_on_a_degenerate_loss_steps_like_lbfgs() -> None:
    # the loss is unbounded below (BatchNorm output summed): plain LBFGS ends in NaN; update mode must
    # not crash inside the line search, and skips the non-finite steps
    results = {}
    for mode in ("plain", "update"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2))
        x = torch.rand(1, 4, 16, 16)
        base = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
        opt = base if mode == "plain" else SLOptimizer(base, model=model, speeds={"*": 1.0}, mode="update")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(4):
                opt.step(closure)
        results[mode] = [bool(torch.isfinite(p).all()) for p in model.parameters()]
    assert results["update"] == results["plain"] == [False] * 4


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_layer_that_changes_dtype_mid_run_leaves_the_one_dtype_fast_path(mode, monkeypatch) -> None:
    """The fast path of the rescaling needs one dtype: after one layer turns bfloat16 between steps the
    tensors are grouped by dtype, and each layer still moves by ``lr * C_l``."""
    import slo_torch.limiter as limiter

    paths: list[bool] = []
    for name in ("scale_layers_", "rescale_updates_"):
        real = getattr(limiter, name)

        def spy(*args, _real=real, **kwargs):
            paths.append(args[-1] is not None)  # a CoefficientBuffer: the one-dtype fast path
            return _real(*args, **kwargs)

        monkeypatch.setattr(limiter, name, spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 3, bias=False))
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"0": 1.0, "1": 0.5},
                      mode=mode)
    x = torch.randn(16, 4)
    for step in range(2):
        if step == 1:
            model[1].to(torch.bfloat16)
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.zero_grad()
        h = model[0](x).to(model[1].weight.dtype)
        model[1](h).float().square().mean().backward()
        opt.step()
        moved = [(p.detach().double() - b).norm().item() for p, b in zip(model.parameters(), before)]
        bf16_rounding = 5e-2 if step == 1 else 1e-5  # the bfloat16 weights round the step they take
        assert moved[0] == pytest.approx(0.1, rel=1e-5) and moved[1] == pytest.approx(0.05, rel=bf16_rounding)
    assert paths == [True, False]


def test_attach_handle_reads_out_the_layer_speeds_as_the_wrapper_does() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    speeds = promote(model, "0", 10.0)
    wrapped = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=speeds)
    handle = attach(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=speeds)
    assert handle.layer_speeds == wrapped.layer_speeds == {"0": 10.0, "2": 0.1}
    handle.limiter.set_speeds({"*": 2.0})
    assert handle.layer_speeds == {"0": 2.0, "2": 2.0}
