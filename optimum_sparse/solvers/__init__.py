"""The built-in pruning methods, one module each; importing this package registers them.

`register_solver("name")` (from `optimum_sparse.registry`) makes a `Solver` subclass selectable by
`SparsityConfig(method="name")`, the CLI's `--method name` and every other entry point. A method
defined outside this package registers the same way, from its own module (mask learning, "pg",
registers from `optimum_sparse.pg.solver`, which the package imports).
"""

from __future__ import annotations

from optimum_sparse.registry import available_methods, get_solver_class, register_solver
from optimum_sparse.solvers import admm, magnitude, sparsegpt, sparsellm, wanda  # noqa: F401
from optimum_sparse.solvers.base import BlockView, LayerResult, LayerStatistics, Solver

__all__ = [
    "BlockView",
    "LayerResult",
    "LayerStatistics",
    "Solver",
    "available_methods",
    "get_solver_class",
    "register_solver",
]
