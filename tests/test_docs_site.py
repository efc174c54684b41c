"""The docs site's build hook (mkdocs_hooks.py): settings tables from the registry, optional pages in the nav.

`mkdocs build --strict` itself runs in `.ci/run`; these tests check what the hook puts into the pages.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from optimum_sparse.registry import options_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_marker_becomes_a_row_per_declared_setting_with_its_default(hooks):
    page = hooks.fill_options("## Settings\n\n<!-- options: admm -->\n\nafter\n")
    assert "<!--" not in page and page.endswith("after\n")
    rows = page.count("<tr><td>")
    assert rows == len(options_of("admm"))
    assert "<tr><td><code>admm_iterations</code></td><td><code>20</code></td>" in page
    assert "<td><code>null</code></td>" in page  # dampening None, written as --set reads it
    assert "<td><code>true</code></td>" in page  # gradual


def test_option_docs_are_escaped_not_read_as_markup(hooks):
    table = hooks.options_table("sparsellm")
    assert "||W1 X - z||^2" in table  # the pipes of a norm stay text inside an HTML table
    assert "&#x27;admm&#x27;" in table and "<p>" not in table


def test_a_method_without_settings_says_so(hooks):
    assert options_of("wanda") == ()
    assert "declares no settings" in hooks.options_table("wanda")


def test_marker_naming_an_unknown_method_fails_the_build(hooks):
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        hooks.fill_options("<!-- options: nope -->")


def test_every_method_page_marker_names_a_registered_method(hooks):
    pages = sorted((ROOT / "docs" / "methods").glob("*.md"))
    named = {m for page in pages for m in hooks.OPTIONS_MARKER.findall(page.read_text(encoding="utf-8"))}
    assert named == {"magnitude", "wanda", "sparsegpt", "admm", "sparsellm", "pg"}


NAV = [{"Home": "index.md"}, {"Benchmarks": "benchmarks.md"}, {"API reference": [{"SparsityConfig": "api/config.md"}]}]


def test_evaluation_page_joins_the_nav_after_benchmarks_only_when_it_exists(hooks, tmp_path):
    assert hooks.add_optional_pages(json.loads(json.dumps(NAV)), tmp_path) == NAV
    (tmp_path / "evaluation.md").write_text("# Evaluation\n")
    nav = hooks.add_optional_pages(json.loads(json.dumps(NAV)), tmp_path)
    assert nav[1:3] == [{"Benchmarks": "benchmarks.md"}, {"Evaluation (lm-eval)": "evaluation.md"}]
    assert hooks.add_optional_pages(nav, tmp_path) == nav  # listed already: not added twice
