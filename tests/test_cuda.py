"""On a CUDA device (skipped without one; ``benchmarks/device_check.sh`` runs them): SLO with fused AdamW under
bfloat16 autocast and ``GradScaler``, ``NFAMonitor`` with a generator on the device, and the Trainer example."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diagnostics import NFAMonitor, ptk_covariance
from slo_torch import SLOptimizer

from test_diag_groups import LAYERS as LAYERS_W
from test_diag_groups import _mlp, _smallest_budget
from test_diag_robust import mlp, probe
from test_slo_optimizer import LAYERS, SPEEDS, layer_deltas, make, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train(fused: bool, steps: int = 3) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """``steps`` SLO steps (update mode) of AdamW under bfloat16 autocast with a GradScaler; per step the
    parameter change of each layer."""
    model, x, y = make(dtype=torch.float32)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused, foreach=None if fused else True),
                      model=model, speeds=SPEEDS, mode="update")
    scaler = torch.amp.GradScaler("cuda")
    deltas = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ((model(x).float() - y) ** 2).mean()
        scaler.scale(loss).backward()
        before = snapshot(model)
        scaler.step(opt)
        scaler.update()
        deltas.append(layer_deltas(model, before))
    return model, deltas


def test_slo_fused_adamw_under_bf16_autocast_and_grad_scaler() -> None:
    fused, fused_deltas = _train(fused=True)
    looped, looped_deltas = _train(fused=False)
    for step in fused_deltas:  # update mode: every layer moves by lr * C per step
        for layer, C in LAYERS.items():
            assert step[layer] == pytest.approx(0.01 * C, rel=1e-4)
    for (name, p), q in zip(fused.named_parameters(), looped.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(fused_deltas, looped_deltas):
        assert a == pytest.approx(b, rel=1e-4)


def test_nfa_monitor_with_a_generator_on_the_device() -> None:
    model, x = mlp().cuda(), probe().cuda()
    cpu = ptk_covariance(mlp(), probe())
    exact = ptk_covariance(model, x)
    for name in cpu:
        torch.testing.assert_close(exact[name].cpu(), cpu[name], rtol=1e-10, atol=1e-12)
    gen = torch.Generator(device="cuda").manual_seed(3)
    mon = NFAMonitor(model)
    on_device = mon.measure(x, estimator="sketch", m=4, generator=gen)
    seeded = NFAMonitor(model).measure(x, estimator="sketch", m=4, generator=3)  # an int seeds a CUDA generator
    for name, rec in on_device.items():
        assert rec.uc_nfa == pytest.approx(seeded[name].uc_nfa, rel=1e-12)
        assert mon.last_K[name].device.type == "cuda"
    wide, xw = _mlp(torch.float64).cuda(), torch.randn(20, 6, dtype=torch.float64, device="cuda")
    budget = _smallest_budget(lambda b: NFAMonitor(wide, layers=LAYERS_W, max_memory=b))
    grouped_mon = NFAMonitor(wide, layers=LAYERS_W, max_memory=budget)
    assert len(grouped_mon.groups) >= 2
    gens = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    grouped = grouped_mon.measure(xw, estimator="sketch", m=4, generator=gens[0])
    one = NFAMonitor(wide, layers=LAYERS_W).measure(xw, estimator="sketch", m=4, generator=gens[1])
    for name, rec in one.items():
        assert grouped[name].uc_nfa == pytest.approx(rec.uc_nfa, rel=1e-9)


def test_trainer_example_runs_on_the_gpu(tmp_path: Path) -> None:
    from conftest import load_example
    from test_hf_example import TINY

    ex = load_example("hf_trainer", "hf_trainer_example_cuda")
    trainer = ex.main(TINY + ["--optimizer", "slo", "--output-dir", str(tmp_path), "--no-plot"])
    assert trainer.state.global_step == 4
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert any("nfa/c/transformer.h.0.mlp.c_fc" in h for h in trainer.state.log_history)
