"""Declared settings of a pruning method: name, default, one-line doc and the check its value must pass.

A solver lists its `Option`s beside its math (`Solver.options`), so adding a method with settings is one
file: `SparsityConfig` asks the registry which options the methods of a run declare, checks the values
given, fills in the defaults, and refuses a setting that belongs to a method the run does not use.

A check is a function `(name, value) -> value` that returns the value in canonical form (an int given
for a float setting becomes a float) or raises `ValueError` / `TypeError` with a message naming the
setting and what it accepts. The factories below cover the common shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One setting of a method: `SparsityConfig(method=..., <name>=value)` and `--set <name>=value`."""

    name: str
    default: Any
    doc: str
    check: Check | None = None

    def validate(self, value: Any) -> Any:
        """The value in canonical form, or an error naming this setting."""
        return value if self.check is None else self.check(self.name, value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def positive_int() -> Check:
    """An integer >= 1 (not a bool)."""

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return value

    return check


def non_negative_int(meaning_of_zero: str) -> Check:
    """An integer >= 0; the message says what 0 means (e.g. "0: no CG polish")."""

    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer ({meaning_of_zero}), got {value!r}")
        return value

    return check


def finite_positive(what: str = "a finite number > 0") -> Check:
    """A real number in (0, inf), returned as a float; `what` words the message."""

    def check(name: str, value: Any) -> float:
        if not (_is_number(value) and 0 < value < float("inf")):
            raise ValueError(f"{name} must be {what}, got {value!r}")
        return float(value)

    return check


def optional_positive(meaning_of_none: str) -> Check:
    """None (the method's default) or a number > 0."""

    def check(name: str, value: Any) -> float | None:
        if value is None:
            return None
        if not (_is_number(value) and value > 0):
            raise ValueError(f"{name} must be > 0{meaning_of_none} or None (the method's default), got {value}")
        return value

    return check


def in_interval(low: float, high: float, closed_high: bool) -> Check:
    """A number in [low, high] or [low, high), returned as a float."""
    shown = f"[{low:g}, {high:g}{']' if closed_high else ')'}"

    def check(name: str, value: Any) -> float:
        inside = _is_number(value) and low <= value and (value <= high if closed_high else value < high)
        if not inside:
            raise ValueError(f"{name} must be a number in {shown}, got {value!r}")
        return float(value)

    return check


def one_of(choices: Sequence[Any]) -> Check:
    """One of `choices` (None may be among them)."""

    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value

    return check


def boolean(allow_none: bool = False) -> Check:
    """true or false (or null when `allow_none`)."""

    def check(name: str, value: Any) -> bool | None:
        if value is None and allow_none:
            return None
        if not isinstance(value, bool):
            accepted = "true, false or null" if allow_none else "true or false"
            error = ValueError if allow_none else TypeError
            raise error(f"{name} must be {accepted}, got {value!r}")
        return value

    return check
