"""Feature checks that differ between torch versions answer instead of raising."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from slo_torch.distributed import is_dtensor

def test_is_dtensor_before_the_dtensor_module_defines_the_class(monkeypatch: pytest.MonkeyPatch) -> None:
    # sys.modules holds a module while it is being imported, before its classes exist
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("torch.distributed.tensor"))
    assert not is_dtensor(torch.zeros(2))

