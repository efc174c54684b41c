"""Names a package exports without importing their modules until first used (PEP 562).

The package and `optimum_sparse.pg` export Trainer callbacks and PEFT helpers; importing those at
package import would pull transformers' Trainer machinery into every plain `prune()` or checkpoint load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """(`__getattr__`, `__dir__`) for a package module: `names` maps each exported name to its module.

    A name is imported on first access and then cached in the package's `namespace` (its globals()).
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
