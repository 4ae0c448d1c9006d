"""Public names of a package imported on first use (PEP 562), so that importing the
package costs nothing until one of them is needed: `mnist-cnn --help` answers without
loading PyTorch."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
    """`__getattr__` and `__dir__` for `package`, whose public `names` live in the modules
    they map to."""
    module = importlib.import_module(package)

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(names[name]), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted([*vars(module), *names])

    return __getattr__, __dir__
