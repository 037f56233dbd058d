"""Shared test setup: the example scripts' folder is importable (``import common``, ``import image_data``), as
it is when a script runs as ``python examples/<name>.py``; processes spawned by the tests inherit the path."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
