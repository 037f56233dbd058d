"""``SLOptimizer`` and ``SLOCallback`` inside a single-process ``transformers.Trainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from slo_torch import SLOptimizer, resolve_layers  # noqa: E402
from slo_torch.hf import SLOCallback  # noqa: E402

from conftest import SEQ, char_ids, load_example, tiny_gpt2  # noqa: E402

ex = load_example("hf_trainer", "hf_trainer_example_slo")
LR = 0.05
SPEEDS = {"transformer.h.0.mlp.c_fc": 3.0, "*": 0.5}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train() -> Any:
    ids, _ = char_ids(ex)
    return ex.CharWindows(ids[:2000], SEQ)


def args_for(tmp: Path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(tmp), use_cpu=True, max_steps=8, per_device_train_batch_size=8, learning_rate=LR,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class StepNorms(TrainerCallback):
    """Per layer: ``||g_l||`` seen by the optimizer and ``||theta_l(after) - theta_l(before)||`` of every step."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.grad_norms: list[dict[str, float]] = []
        self.step_norms: list[dict[str, float]] = []

    def _flat(self, layer: Any, grad: bool = False) -> torch.Tensor:
        return torch.cat([(p.grad if grad else p).detach().reshape(-1).clone() for p in layer.params])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._before = {lay.name: self._flat(lay) for lay in self.layers}
        self.grad_norms.append({lay.name: float(self._flat(lay, grad=True).norm()) for lay in self.layers})

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step_norms.append(
            {lay.name: float((self._flat(lay) - self._before[lay.name]).norm()) for lay in self.layers}
        )


def run(tmp: Path, train: Any, way: str, **kw: Any) -> tuple[Trainer, StepNorms]:
    model = tiny_gpt2(ex)
    layers = [lay for lay in resolve_layers(model, SPEEDS) if lay.speed is not None]
    probe = StepNorms(layers)
    if way == "instance":
        opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS)
        extra: dict[str, Any] = {"optimizers": (opt, None)}
    else:
        kwargs = {"base_optimizer": torch.optim.SGD, "model": model, "speeds": SPEEDS, "lr": LR}
        extra = {"optimizer_cls_and_kwargs": (SLOptimizer, kwargs)}
    trainer = Trainer(model, args_for(tmp, **kw), train_dataset=train, callbacks=[probe, SLOCallback()], **extra)
    trainer.train()
    return trainer, probe


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("way", ["instance", "cls_and_kwargs"])
def test_every_layer_moves_lr_times_C_and_loss_decreases(tmp_path: Path, train: Any, way: str) -> None:
    trainer, probe = run(tmp_path, train, way)
    slo = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps it
    assert isinstance(slo, SLOptimizer)
    assert "transformer.h.0.mlp.c_fc" in slo.layer_names and "transformer.wte" in slo.layer_names
    assert len(probe.step_norms) == 8
    for step in probe.step_norms:
        for name, norm in step.items():
            assert norm == pytest.approx(LR * (3.0 if name == "transformer.h.0.mlp.c_fc" else 0.5), rel=1e-9)
    curve = losses(trainer)
    assert len(curve) == 8 and sum(curve[-2:]) < sum(curve[:2]) - 0.05


def test_both_ways_train_identically(tmp_path: Path, train: Any) -> None:
    a, _ = run(tmp_path / "a", train, "instance", max_steps=3)
    b, _ = run(tmp_path / "b", train, "cls_and_kwargs", max_steps=3)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_default_clipping_is_moot_in_grad_mode(tmp_path: Path, train: Any) -> None:
    """Trainer clips the global gradient norm before the step; grad-mode SLO normalises it away."""
    clipped, _ = run(tmp_path / "c", train, "instance", max_steps=3, max_grad_norm=1e-3)
    plain, _ = run(tmp_path / "p", train, "instance", max_steps=3, max_grad_norm=0.0)
    for p, q in zip(clipped.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_slo_callback_logs_the_norms_the_optimizer_saw(tmp_path: Path, train: Any) -> None:
    trainer, probe = run(tmp_path, train, "cls_and_kwargs", max_steps=3, max_grad_norm=0.0)
    entries = [h for h in trainer.state.log_history if "loss" in h]
    assert len(entries) == 3
    for entry, seen in zip(entries, probe.grad_norms):
        for name, norm in seen.items():
            assert entry[f"slo/grad_norm/{name}"] == pytest.approx(norm, rel=1e-6)
        assert entry["slo/nonfinite_steps"] == 0


def test_resume_restores_slo_state_and_continues_identically(tmp_path: Path, train: Any) -> None:
    def trainer_for(out: Path) -> Trainer:
        model = tiny_gpt2(ex)
        kwargs = {"base_optimizer": torch.optim.SGD, "model": model, "speeds": SPEEDS, "lr": LR, "momentum": 0.9}
        return Trainer(model, args_for(out, max_steps=6, save_strategy="steps", save_steps=3, max_grad_norm=0.0),
                       train_dataset=train, optimizer_cls_and_kwargs=(SLOptimizer, kwargs))

    full = trainer_for(tmp_path / "full")
    full.train()
    resumed = trainer_for(tmp_path / "resumed")
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert len(saved["state"]) > 0 and all("momentum_buffer" in s for s in saved["state"].values())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    s_full = full.optimizer.optimizer.state_dict()["state"]
    s_res = resumed.optimizer.optimizer.state_dict()["state"]
    assert s_full.keys() == s_res.keys()
    for k in s_full:
        torch.testing.assert_close(s_full[k]["momentum_buffer"], s_res[k]["momentum_buffer"], rtol=0, atol=1e-12)
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], abs=1e-12)


