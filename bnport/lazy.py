"""Package public names loaded on first use (PEP 562), so that importing one light module of a stage (its settings,
say) does not import the whole stage and torch with it, while `from bnport.calibrate import calibrate` still works
and each package's `__all__` still lists its public API."""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], object]]:
    """(`__all__`, `__getattr__`) for `package`, whose public names live in the modules `exports` maps them to."""
    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return sorted(exports), __getattr__
