"""``diagnostics.hf.NFACallback`` inside a single-process ``transformers.Trainer``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from diagnostics import NFAMonitor, load_snapshot  # noqa: E402
from diagnostics.hf import NFACallback, NFAConsoleSummary, nfa_rows_from_log_history  # noqa: E402

from conftest import SEQ, char_ids, load_example, tiny_gpt2  # noqa: E402

ex = load_example("hf_trainer", "hf_trainer_example")  # its data and model builders are reused here


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[Any, torch.Tensor]:
    train_ids, probe_ids = char_ids(ex)
    return ex.CharWindows(train_ids[:2000], SEQ), ex.CharWindows(probe_ids, SEQ).windows[:4]


def args_for(tmp: Path, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(tmp), use_cpu=True, max_steps=4, per_device_train_batch_size=8, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                report_to="none", disable_tqdm=True, train_sampling_strategy="sequential")
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): remembers the ``logs`` its ``on_log`` receives."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.logs.append(dict(logs))


def nfa_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [h for h in history if any(k.startswith("nfa/") for k in h)]


def test_values_reach_log_history_and_reporters_registered_before_it(tmp_path: Path, data: Any) -> None:
    train, probe = data
    rec = Recorder()
    cb = NFACallback(probe, every_n_steps=2, estimator="exact")
    # The recorder is registered before the callback, as the Trainer registers report_to reporters.
    trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, max_steps=5), train_dataset=train, callbacks=[rec])
    cb.add_to(trainer)
    cb.add_to(trainer)  # a second call changes nothing
    trainer.train()
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is cb and callbacks.count(cb) == 1
    summaries = [c for c in callbacks if isinstance(c, NFAConsoleSummary)]  # one, just before the printer
    assert len(summaries) == 1 and summaries[0].owner is cb and callbacks[-2] is summaries[0]
    entries = nfa_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [2, 4, 5]  # cadence, plus the last step
    layers = cb.monitor.layer_names
    assert "transformer.h.0.mlp.c_fc" in layers
    for e in entries:
        assert "loss" in e  # logged together with the training loss of that step
        for layer in layers:
            assert -1.0 <= e[f"nfa/uc/{layer}"] <= 1.0 + 1e-9
            assert -1.0 <= e[f"nfa/c/{layer}"] <= 1.0 + 1e-9
    seen = [{k: v for k, v in logs.items() if k.startswith("nfa/")} for logs in rec.logs]
    expected = [{k: v for k, v in e.items() if k.startswith("nfa/")} for e in entries]
    assert [s for s in seen if s] == expected


@pytest.mark.parametrize("console_layers", [None, "transformer.h.0.mlp.*"])
def test_console_line_summarises_the_layers(
    tmp_path: Path, data: Any, capsys: pytest.CaptureFixture[str], console_layers: Any
) -> None:
    train, probe = data
    cb = NFACallback(probe, every_n_steps=2, estimator="exact", console_layers=console_layers)
    trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, max_steps=2, logging_steps=2), train_dataset=train)
    cb.add_to(trainer)
    trainer.train()
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 1
    line, layers = printed[0], cb.monitor.layer_names
    logged = nfa_entries(trainer.state.log_history)[0]  # every layer still reaches log_history
    shown = [n for n in layers if console_layers and n.startswith("transformer.h.0.mlp.")]
    assert cb.constant_layers == {"lm_head"}  # the output layer: K = I, its UC- and C-NFA are 1 by construction
    for kind in ("uc", "c"):
        assert {k for k in logged if k.startswith(f"nfa/{kind}/")} == {f"nfa/{kind}/{n}" for n in layers}
        assert logged[f"nfa/{kind}/lm_head"] == pytest.approx(1.0, abs=1e-12) and "lm_head" not in line
        rest = [logged[f"nfa/{kind}/{n}"] for n in layers if n not in shown and n != "lm_head"]
        assert max(rest) < 1.0 - 1e-5  # the summary is over values that carry information (0.9995 on torch 2.6)
        entry = f"'nfa/{kind}/<{len(rest)} {'other layers' if shown else 'layers'}> min/mean/max': '"
        assert entry in line
        lo, mean, hi = (float(v) for v in line.split(entry)[1].split("'")[0].split("/"))
        assert lo == pytest.approx(min(rest), abs=1e-3) and hi == pytest.approx(max(rest), abs=1e-3)
        assert mean == pytest.approx(sum(rest) / len(rest), abs=1e-3)
        assert all(f"'nfa/{kind}/{n}'" in line for n in shown)
    assert len(line) < 400


def test_logged_values_equal_a_direct_measurement(tmp_path: Path, data: Any) -> None:
    train, probe = data
    model = tiny_gpt2(ex)
    w0 = copy.deepcopy(model)
    cb = NFACallback(probe, every_n_steps=3, layers="transformer.h.0.mlp.*", estimator="exact")
    trainer = Trainer(model, args_for(tmp_path, max_steps=3), train_dataset=train, callbacks=[cb])
    trainer.train()
    logged = nfa_entries(trainer.state.log_history)[-1]
    with NFAMonitor(model, "transformer.h.0.mlp.*", W0=w0) as mon:
        direct = mon.measure(probe, estimator="exact")
    assert set(direct) == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    for name, rec in direct.items():
        assert logged[f"nfa/uc/{name}"] == pytest.approx(rec.uc_nfa, abs=1e-10)
        assert logged[f"nfa/c/{name}"] == pytest.approx(rec.c_nfa, abs=1e-10)
    assert len(set(logged[f"nfa/c/{n}"] for n in direct)) == 2
    rows = nfa_rows_from_log_history(trainer.state.log_history)
    assert {(r["step"], r["layer"]) for r in rows} == {(3, n) for n in direct}
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed at train end


def test_sketch_is_reproducible_and_close_to_exact(tmp_path: Path, data: Any) -> None:
    train, probe = data

    def run(estimator: str, m: int, seed: int) -> dict[str, float]:
        cb = NFACallback(probe, every_n_steps=2, layers="transformer.h.0.mlp.c_fc", estimator=estimator, m=m,
                         seed=seed)
        trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, max_steps=2), train_dataset=train, callbacks=[cb])
        trainer.train()
        return nfa_entries(trainer.state.log_history)[-1]

    a, b, exact = run("sketch", 64, 1), run("sketch", 64, 1), run("exact", 8, 0)
    key = "nfa/uc/transformer.h.0.mlp.c_fc"
    assert a[key] == b[key]
    assert a[key] == pytest.approx(exact[key], abs=0.05)


def test_measure_at_start_logs_the_initial_network_at_step_0(tmp_path: Path, data: Any) -> None:
    train, probe = data
    model = tiny_gpt2(ex)
    w0 = copy.deepcopy(model)
    cb = NFACallback(probe, every_n_steps=2, layers="transformer.h.0.mlp.*", estimator="exact", measure_at_start=True)
    trainer = Trainer(model, args_for(tmp_path, max_steps=2), train_dataset=train, callbacks=[cb])
    trainer.train()
    entries = nfa_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [0, 2] and "loss" not in entries[0]
    with NFAMonitor(w0, "transformer.h.0.mlp.*") as mon:
        direct = mon.measure(probe, estimator="exact")
    for name, rec in direct.items():
        assert entries[0][f"nfa/uc/{name}"] == pytest.approx(rec.uc_nfa, abs=1e-10)
    assert all(math.isnan(entries[0][f"nfa/c/{n}"]) for n in direct)  # W = W_0: the C-NFA is not defined yet
    rows = nfa_rows_from_log_history(trainer.state.log_history)
    assert sorted({r["step"] for r in rows}) == [0, 2]


def test_snapshots_and_w0_restored_on_resume(tmp_path: Path, data: Any) -> None:
    train, probe = data
    out = tmp_path / "run"
    full_cb = NFACallback(probe, every_n_steps=2, layers="transformer.h.0.mlp.c_fc", estimator="exact",
                          save_snapshots=True)
    Trainer(tiny_gpt2(ex), args_for(out, max_steps=4, save_strategy="steps", save_steps=2), train_dataset=train,
            callbacks=[full_cb]).train()
    files = sorted(p.name for p in (out / "nfa").iterdir())
    assert files == ["step_0000002.safetensors", "step_0000004.safetensors"]
    snap = load_snapshot(out / "nfa" / "step_0000004.safetensors")
    assert snap.step == 4 and set(snap.matrices["transformer.h.0.mlp.c_fc"]) >= {"K", "W", "W0"}

    resumed_cb = NFACallback(probe, every_n_steps=2, layers="transformer.h.0.mlp.c_fc", estimator="exact",
                             save_snapshots=True)
    trainer = Trainer(tiny_gpt2(ex), args_for(out, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=train, callbacks=[resumed_cb])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    w0_full = full_cb.monitor.W0["transformer.h.0.mlp.c_fc"]
    torch.testing.assert_close(resumed_cb.monitor.W0["transformer.h.0.mlp.c_fc"], w0_full, rtol=0, atol=0)
    key = "nfa/c/transformer.h.0.mlp.c_fc"
    full_value = full_cb.monitor.history[-1]["transformer.h.0.mlp.c_fc"].c_nfa
    assert nfa_entries(trainer.state.log_history)[-1][key] == pytest.approx(full_value, abs=1e-10)


def test_trainer_state_json_holds_the_values(tmp_path: Path, data: Any) -> None:
    train, probe = data
    cb = NFACallback(probe, every_n_steps=2, layers="transformer.h.0.attn.c_attn", estimator="sketch", m=4)
    trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, max_steps=2), train_dataset=train, callbacks=[cb])
    trainer.train()
    trainer.save_state()
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert "nfa/uc/transformer.h.0.attn.c_attn" in nfa_entries(state["log_history"])[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.5}, "every_n_steps"),
        ({"estimator": "bogus"}, "estimator"),
        ({"m": 0}, "m "),
        ({"correlation": "spearman"}, "correlation"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NFACallback(torch.zeros(2, SEQ, dtype=torch.long), **kwargs)


def test_bad_probe() -> None:
    with pytest.raises(TypeError, match="probe"):
        NFACallback("not a tensor")


def test_after_the_reporters_it_refuses_and_says_how_to_add_it(tmp_path: Path, data: Any) -> None:
    cb = NFACallback(torch.zeros(2, SEQ, dtype=torch.long), every_n_steps=1)
    state = transformers.TrainerState()
    with pytest.raises(RuntimeError, match="on_train_begin"):
        cb.measure(args_for(tmp_path), state, tiny_gpt2(ex))
    trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, report_to="tensorboard"), train_dataset=data[0],
                      callbacks=[cb])
    with pytest.raises(ValueError, match=r"after the report_to reporters \['tensorboard'\].*\.add_to\(trainer\)"):
        trainer.train()
    with pytest.raises(TypeError, match="needs a transformers.Trainer"):
        cb.add_to(object())
    cb.on_train_begin(args_for(tmp_path), state, transformers.TrainerControl(), model=tiny_gpt2(ex))  # no reporter
    assert cb.monitor is not None and "transformer.h.0.mlp.c_fc" in cb.monitor.layer_names


def test_blocks_are_logged_and_saved(tmp_path: Path, data: Any) -> None:
    train, probe = data
    layer = "transformer.h.0.attn.c_attn"
    cb = NFACallback(probe, every_n_steps=2, layers=layer, estimator="exact", save_snapshots=True,
                     blocks={"transformer.h.*.attn.c_attn": ["q", "k", "v"]})
    trainer = Trainer(tiny_gpt2(ex), args_for(tmp_path, max_steps=2), train_dataset=train, callbacks=[cb])
    trainer.train()
    logged = nfa_entries(trainer.state.log_history)[-1]
    records = cb.monitor.history[-1]
    assert list(records) == [layer, f"{layer}[q]", f"{layer}[k]", f"{layer}[v]"]
    for name, rec in records.items():
        assert logged[f"nfa/c/{name}"] == rec.c_nfa
    snap = load_snapshot(tmp_path / "nfa" / "step_0000002.safetensors")
    assert snap.records[f"{layer}[v]"].c_nfa == records[f"{layer}[v]"].c_nfa
    assert torch.equal(snap.matrices[f"{layer}[v]"]["W0"], cb.monitor.W0[layer][32:])


@pytest.mark.parametrize("module, other", [("diagnostics.hf", "slo_torch"), ("slo_torch.hf", "diagnostics")])
def test_each_hf_module_loads_without_the_other_package(module: str, other: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == {other!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
