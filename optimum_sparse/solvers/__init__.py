"""Registry of pruning methods. `register_solver("name")` makes a `Solver` subclass selectable by
`SparsityConfig(method="name")`, the CLI's `--method name` and every other entry point."""

from __future__ import annotations

from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver

_REGISTRY: dict[str, type[Solver]] = {}


def register_solver(name: str):
    """Class decorator adding a solver to the registry under `name`."""

    def decorate(cls: type[Solver]) -> type[Solver]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a solver named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_solver_class(name: str) -> type[Solver]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {available_methods()}") from None


# Built-in methods register themselves on import.
from optimum_sparse.solvers import admm, magnitude, pg, sparsegpt, sparsellm, wanda  # noqa: E402,F401

__all__ = [
    "LayerResult",
    "LayerStatistics",
    "Solver",
    "available_methods",
    "get_solver_class",
    "register_solver",
]
