"""examples/image_mlp.py: a one-epoch run per dataset writes its outputs; bad data folders exit with status 2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import load_example
from diagnostics.datasets import load_dataset
from test_image_data import write_celeba, write_svhn

TINY = ["--epochs", "1", "--width", "16", "--depth", "2", "--probe", "8", "--batch", "4"]


def _image_mlp():
    return load_example("image_mlp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-epoch runs of svhn, celeba (both optimizers) and digits (sgd), in this process."""
    root = tmp_path_factory.mktemp("image_mlp")
    write_svhn(root / "svhn_data")
    write_celeba(root / "celeba_data")
    cmds = {
        "svhn": ["--dataset", "svhn", "--data-dir", str(root / "svhn_data"), "--max-train", "16",
                 "--optimizer", "both"],
        "celeba": ["--dataset", "celeba", "--data-dir", str(root / "celeba_data"), "--optimizer", "both"],
        "digits": ["--dataset", "digits", "--max-train", "64", "--max-test", "32", "--optimizer", "sgd"],
    }
    threads = torch.get_num_threads()
    try:
        for name, cmd in cmds.items():
            _image_mlp().main([*cmd, *TINY, "--out", str(root / name)])
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in cmds}


@pytest.mark.parametrize("dataset,runs_expected,classes",
                         [("svhn", {"sgd", "slo"}, 10), ("celeba", {"sgd", "slo"}, 2), ("digits", {"sgd"}, 10)])
def test_one_epoch_run_writes_outputs(
    runs: dict[str, Path], dataset: str, runs_expected: set[str], classes: int
) -> None:
    out = runs[dataset]
    with open(out / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run"] for r in rows} == runs_expected
    assert {r["layer"] for r in rows} == {"0", "2", "4"}
    assert {r["step"] for r in rows} == {"0", "1"}  # epoch 0 (init) and after the one epoch
    for r in rows:
        assert -1.0 - 1e-6 <= float(r["uc_nfa"]) <= 1.0 + 1e-6
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["train_loss"]) >= 0.0
    after = [r for r in rows if r["step"] == "1"]
    assert all(-1.0 - 1e-6 <= float(r["c_nfa"]) <= 1.0 + 1e-6 for r in after)
    assert all(float(r["rel_change"]) > 0 for r in after)
    assert {(r["run"], r["layer"]) for r in after} == {(run, layer) for run in runs_expected for layer in ("0", "2", "4")}
    data_dir = None if dataset == "digits" else out.parent / f"{dataset}_data"
    assert load_dataset(dataset, data_dir).num_classes == classes
    assert (out / "results.md").stat().st_size > 1000
    for png in ("nfa_curves.png", "loss_accuracy.png", "nfm_diagonal.png"):
        assert (out / png).stat().st_size > 1000
    with open(out / "nfm_diagonal.csv", newline="", encoding="utf-8") as fh:
        maps = {r["map"] for r in csv.DictReader(fh)}
    assert maps == {"init", *runs_expected}


def _main_exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        _image_mlp().main(args)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("dataset,expected", [("svhn", "train_32x32.mat"), ("celeba", "list_attr_celeba.txt")])
def test_missing_directory_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dataset: str, expected: str
) -> None:
    out = tmp_path / "out"
    code, err = _main_exit(["--dataset", dataset, "--data-dir", str(tmp_path / "absent"), "--out", str(out)], capsys)
    assert code == 2
    assert expected in err and str(tmp_path / "absent") in err
    assert ("ufldl.stanford.edu/housenumbers" if dataset == "svhn" else "mmlab.ie.cuhk.edu.hk") in err
    assert not out.exists()


