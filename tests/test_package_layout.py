"""The package's shape: no private names imported across modules, and the docs' walkthrough is real.

The layering itself (imports run primitives -> solvers -> engine -> features -> cli, no cycles) is
checked by `lint-imports` in `.ci/run`, with the contracts in pyproject.toml.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optimum_sparse"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(path: Path) -> list[str]:
    """`from optimum_sparse.x import _name` anywhere in the file (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optimum_sparse"):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}" for alias in node.names if _private(alias.name)]
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert offenders == []


def test_the_adding_a_method_walkthrough_shows_the_toy_method_the_tests_register():
    doc = (ROOT / "docs" / "adding_a_method.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    toy = (ROOT / "tests" / "solvers" / "toy_method.py").read_text(encoding="utf-8")
    assert toy in blocks
