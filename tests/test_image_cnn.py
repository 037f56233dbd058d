"""examples/image_cnn.py: the VGG-11 (no BatchNorm) model, a one-epoch run on CIFAR-10 files written in the
published format, and exit status 2 for missing or tampered data."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import load_example
from test_image_formats import write_cifar

CONVS = [f"features.conv{i}" for i in range(1, 9)]
TINY = ["--epochs", "1", "--max-train", "64", "--width-mult", "0.0625", "--probe", "8"]


def _image_cnn():
    return load_example("image_cnn")


def test_vgg11_layout_parameter_count_and_init() -> None:
    cnn = _image_cnn()
    torch.manual_seed(0)
    model = cnn.vgg11(10)
    # torchvision's vgg11 has 132,863,336 parameters with a 25088 -> 4096 first linear layer and 1000 classes;
    # with the 1x1 average pool (512 -> 4096) and 10 classes the same layers hold 28,144,010
    assert sum(p.numel() for p in model.parameters()) == 132_863_336 - (25088 - 512) * 4096 - 4096 * 990 - 990
    assert cnn.conv_layers(model) == CONVS
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) and m.stride == (1, 1) for m in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    for m in convs[4:]:  # kaiming normal, fan_out: std sqrt(2 / (out * 9))
        assert abs(float(m.weight.detach().std()) / math.sqrt(2 / (m.out_channels * 9)) - 1) < 0.02
        assert float(m.bias.detach().abs().max()) == 0.0
    hidden = model.classifier[3]
    assert abs(float(hidden.weight.detach().std()) / 0.01 - 1) < 0.01 and float(hidden.bias.detach().abs().max()) == 0.0
    small = cnn.vgg11(10, width_mult=0.25)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert small.classifier[0].in_features == 128 and small.classifier[0].out_features == 1024
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image_cnn")
    write_cifar(root / "data", per_batch=16, n_test=16)
    threads = torch.get_num_threads()
    try:
        _image_cnn().main(["--dataset", "cifar10", "--data-dir", str(root / "data"), "--optimizer", "both",
                           "--promote-layer", "features.conv1", "features.conv4", *TINY, "--out", str(root / "out")])
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def test_one_epoch_cifar10_run_writes_outputs(cifar_run: Path) -> None:
    with open(cifar_run / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {"run", "seed", "epoch", "layer", "uc_nfa", "c_nfa", "rel_change", "train_loss", "test_acc"} <= set(rows[0])
    assert list(dict.fromkeys(r["run"] for r in rows)) == ["sgd", "slo features.conv1", "slo features.conv4"]
    assert {r["layer"] for r in rows} == set(CONVS)  # all eight conv layers, nothing else
    assert {r["epoch"] for r in rows} == {"0", "1"} and len(rows) == 3 * 2 * 8
    for r in rows:
        assert -1 - 1e-6 <= float(r["uc_nfa"]) <= 1 + 1e-6 and 0 <= float(r["test_acc"]) <= 1
        assert float(r["train_loss"]) > 0 and math.isfinite(float(r["test_loss"]))
    after = [r for r in rows if r["epoch"] == "1"]
    assert all(-1 - 1e-6 <= float(r["c_nfa"]) <= 1 + 1e-6 and float(r["rel_change"]) > 0 for r in after)
    # SLO, relative speeds, one step (64 images, batch 256) at lr 1: the promoted layer (weight and bias, bias 0 at
    # init) moves 1e-2 of its norm, every other layer 1e-3 of its own; the weight alone moves at most that
    for promoted in ("features.conv1", "features.conv4"):
        moved = {r["layer"]: float(r["rel_change"]) for r in after if r["run"] == f"slo {promoted}"}
        assert 2e-3 < moved[promoted] <= 1e-2 * (1 + 1e-5)
        assert all(v <= 1e-3 * (1 + 1e-5) for n, v in moved.items() if n != promoted)
    text = (cifar_run / "results.md").read_text()
    assert "## Promoted layer against SGD (final epoch)" in text
    assert "| features.conv4 | slo features.conv4 |" in text
    assert "speed_unit='relative'" in text
    model = _image_cnn().vgg11(10, width_mult=0.0625)  # the run's --width-mult
    assert [model.get_submodule(n).out_channels for n in CONVS] == [4, 8, 16, 16, 32, 32, 32, 32]
    for png in ("nfa_curves.png", "loss_accuracy.png"):
        assert (cifar_run / png).stat().st_size > 1000


@pytest.mark.slow  # two spawned worker processes each import torch before training
def test_parallel_runs_write_the_same_metrics(tmp_path: Path) -> None:
    """--jobs 2 trains the runs in two processes; every run is seeded on its own, so the rows are the same."""
    args = ["--dataset", "digits", "--optimizer", "both", "--epochs", "1", "--max-train", "64", "--max-test", "32",
            "--width-mult", "0.0625", "--probe", "8", "--batch", "32"]
    threads = torch.get_num_threads()
    try:
        _image_cnn().main([*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    script = Path(__file__).resolve().parents[1] / "examples" / "image_cnn.py"
    proc = subprocess.run([sys.executable, str(script), *args, "--jobs", "2", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "one" / "metrics.csv").read_bytes() == (tmp_path / "two" / "metrics.csv").read_bytes()


def _main_exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        _image_cnn().main(args)
    return exc.value.code, capsys.readouterr().err


def test_missing_or_tampered_data_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, err = _main_exit(["--dataset", "cifar10", "--data-dir", str(tmp_path), *TINY, "--out", str(out)], capsys)
    assert code == 2 and str(tmp_path / "cifar-10-batches-py") in err and "cs.toronto.edu/~kriz/cifar" in err
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"cposix\nsystem\n(S'echo hi'\ntR.")
    code, err = _main_exit(["--dataset", "cifar10", "--data-dir", str(tmp_path), *TINY, "--out", str(out)], capsys)
    assert code == 2 and "refused to load the global posix.system" in err
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--dataset", "digits", "--width-mult", "0"], "--width-mult: must be a finite number > 0"),
    (["--dataset", "digits", "--max-train", "0"], "--max-train: must be a positive integer"),
    (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir DIR"),
    (["--dataset", "digits", "--device", "cuda:7"], "no such CUDA device here"),
    (["--dataset", "digits", "--promote-layer", "features.conv9"], "['features.conv9'] not a layer of VGG-11"),
    (["--dataset", "digits", "--promote-layer", "features.conv2", "features.conv2"], "a layer is named twice"),
    (["--dataset", "digits", "--speed-unit", "l2"], "argument --speed-unit: invalid choice: 'l2'"),
])
def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                              expected: str) -> None:
    code, err = _main_exit([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("x")
    code, err = _main_exit(["--dataset", "digits", "--out", str(tmp_path / "taken")], capsys)
    assert code == 2 and "exists and is not a folder" in err
