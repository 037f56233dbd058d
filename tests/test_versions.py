"""The supported versions: what pyproject.toml declares is what the README states, and the feature checks that
differ between torch versions answer instead of raising."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from slo_torch.distributed import is_dtensor

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
    """``{"torch": "2.6", ...}``: the ``>=`` bound of every requirement in pyproject.toml that has one."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return dict(re.findall(r'"([A-Za-z][\w-]*)>=([\d.]+)"', text))


def test_readme_states_the_declared_floors() -> None:
    floors = _floors()
    assert {"torch", "transformers", "accelerate"} <= floors.keys(), floors
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("torch", "transformers", "accelerate"):
        assert f"{name} ≥ {floors[name]}" in readme, name
    assert f"tools/check_versions.sh {floors['torch']}" in readme  # the floor's check command


def test_is_dtensor_before_the_dtensor_module_defines_the_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # sys.modules holds a module while it is being imported, before its classes exist
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("torch.distributed.tensor"))
    assert not is_dtensor(torch.zeros(2))

