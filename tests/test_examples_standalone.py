"""A user can copy one example script anywhere and run it from any folder: the scripts import only the installed
packages (``slo_torch``, ``diagnostics``), never a helper module next to them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def run_copy(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Copy ``examples/<script>`` alone into a fresh folder and run it from a different working directory."""
    (tmp_path / "copy").mkdir()
    (tmp_path / "cwd").mkdir()
    copy = shutil.copy(EXAMPLES / script, tmp_path / "copy" / script)
    return subprocess.run([sys.executable, copy, *args], cwd=tmp_path / "cwd", capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_examples_import_only_installed_packages(script: str) -> None:
    tree = ast.parse((EXAMPLES / script).read_text(encoding="utf-8"))
    tops = {(a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    assert not tops & {p.stem for p in EXAMPLES.glob("*.py")}, tops  # no sibling script: each runs alone


def test_quickstart_runs_from_a_copy_in_another_folder(tmp_path: Path) -> None:
    proc = run_copy(tmp_path, "quickstart.py")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "before training" and "after 300 SLO steps" in lines
    after = lines[lines.index("after 300 SLO steps") + 1:]
    first = next(line for line in after if line.strip().startswith("layer 0:"))
    assert float(first.split("UC-NFA")[1].split()[0]) > 0.9  # the promoted first layer aligns with its AGOP
    assert list((tmp_path / "cwd").iterdir()) == []  # it writes nothing


@pytest.mark.parametrize("script", ["chain_monomial.py", "image_mlp.py"])
def test_help_of_a_copy_in_another_folder(tmp_path: Path, script: str) -> None:
    proc = run_copy(tmp_path, script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--out" in proc.stdout
