"""``examples/hf_trainer.py`` end to end in one process, with tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from conftest import load_example  # noqa: E402


TINY = ["--max-steps", "4", "--nfa-every", "2", "--logging-steps", "2", "--batch-size", "4", "--seq-len", "16",
        "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--probe-size", "4"]


ex = load_example("hf_trainer", "hf_trainer_example_main")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_corpus_and_dataset_are_offline_and_small_vocabulary() -> None:
    text = ex.corpus_text()
    assert len(text) > 50_000 and set(text) <= set(ex.ALPHABET)
    assert len(ex.ALPHABET) < 64
    ids = ex.encode(text[:1000])
    assert ex.decode(ids) == text[:1000]
    ds = ex.CharWindows(ids, 16, stride=8)
    assert len(ds) == (1000 - 16) // 8 + 1
    item = ds[1]
    assert torch.equal(item["input_ids"], ids[8:24]) and torch.equal(item["labels"], item["input_ids"])
    with pytest.raises(ValueError, match="seq_len"):
        ex.CharWindows(ids[:10], 16)


def test_slo_run_logs_nfa_and_grad_norms_and_saves_state(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    ex.main(TINY + ["--optimizer", "slo", "--output-dir", str(out)])
    captured = capsys.readouterr()
    printed = captured.out
    assert "world_size=1 process_index=0" in printed
    assert "train: step 4/4 (100%), loss " in captured.err  # progress lines: the output is not a terminal
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for key in ("nfa/uc/transformer.h.0.mlp.c_fc", "nfa/c/transformer.h.0.attn.c_attn",
                "slo/grad_norm/transformer.h.0.mlp.c_fc"):
        assert key in logged[-1]
    assert not any(k.startswith("nfa/") and "lm_head" in k for k in logged[-1])  # --nfa-layers transformer.h.*
    assert (out / "nfa_curves.png").stat().st_size > 10_000
    # the first measurement is at step 0, before training (log_history and a snapshot, no loss yet)
    assert history[0]["step"] == 0 and "loss" not in history[0] and "nfa/uc/transformer.h.0.mlp.c_fc" in history[0]
    assert sorted(p.name for p in (out / "nfa").iterdir()) == [
        "step_0000000.safetensors", "step_0000002.safetensors", "step_0000004.safetensors"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_baselines_run(tmp_path: Path, optimizer: str) -> None:
    trainer = ex.main(TINY + ["--optimizer", optimizer, "--output-dir", str(tmp_path), "--no-plot"])
    assert trainer.state.global_step == 4
    assert any("nfa/c/transformer.h.0.mlp.c_fc" in h for h in trainer.state.log_history)


def test_slo_speeds_name_hf_modules() -> None:
    model = ex.build_model(len(ex.ALPHABET), 16, n_embd=16, n_layer=1, n_head=2)
    _, extra = ex.optimizer_setup("slo", model, 0.1, ex.slo_speeds("transformer.h.0.mlp.c_fc", 4.0, 0.25))
    cls, kwargs = extra["optimizer_cls_and_kwargs"]
    kwargs = dict(kwargs)
    opt = cls(kwargs.pop("model"), **kwargs)  # what the Trainer does with a "model" kwarg
    assert opt.layer_speeds["transformer.h.0.mlp.c_fc"] == 4.0 and opt.layer_speeds["transformer.h.0.attn.c_attn"] == 0.25
    with pytest.raises(ValueError, match="optimizer"):
        ex.optimizer_setup("lion", model, 0.1, {})