class Recorder(TrainerCallback):
    """A stand-in reporter registered before SLOCallback: what its ``on_log`` receives."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        self.logs.append(dict(logs or {}))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_callback_warns_on_clipping_and_runs_before_reporters(tmp_path: Path, train: Any, clip: float) -> None:
    model = tiny_gpt2(ex)
    recorder = Recorder()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS)
    trainer = Trainer(model, args_for(tmp_path, max_steps=2, max_grad_norm=clip), train_dataset=train,
                      optimizers=(opt, None), callbacks=[recorder])
    SLOCallback().add_to(trainer)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    clipping = [w for w in caught if "max_grad_norm" in str(w.message)]
    assert len(clipping) == (1 if clip > 0 else 0)
    assert any(k.startswith("slo/grad_norm/") for k in recorder.logs[0])  # the reporter saw the values
    from slo_torch.hf import ConsoleSummary

    callbacks = trainer.callback_handler.callbacks
    summaries = [c for c in callbacks if isinstance(c, ConsoleSummary)]  # one, just before the printer
    assert len(summaries) == 1 and summaries[0].owner is callbacks[0] and callbacks[-2] is summaries[0]


@pytest.mark.parametrize("fused", [False, True], ids=["AdamW", "fused AdamW"])
def test_callback_logs_only_steps_that_were_taken(tmp_path: Path, fused: bool) -> None:
    # GradScaler skips step 2 (overflow): the non-fused optimizer is never called, the fused one skips
    from transformers import TrainerControl, TrainerState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = SLOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused), model=model, speeds={"*": 1.0})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    callback, args = SLOCallback(), args_for(tmp_path)
    state, control = TrainerState(), TrainerControl()
    taken = []
    for step in range(4):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() * (float("inf") if step == 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step != 2:
            taken.append({k: float(v) for k, v in opt.last_grad_norms.items()})
        callback.on_step_end(args, state, control, optimizer=opt)
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs, optimizer=opt)
    assert opt.taken_steps == 3
    for layer in ("0", "2"):
        assert logs[f"slo/grad_norm/{layer}"] == pytest.approx(sum(t[layer] for t in taken) / 3, rel=1e-6)


class PoisonStep(TrainerCallback):
    """Makes one step's gradient non-finite, so SLOptimizer skips that step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            next(kwargs["model"].parameters()).grad.view(-1)[0] = float("nan")


def test_skipped_step_logs_no_norms_in_the_trainer(tmp_path: Path, train: Any) -> None:
    model = tiny_gpt2(ex)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS)
    trainer = Trainer(model, args_for(tmp_path, max_steps=3, max_grad_norm=0.0), train_dataset=train,
                      optimizers=(opt, None), callbacks=[PoisonStep(1), SLOCallback()])
    with pytest.warns(RuntimeWarning, match="Non-finite gradient"):
        trainer.train()
    entries = [h for h in trainer.state.log_history if "loss" in h]
    assert [e["slo/nonfinite_steps"] for e in entries] == [0, 1, 1]
    assert [any(k.startswith("slo/grad_norm/") for k in e) for e in entries] == [True, False, True]
    assert all(v == v for e in entries for v in e.values() if isinstance(v, float))  # no NaN logged


def test_console_line_shows_the_promoted_layer_and_summarises_the_rest(
    tmp_path: Path, train: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_gpt2(ex)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS)
    trainer = Trainer(model, args_for(tmp_path, max_steps=2, logging_steps=2, max_grad_norm=0.0),
                      train_dataset=train, optimizers=(opt, None))
    SLOCallback().add_to(trainer)
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 1
    line = printed[0]
    others = len(opt.layer_speeds) - 1
    assert "'slo/grad_norm/transformer.h.0.mlp.c_fc'" in line
    assert f"'slo/grad_norm/<{others} other layers> min/mean/max'" in line
    assert "slo/grad_norm/transformer.wte" not in line and len(line) < 400
    logged = trainer.state.log_history[0]  # the full values still reach log_history (and the reporters)
    per_layer = {k for k in logged if k.startswith("slo/grad_norm/")}
    assert per_layer == {f"slo/grad_norm/{name}" for name in opt.layer_speeds}
    rest = [logged[f"slo/grad_norm/{n}"] for n in opt.layer_speeds if n != "transformer.h.0.mlp.c_fc"]
    lo, mean, hi = (float(v) for v in line.split("min/mean/max': '")[1].split("'")[0].split("/"))
    assert lo == pytest.approx(min(rest), rel=1e-2) and hi == pytest.approx(max(rest), rel=1e-2)
    assert mean == pytest.approx(sum(rest) / len(rest), rel=1e-2)


def test_console_summary_keeps_the_shown_layers_and_summarises_the_rest() -> None:
    from slo_torch.hf import ConsoleSummary

    summary = ConsoleSummary(SLOCallback(), "x/", lambda names, kw: {"b"})
    logs = {"x/a": 1.0, "x/b": 2.0, "x/c": 6.0, "x/d": 2.0, "loss": 0.5}
    summary.on_log(None, None, None, logs=logs)
    assert logs == {"x/b": 2.0, "loss": 0.5, "x/<3 other layers> min/mean/max": "1/3/6"}


def test_after_the_reporters_it_refuses_and_says_how_to_add_it(tmp_path: Path, train: Any) -> None:
    model = tiny_gpt2(ex)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model=model, speeds=SPEEDS)
    trainer = Trainer(model, args_for(tmp_path, max_steps=1, report_to="tensorboard"), train_dataset=train,
                      optimizers=(opt, None), callbacks=[SLOCallback()])
    with pytest.raises(ValueError, match=r"after the report_to reporters \['tensorboard'\].*\.add_to\(trainer\)"):
        trainer.train()
