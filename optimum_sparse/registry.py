"""The registry of pruning methods: name -> solver class, and the settings each class declares.

It sits below both the config and the solvers: solvers register themselves here (`register_solver`)
and `SparsityConfig` looks methods and their `Option`s up here, so neither imports the other. A
method class is read through a few class attributes only (`options`, `patterns`, `uses`,
`check_settings`, `can_refit`; see `optimum_sparse.solvers.base.Solver`).
"""

from __future__ import annotations

from typing import Any

from optimum_sparse.options import Option

_METHODS: dict[str, type] = {}


def register_solver(name: str):
    """Class decorator adding a solver class to the registry under `name`.

    Its options may share a name with another method's (several Hessian methods read `dampening`) but
    must then agree on the default, so that reading the setting means the same whoever declares it.
    """

    def decorate(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"a solver named {name!r} is already registered ({_METHODS[name].__name__})")
        for option in getattr(cls, "options", ()):
            for other_name, other in _METHODS.items():
                clash = next((o for o in getattr(other, "options", ()) if o.name == option.name), None)
                if clash is not None and other_name != name and clash.default != option.default:
                    raise ValueError(
                        f"{cls.__name__} declares option {option.name!r} with default {option.default!r}, but "
                        f"method {other_name!r} declares it with {clash.default!r}; rename one of them"
                    )
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_solver_class(name: str) -> type:
    """The solver class registered as `name` (a ValueError listing the choices otherwise)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; choose one of {available_methods()}") from None


def options_of(name: str) -> tuple[Option, ...]:
    """The settings method `name` declares."""
    return tuple(getattr(get_solver_class(name), "options", ()))


def option_owners() -> dict[str, list[str]]:
    """{setting name: the methods declaring it}, over every registered method."""
    owners: dict[str, list[str]] = {}
    for method in available_methods():
        for option in options_of(method):
            owners.setdefault(option.name, []).append(method)
    return owners


def find_option(name: str) -> Option | None:
    """The declaration of setting `name` by any registered method (they agree on the default)."""
    for method in available_methods():
        for option in options_of(method):
            if option.name == name:
                return option
    return None


def methods_used(method: str, weight_update: str | None, settings: dict[str, Any]) -> list[str]:
    """Every method a run calls: `method`, its `weight_update`, and what those use in turn (an inner solver).

    `settings` holds the values given so far; a method's `uses(values)` sees them with its defaults filled
    in and each value checked, so a bad inner-solver name fails with that setting's own message.
    """
    order = [method] + ([weight_update] if weight_update else [])
    index = 0
    while index < len(order):
        cls = get_solver_class(order[index])
        values = {o.name: o.validate(settings.get(o.name, o.default)) for o in options_of(order[index])}
        for extra in cls.uses(values):
            if extra not in order:
                order.append(extra)
        index += 1
    return order
