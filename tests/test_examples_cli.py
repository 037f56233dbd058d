"""The example scripts as a new user meets them: argument errors, up-front checks, defaults in ``--help``, and
install hints for optional packages. Every failure here happens before any training and leaves nothing behind."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_example

ROOT = Path(__file__).resolve().parents[1]
HINT_EXAMPLES = 'pip install "slo-torch[examples]"'
HINT_HF = 'pip install "slo-torch[hf]"'


def example(name: str) -> ModuleType:
    return load_example(name)


def block(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``import <package>`` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def exit_2(capsys: pytest.CaptureFixture[str], fn, *args) -> str:
    """Call ``fn(*args)``, expect argparse's exit status 2 with a usage line; return stderr."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("usage:"), err
    return err


def files_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*"))


@pytest.mark.parametrize("script,args,reason", [
    ("chain_monomial", ["--steps", "-5"], "argument --steps: must be a positive integer (>= 1), got '-5'"),
    ("chain_monomial", ["--threads", "0"], "argument --threads: must be a positive integer (>= 1), got '0'"),
    ("chain_monomial", ["--slo-C", "-1"], "argument --slo-C: must be a finite number > 0, got '-1'"),
    ("chain_monomial", ["--slo-C", "nan"], "argument --slo-C: must be a finite number > 0, got 'nan'"),
    ("chain_monomial", ["--seeds", "0", "-1"], "argument --seeds: must be an integer >= 0, got '-1'"),
    ("chain_monomial", ["--promote-layer", "1"],
     "argument --promote-layer: '1' is not a linear layer of the default preset's MLP; choose one of ['0', '2', '4']"),
    ("chain_monomial", ["--base-optimizer", "adam"], "argument --base-optimizer: invalid choice: 'adam'"),
    ("early_time", ["--threads", "x"], "argument --threads: must be a positive integer (>= 1), got 'x'"),
    ("random_kernel", ["--d", "3"], "argument --d: must be at least r + 1 = 4"),
    ("hf_trainer", ["--max-steps", "0"], "argument --max-steps: must be a positive integer (>= 1), got '0'"),
    ("hf_trainer", ["--n-head", "3"], "argument --n-head: must divide --n-embd=64, got 3"),
    ("hf_trainer", ["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    ("hf_trainer", ["--speed", "-1"], "argument --speed: must be a finite number >= 0, got '-1'"),
    ("image_mlp", ["--dataset", "digits", "--slo-C", "0"], "argument --slo-C: must be a finite number > 0, got '0'"),
])
def test_bad_values_are_argparse_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], script: str, args: list[str], reason: str
) -> None:
    out_flag = "--output-dir" if script == "hf_trainer" else "--out"
    err = exit_2(capsys, example(script).parse_args, [*args, out_flag, str(tmp_path / "out")])
    assert reason in err
    assert len(err.strip().splitlines()[-1]) < 200 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,extra", [
    ("chain_monomial", ["--preset", "smoke"]),
    ("early_time", ["--preset", "smoke"]),
    ("random_kernel", ["--preset", "smoke"]),
    ("image_mlp", ["--dataset", "digits"]),
])
def test_out_that_is_a_file_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], script: str, extra: list[str]
) -> None:
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    err = exit_2(capsys, example(script).main, [*extra, "--out", str(existing)])
    assert f"--out {existing} exists and is not a folder" in err
    err = exit_2(capsys, example(script).main, [*extra, "--out", str(existing / "sub")])
    assert f"{existing} is a file, not a folder" in err
    assert files_under(tmp_path) == [existing] and existing.read_text() == "keep me"


def test_hf_output_dir_that_is_a_file_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "run"
    existing.write_text("")
    err = exit_2(capsys, example("hf_trainer").main, ["--output-dir", str(existing)])
    assert f"--output-dir {existing} exists and is not a folder" in err
    err = exit_2(capsys, example("hf_trainer").main, ["--compare", str(tmp_path / "nothing"), "--output-dir",
                                                      str(tmp_path / "cmp")])
    assert "holds no trainer_state.json" in err
    assert files_under(tmp_path) == [existing]


