"""mkdocs hooks of the docs site: settings tables read from the registry, and pages that may not exist yet.

A method page says `<!-- options: admm -->` where its settings table goes; the table is built from
`optimum_sparse.registry.options_of(method)` at build time, so it lists exactly what
`SparsityConfig(method=..., <setting>=...)` and `--set` accept, with the defaults the code has. A marker
naming an unregistered method fails the build (a ValueError from the registry).

`docs/evaluation.md` is written on another branch; it joins the nav after the benchmarks page once it
exists, so the nav never names a missing page (which `mkdocs build --strict` refuses).
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OPTIONS_MARKER = re.compile(r"<!--\s*options:\s*([\w-]+)\s*-->")
OPTIONAL_PAGES = {"evaluation.md": ("Evaluation (lm-eval)", "benchmarks.md")}


def _registry():
    """The registry of this checkout (not of whichever copy is installed), with every method registered."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import optimum_sparse  # noqa: F401  registers the built-in methods, pg included
    from optimum_sparse import registry

    return registry


def shown_default(value: Any) -> str:
    """A default as `--set` and sparsity_config.json write it (JSON: null, true, 0.05)."""
    return json.dumps(value)


def options_table(method: str) -> str:
    """An HTML table of the settings method `method` declares: name, default, what it does.

    HTML rather than a Markdown table, so that the docs' own `|W|`, `*` and `_` are shown as written.
    """
    options = _registry().options_of(method)
    if not options:
        return f"<p>Method <code>{html.escape(method)}</code> declares no settings of its own.</p>\n"
    rows = "".join(
        f"<tr><td><code>{html.escape(o.name)}</code></td><td><code>{html.escape(shown_default(o.default))}</code>"
        f"</td><td>{html.escape(o.doc)}</td></tr>\n"
        for o in options
    )
    head = "<tr><th>setting</th><th>default</th><th>meaning</th></tr>\n"
    return f"<table>\n<thead>\n{head}</thead>\n<tbody>\n{rows}</tbody>\n</table>\n"


def fill_options(markdown: str) -> str:
    """Every `<!-- options: METHOD -->` marker replaced by that method's settings table."""
    return OPTIONS_MARKER.sub(lambda match: options_table(match.group(1)), markdown)


def add_optional_pages(nav: list, docs_dir: Path) -> list:
    """The nav with each optional page that exists inserted after its anchor page (once)."""
    listed = json.dumps(nav)
    for page, (title, after) in OPTIONAL_PAGES.items():
        if not (docs_dir / page).is_file() or f'"{page}"' in listed:
            continue
        index = next((i for i, entry in enumerate(nav) if isinstance(entry, dict) and after in entry.values()), None)
        nav.insert(len(nav) if index is None else index + 1, {title: page})
    return nav


def on_config(config, **kwargs):
    """mkdocs hook: optional pages that exist join the nav."""
    if config.nav is not None:
        config.nav = add_optional_pages(config.nav, Path(config.docs_dir))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """mkdocs hook: settings tables filled in from the registry."""
    return fill_options(markdown)