def test_no_data_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main_exit(["--dataset", "svhn", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "--data-dir" in err and "test_32x32.mat" in err


@pytest.mark.parametrize("dataset,content", [("svhn", b"\x00garbage" * 20), ("svhn", b""), ("celeba", None)])
def test_malformed_file_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dataset: str, content: bytes | None
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    if dataset == "svhn":  # garbage, or an empty (truncated) file: scipy's MatReadError
        write_svhn(data)
        (data / "test_32x32.mat").write_bytes(content)
        expected = "test_32x32.mat is not a readable MATLAB v5 file"
    else:
        write_celeba(data)
        (data / "list_eval_partition.txt").write_text("000001.jpg train\n")
        expected = "list_eval_partition.txt is not in CelebA's list_eval_partition.txt layout"
    code, err = _main_exit(["--dataset", dataset, "--data-dir", str(data), "--out", str(out), *TINY], capsys)
    assert code == 2 and expected in err
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--dataset", "digits", "--max-train", "0"], "--max-train must be >= 1"),
    (["--dataset", "celeba", "--data-dir", "x", "--max-test", "1"], "--max-test must be >= 2 for celeba"),
    (["--dataset", "svhn", "--data-dir", "x", "--image-size", "96"], "SVHN images are 32x32"),
])
def test_bad_arguments_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    code, err = _main_exit([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset,writer,classes,side", [  # the loaders are tested on their own: one run by default
    ("mnist", "mnist_gz", 10, 28),
    pytest.param("cifar100", "cifar_python", 100, 32, marks=pytest.mark.slow),
    pytest.param("cifar10", "cifar_binary", 10, 32, marks=pytest.mark.slow),
    pytest.param("stl10", "stl10", 10, 32, marks=pytest.mark.slow),
    pytest.param("gtsrb", "gtsrb", 3, 32, marks=pytest.mark.slow),
])
def test_authors_datasets_one_epoch(tmp_path: Path, dataset: str, writer: str, classes: int, side: int) -> None:
    from test_image_formats import write_cifar, write_gtsrb, write_mnist, write_stl10

    data = tmp_path / "data"
    {"cifar_binary": lambda: write_cifar(data, 10, "binary", per_batch=16),
     "cifar_python": lambda: write_cifar(data, 100, "python", "py2", per_batch=70),
     "mnist_gz": lambda: write_mnist(data, n_train=70, gz=True), "stl10": lambda: write_stl10(data, n_train=12),
     "gtsrb": lambda: write_gtsrb(data, per_class=4)}[writer]()
    out = tmp_path / "out"
    args = ["--dataset", dataset, "--data-dir", str(data), "--preset", "authors", "--max-train", "64",
            "--optimizer", "sgd", *TINY, "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        _image_mlp().main(args)
    finally:
        torch.set_num_threads(threads)
    with open(out / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["step"] for r in rows} == {"0", "1"} and {r["layer"] for r in rows} == {"0", "2", "4"}
    assert all(-1 - 1e-6 <= float(r["uc_nfa"]) <= 1 + 1e-6 and 0 <= float(r["test_acc"]) <= 1 for r in rows)
    with open(out / "nfm_diagonal.csv", newline="", encoding="utf-8") as fh:
        cells = [r for r in csv.DictReader(fh) if r["map"] == "init"]
    assert len(cells) == side * side  # one value per pixel of the side x side input
    assert load_dataset(dataset, data).num_classes == classes
    assert (out / "results.md").stat().st_size > 1000


@pytest.mark.parametrize("dataset,lr,epochs", [("cifar10", 2.0, 150), ("cifar100", 20.0, 150), ("svhn", 2.0, 150),
                                              ("stl10", 0.1, 150), ("gtsrb", 0.43, 150), ("mnist", 10.0, 50)])
def test_authors_preset_lr_and_epochs(dataset: str, lr: float, epochs: int) -> None:
    mlp = _image_mlp()
    classes = {"cifar100": 100, "gtsrb": 43}.get(dataset, 10)
    args = mlp.parse_args(["--dataset", dataset, "--data-dir", "x", "--preset", "authors", "--out", "o"])
    assert args.epochs == epochs
    warm, after = mlp.schedule(args, "sgd", classes)
    assert warm == 1e-4 and after == pytest.approx(lr)  # the authors' lr scaled by C/10
    explicit = mlp.parse_args(["--dataset", dataset, "--data-dir", "x", "--preset", "authors", "--epochs", "3",
                               "--lr", "0.5", "--out", "o"])
    assert explicit.epochs == 3 and mlp.schedule(explicit, "sgd", classes) == (1e-4, 0.5)
    default = mlp.parse_args(["--dataset", dataset, "--data-dir", "x", "--out", "o"])
    assert default.epochs == 150 and mlp.schedule(default, "sgd", classes)[1] == pytest.approx(2.0 * classes / 10)


def test_authors_preset_needs_a_listed_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _main_exit(["--dataset", "digits", "--preset", "authors", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--preset authors has no settings for digits" in err


@pytest.mark.parametrize("dataset,expected", [("cifar100", "cifar-100-python/train"),
                                              ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                              ("stl10", "stl10_binary/train_X.bin"),
                                              ("gtsrb", "gtsrb/GT-final_test.csv")])
def test_new_datasets_missing_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], dataset: str,
                                           expected: str) -> None:
    out = tmp_path / "out"
    code, err = _main_exit(["--dataset", dataset, "--data-dir", str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and str(tmp_path / expected) in err and "http" in err
    assert not out.exists()