@pytest.mark.parametrize("script,extra,package", [
    ("chain_monomial", ["--preset", "smoke"], "matplotlib"),
    ("image_mlp", ["--dataset", "digits"], "matplotlib"),
    ("image_mlp", ["--dataset", "digits"], "sklearn"),
    ("image_mlp", ["--dataset", "svhn", "--data-dir", "x"], "scipy"),
    ("image_mlp", ["--dataset", "celeba", "--data-dir", "x"], "PIL"),
])
def test_missing_optional_package_fails_before_training_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, script: str,
    extra: list[str], package: str,
) -> None:
    module = example(script)
    block(monkeypatch, package)
    err = exit_2(capsys, module.main, [*extra, "--out", str(tmp_path / "out")])
    assert f"the optional package {package!r} is not installed; install it with: {HINT_EXAMPLES}" in err
    assert files_under(tmp_path) == []


def test_hf_example_checks_matplotlib_unless_no_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = example("hf_trainer")
    block(monkeypatch, "matplotlib")
    err = exit_2(capsys, module.parse_args, ["--output-dir", str(tmp_path / "run")])
    assert HINT_EXAMPLES in err
    assert module.parse_args(["--output-dir", str(tmp_path / "run"), "--no-plot"]).no_plot
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("module", ["slo_torch.hf", "diagnostics.hf"])
def test_hf_modules_without_transformers_name_the_extra(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    block(monkeypatch, "transformers")
    for name in ("slo_torch.hf", "diagnostics.hf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ModuleNotFoundError, match=f"transformers.*{HINT_HF.replace('[', '.').replace(']', '.')}"):
        importlib.import_module(module)


def test_hf_example_without_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    block(monkeypatch, "transformers")
    with pytest.raises(ModuleNotFoundError) as exc:
        load_example("hf_trainer", "hf_trainer_without_transformers")
    assert HINT_HF in str(exc.value)


@pytest.mark.parametrize("package,call", [
    ("sklearn", lambda data, plots, tmp: data.load_digits()),
    ("scipy", lambda data, plots, tmp: data.load_svhn(tmp)),
    ("matplotlib", lambda data, plots, tmp: plots.plot_matrices({"m": [[1.0]]}, tmp / "m.png")),
])
def test_optional_imports_name_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str, call
) -> None:
    from diagnostics import datasets as data
    from diagnostics import plots

    if package == "scipy":
        for name in ("train_32x32.mat", "test_32x32.mat"):
            (tmp_path / name).write_bytes(b"")
    block(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError) as exc:
        call(data, plots, tmp_path)
    assert HINT_EXAMPLES in str(exc.value)


@pytest.mark.parametrize("script,defaults", [
    ("examples/chain_monomial.py", ["(default: default)", "(default: results/chain_monomial)", "(default: 1)"]),
    ("examples/early_time.py", ["(default: results/early_time)"]),
    ("examples/random_kernel.py", ["(default: results/random_kernel)"]),
    ("examples/image_mlp.py", ["(default: 128)", "(default: 256)", "(default: 500)", "(default: 0.001)"]),
    ("examples/hf_trainer.py", ["(default: 300)", "(default: runs/hf_trainer)", "(default: 25)"]),
    ("benchmarks/slo_step.py", ["(default: 300)", "(default: 100)"]),
    ("benchmarks/ptk_cost.py", ["(default: 3)"]),
    ("benchmarks/monitor_overhead.py", ["(default: 50257)", "(default: 300)", "(default: 8)"]),
    ("benchmarks/measure_memory.py", ["(default: 4096)"]),
    ("benchmarks/memory_budget.py", ["(default: [400, 250])"]),
    ("benchmarks/nfa_summary_routes.py", ["(default: 5)"]),
])
def test_help_shows_the_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, script: str, defaults: list[str]
) -> None:
    spec = importlib.util.spec_from_file_location(f"help_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for default in defaults:
        assert default in text, (default, text)
