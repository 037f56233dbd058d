"""The ``report_to`` reporters receive every value of ``NFACallback`` and ``SLOCallback`` (added with
``add_to``): TensorBoard's event files hold ``train/nfa/<kind>/<layer>`` and ``train/slo/...`` for
every layer and logged step, equal to ``log_history``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from diagnostics.hf import NFACallback  # noqa: E402
from slo_torch import SLOptimizer  # noqa: E402
from slo_torch.hf import SLOCallback  # noqa: E402

from conftest import SEQ, char_ids, load_example, tiny_gpt2  # noqa: E402

ex = load_example("hf_trainer", "hf_trainer_example_reporters")

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(output_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of every scalar in the TensorBoard event files under ``output_dir``."""
    out: dict[str, dict[int, float]] = {}
    files = sorted(output_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {output_dir}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_tensorboard_receives_every_nfa_and_slo_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids, probe_ids = char_ids(ex)
    train, probe = ex.CharWindows(ids[:2000], SEQ), ex.CharWindows(probe_ids, SEQ).windows[:4]
    model = tiny_gpt2(ex)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model=model,
                      speeds={"transformer.h.0.mlp.c_fc": 3.0, "*": 0.5})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=4, per_device_train_batch_size=8,
                             logging_steps=2, save_strategy="no", report_to="tensorboard", disable_tqdm=True,
                             max_grad_norm=0.0, seed=0)
    trainer = Trainer(model, args, train_dataset=train, optimizers=(opt, None))
    nfa, slo = NFACallback(probe, every_n_steps=2, estimator="exact"), SLOCallback()
    nfa.add_to(trainer)
    slo.add_to(trainer)
    trainer.train()

    logged: dict[str, dict[int, float]] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(("nfa/", "slo/")):
                logged.setdefault(f"train/{key}", {})[entry["step"]] = value
    layers, slo_layers = nfa.monitor.layer_names, opt.layer_names
    expected = ({f"train/nfa/{kind}/{n}" for kind in ("uc", "c") for n in layers}
                | {f"train/slo/grad_norm/{n}" for n in slo_layers} | {"train/slo/nonfinite_steps"})
    assert set(logged) == expected
    assert len(expected) == 2 * len(layers) + len(slo_layers) + 1
    tb = scalars(tmp_path)
    assert expected <= set(tb)
    for tag, by_step in logged.items():
        assert set(tb[tag]) == set(by_step) == {2, 4}, tag
        for step, value in by_step.items():
            assert tb[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (tag, step)  # float32 in the file
    assert not any("min/mean/max" in tag for tag in tb)  # the console summaries run after the reporters
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2 and all("min/mean/max" in line and "lm_head" not in line for line in printed)
