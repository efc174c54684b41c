"""The built-in pruning methods, one module each; importing this package registers them all.

`register_solver("name")` (from `optimum_sparse.registry`) makes a `Solver` subclass selectable by
`SparsityConfig(method="name")`, the CLI's `--method name` and every other entry point. Every module of
this package is imported here, so a new built-in method is one new file; a method defined elsewhere
registers the same way from its own module (mask learning, "pg", registers from
`optimum_sparse.pg.solver`, which the package imports). See docs/adding_a_method.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from optimum_sparse.registry import available_methods, get_solver_class, register_solver
from optimum_sparse.solvers.base import BlockView, LayerResult, LayerStatistics, Solver

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "BlockView",
    "LayerResult",
    "LayerStatistics",
    "Solver",
    "available_methods",
    "get_solver_class",
    "register_solver",
]
