"""Optional packages: import one, or fail with a message that names the ``slo-torch`` extra installing it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "install_hint", "require"]

#: Optional packages the data loaders, plots and examples use, and the extra of ``slo-torch`` that installs each.
EXTRAS = {"matplotlib": "examples", "tqdm": "examples", "scipy": "examples", "PIL": "examples",
          "sklearn": "examples", "transformers": "hf", "accelerate": "hf",
          "peft": "peft"}


def install_hint(module: str) -> str:
    """``"the optional package '<top>' is not installed; install it with: pip install \\"slo-torch[<extra>]\\""``
    for the top-level package ``<top>`` of ``module``."""
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    fix = f'pip install "slo-torch[{extra}]"' if extra else f"pip install {top}"
    return f"the optional package {top!r} is not installed; install it with: {fix}"


def require(module: str) -> ModuleType:
    """``importlib.import_module(module)``; if an optional package is missing, a ``ModuleNotFoundError``
    that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(install_hint(exc.name or module), name=exc.name) from exc
