"""Presets: the method and settings that measured best at a given sparsity.

`SparsityConfig.recipe("best", sparsity=0.5)` and `optimum-sparse prune --recipe best --sparsity 0.5`
start from a recipe's settings; anything given explicitly (a keyword, a flag, `--set`) overrides them.
A recipe is a list of rules tried in order; the first whose pattern kind and sparsity range match the
request gives the settings. The choices, and what each part contributed, are measured in
docs/quality.md (SmolLM2-135M, anchors protocol); change them only with a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rule:
    """Settings for requests of one pattern kind ("unstructured" or "n:m") up to `max_sparsity`."""

    kind: str
    max_sparsity: float
    settings: dict[str, Any] = field(default_factory=dict)
    #: why these settings: the measurement behind them (shown in the docs and the log)
    reason: str = ""


RECIPES: dict[str, tuple[Rule, ...]] = {
    "best": (
        Rule(
            "n:m",
            1.0,
            {"method": "sparsellm", "reconstruction": "block"},
            "2:4: SparseLLM, then block reconstruction (SmolLM2: 33.13 against SparseLLM's 36.06, ADMM's 40.13 "
            "and ADMM + reconstruction's 33.65, which takes about 0.6x the time)",
        ),
        Rule(
            "unstructured",
            0.6,
            {"method": "admm", "sparsity_profile": "owl", "reconstruction": "block"},
            "50%: ADMM with OWL budgets, then block reconstruction (SmolLM2: 26.22 against ADMM + reconstruction's "
            "26.40 and ADMM's 28.55, also the best of them on three out-of-domain texts; 13 min on 2 CPU cores)",
        ),
        Rule(
            "unstructured",
            1.0,
            {"method": "sparsellm", "sparsity_profile": "owl", "reconstruction": "block"},
            "above 60%: SparseLLM with OWL budgets, then block reconstruction (SmolLM2 70%: 42.77 against "
            "SparseLLM's 47.93, SparseLLM + reconstruction's 44.02 and ADMM's best, 44.79; 80%: 63.64 against "
            "SparseLLM's 71.05, SparseLLM + reconstruction's 68.38 and ADMM's best, 80.03)",
        ),
    ),
}


def available_recipes() -> list[str]:
    return sorted(RECIPES)


def recipe_rule(name: str, sparsity: float | None, pattern: str | None) -> Rule:
    """The rule of recipe `name` for this request (a fraction `sparsity`, or an N:M `pattern`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes are {available_recipes()}")
    if pattern is not None and ":" not in pattern:
        raise ValueError(f"recipe {name!r} is for unstructured or N:M sparsity, not pattern {pattern!r}")
    kind = "n:m" if pattern is not None else "unstructured"
    amount = 0.5 if sparsity is None else float(sparsity)
    for rule in RECIPES[name]:
        if rule.kind == kind and amount <= rule.max_sparsity:
            return rule
    raise ValueError(f"recipe {name!r} has no rule for {pattern or amount}")
