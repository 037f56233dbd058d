"""``examples/lora_finetune.py`` on a tiny setting: the logged NFA of the LoRA layers against an independent
reference, and the SLO variant."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from conftest import load_example

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from test_diag_lora import K_by_jacrev, pearson, weight_by_forward  # noqa: E402

TINY = ["--vocab", "8", "--seq-len", "8", "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--train-size", "128",
        "--batch-size", "8", "--pretrain-steps", "10", "--steps", "20", "--nfa-every", "10", "--probe-size", "4",
        "--rank", "2", "--alpha", "4"]
LAYERS = ["base_model.model.transformer.h.0.attn.c_attn", "base_model.model.transformer.h.0.mlp.c_fc"]


def test_lora_finetune_logs_the_nfa_of_the_effective_weights(tmp_path: Path, one_thread: None) -> None:
    ex = load_example("lora_finetune")
    out = ex.main([*TINY, "--out", str(tmp_path)])
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(int(r["step"]), r["layer"]) for r in rows] == [(s, n) for s in (10, 20) for n in LAYERS]
    assert (tmp_path / "nfa_curves.png").stat().st_size > 0 and "## NFA" in (tmp_path / "results.md").read_text()
    model = out["model"].double()
    seqs = list(out["probe"])
    for r in rows[-2:]:
        name = r["layer"]
        W = weight_by_forward(model, name)
        W0 = dict(model.named_modules())[name].base_layer.weight.detach().t()  # frozen: the pretrained weight
        K = K_by_jacrev(model, seqs, name)
        dW = W - W0
        assert float(r["uc_nfa"]) == pytest.approx(pearson(W.t() @ W, W.t() @ K @ W), abs=1e-5)
        assert float(r["c_nfa"]) == pytest.approx(pearson(dW.t() @ dW, dW.t() @ K @ dW), abs=1e-5)


def test_lora_finetune_with_slo(tmp_path: Path, one_thread: None) -> None:
    ex = load_example("lora_finetune")
    out = ex.main([*TINY, "--slo", "--speed", "0.5", "--out", str(tmp_path)])
    assert all(math.isfinite(r["c_nfa"]) for r in out["rows"])
    trainer = out["trainer"]
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    assert opt.layer_speeds == {name: 0.5 for name in LAYERS}  # A and B of each LoRA layer: one layer
    logged = {k for h in trainer.state.log_history for k in h}
    assert {f"slo/grad_norm/{name}" for name in LAYERS} <= logged
