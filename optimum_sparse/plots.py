"""Pictures of pruning results: perplexity against sparsity, sparsity per layer, channels kept per block.

A table of 210 layer sparsities or 30 blocks' widths is read faster as a picture. Each function
draws one figure and writes it as a PNG (100 dpi, about 800 pixels wide: readable at the width of a
documentation page) and returns the path. The file is written next to its destination and renamed
into place, so a failed drawing leaves nothing half-written.

matplotlib is optional (`pip install "optimum-sparse[plots]"`) and imported only when drawing; the
figures render through the Agg canvas directly, leaving the process's pyplot backend alone (a
notebook keeps its own).
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

INSTALL_HINT = 'pip install "optimum-sparse[plots]"'
DPI = 100
#: what a record's sparsity may name for the unpruned model
DENSE_NAMES = ("dense", "none")
_BLOCK_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<sub>.+)$")
_ATTENTION_HINTS = ("attn", "attention")


def require_matplotlib() -> None:
    """An ImportError naming the install line unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(f"drawing plots needs matplotlib: {INSTALL_HINT}") from err


def check_png_path(path: str | os.PathLike) -> str:
    """`path` as a string if a PNG can be written there; else a ValueError / FileNotFoundError naming the fix."""
    text = os.fspath(path)
    if not text.lower().endswith(".png"):
        raise ValueError(f"plots are written as PNG files: {text!r} should end in .png")
    if os.path.isdir(text):
        raise ValueError(f"{text!r} is a directory; give the path of a .png file")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the directory of {text!r} does not exist; create {parent!r} first")
    return text


def _figure(width: float, height: float, rows: int = 1):
    """(figure, axes) on the Agg canvas, without pyplot (no global backend switch)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return figure, list(axes)


def _save(figure, path: str | os.PathLike) -> str:
    """Write `figure` to `path` through a temporary file in the same directory; returns the path."""
    target = check_png_path(path)
    directory, name = os.path.split(os.path.abspath(target))
    temporary = os.path.join(directory, f".tmp-optimum-sparse-{secrets.token_hex(4)}-{name}")  # umask permissions
    try:
        figure.savefig(temporary, format="png", dpi=DPI)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return target


def _percent_axis(axis) -> None:
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def _plain_log_axis(axes) -> None:
    """Log-scaled y with ticks at 1, 2, 5 x 10^k written as plain numbers (30, 100, 2000), not 3 x 10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def parse_sparsity(value: Any) -> tuple[float, str | None]:
    """(fraction removed, N:M label or None) from 0.5, "50%", "0.5" or "2:4"; "dense" gives (0.0, None)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in DENSE_NAMES:
            return 0.0, None
        if ":" in text:
            kept, _, group = text.partition(":")
            try:
                n, m = int(kept), int(group)
            except ValueError:
                raise ValueError(f"sparsity {value!r}: an N:M pattern names two integers, such as 2:4") from None
            if not 0 < n <= m:
                raise ValueError(f"sparsity {value!r}: N:M needs 0 < N <= M")
            return 1.0 - n / m, f"{n}:{m}"
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(
                f"sparsity {value!r}: expected a fraction (0.5), a percentage (50%) or N:M (2:4)"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"sparsity {value!r}: expected a fraction in [0, 1]")
    return float(value), None


def ppl_vs_sparsity_plot(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    dense_ppl: float | None = None,
    title: str = "Perplexity vs sparsity",
    log_y: bool | None = None,
) -> str:
    """One line per method through its perplexities at each unstructured sparsity; returns `path`.

    `records` are mappings with "method", "sparsity" (0.5, "50%" or "2:4") and "ppl". A record whose
    method or sparsity is "dense" (or `dense_ppl`) gives the horizontal reference line. N:M records are
    drawn apart from the line as open diamonds in their method's colour, just right of their fraction
    (2:4 beside 50%).
    `log_y` (default: when perplexities span more than 10x) puts perplexity on a log scale.
    """
    check_png_path(path)
    series: dict[str, list[tuple[float, float, str | None]]] = {}
    for index, record in enumerate(records):
        missing = [key for key in ("method", "sparsity", "ppl") if key not in record]
        if missing:
            raise ValueError(f"record {index} ({dict(record)}) lacks {missing}: give method, sparsity and ppl")
        ppl = record["ppl"]
        if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) or ppl <= 0:
            raise ValueError(f"record {index}: ppl must be a positive finite number, got {ppl!r}")
        method = str(record["method"])
        if method.lower() in DENSE_NAMES or str(record["sparsity"]).lower() in DENSE_NAMES:
            dense_ppl = float(ppl) if dense_ppl is None else dense_ppl
            continue
        fraction, pattern = parse_sparsity(record["sparsity"])
        series.setdefault(method, []).append((fraction, float(ppl), pattern))
    if not series:
        raise ValueError("no pruned records to draw: give records with method, sparsity and ppl")
    values = [ppl for points in series.values() for _, ppl, _ in points] + ([dense_ppl] if dense_ppl else [])
    if log_y is None:
        log_y = max(values) / min(values) > 10

    figure, (axes,) = _figure(8, 4.8)
    xs = sorted({x for points in series.values() for x, _, _ in points})
    shift = 0.025 * ((xs[-1] - xs[0]) or 0.3)  # N:M markers just right of their fraction, off the line's marker
    patterns: set[str] = set()
    for number, (method, points) in enumerate(series.items()):
        colour = f"C{number % 10}"
        line = sorted((x, y) for x, y, pattern in points if pattern is None)
        nm = [(x + shift, y, pattern) for x, y, pattern in points if pattern is not None]
        style = {"marker": "D", "markersize": 7, "markerfacecolor": "none", "color": colour, "linestyle": "none"}
        if line:
            axes.plot([x for x, _ in line], [y for _, y in line], marker="o", color=colour, label=method)
        if nm:
            axes.plot([x for x, _, _ in nm], [y for _, y, _ in nm], **style, **({} if line else {"label": method}))
            patterns.update(pattern for _, _, pattern in nm)
    if dense_ppl is not None:
        axes.axhline(dense_ppl, color="0.3", linestyle="--", linewidth=1.2, label=f"dense ({dense_ppl:.2f})")
    if patterns:
        label = ", ".join(sorted(patterns)) + " (N:M, open marker)"
        axes.plot([], [], marker="D", markerfacecolor="none", color="0.3", linestyle="none", label=label)
    if log_y:
        _plain_log_axis(axes)
    axes.set_xticks(xs)
    axes.set_xlabel("sparsity of the pruned linear layers")
    axes.set_ylabel("perplexity" + (" (log scale)" if log_y else ""))
    _percent_axis(axes.xaxis)
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=9, loc="best")
    return _save(figure, path)


def _split_layer_name(name: str) -> tuple[int, str]:
    """(block index, name inside the block) of "model.layers.3.self_attn.q_proj"."""
    match = _BLOCK_NAME.match(name)
    if match is None:
        raise ValueError(f"layer name {name!r} has no block index (expected '<blocks>.<index>.<module>')")
    return int(match["block"]), match["sub"]


def _short_kinds(kinds: list[str]) -> dict[str, str]:
    """Legend labels: the last name component ("q_proj") where that is unambiguous, else the full sub-name."""
    last = [kind.rsplit(".", 1)[-1] for kind in kinds]
    return {kind: short if last.count(short) == 1 else kind for kind, short in zip(kinds, last)}


def layer_sparsity_plot(
    report: Mapping[str, Any], path: str | os.PathLike, *, title: str = "Sparsity per layer"
) -> str:
    """Bars of each prunable linear's measured sparsity, grouped by block and coloured by projection; returns `path`.

    `report` is `optimum_sparse.evaluation.sparsity_report(model)`: {"layers": {name: fraction},
    "total": fraction over all their weights}; the total is drawn as a dashed line (without it, the plain
    mean of the layers).
    """
    check_png_path(path)
    layers = report.get("layers") if isinstance(report, Mapping) else None
    if not layers:
        raise ValueError("the report has no layers: pass sparsity_report(model), {'layers': {name: fraction}, ...}")
    by_kind: dict[str, dict[int, float]] = {}
    for name, value in layers.items():
        block, kind = _split_layer_name(name)
        by_kind.setdefault(kind, {})[block] = float(value)
    total = report.get("total")
    mean = float(total) if total is not None else sum(map(float, layers.values())) / len(layers)
    blocks = sorted({block for values in by_kind.values() for block in values})
    labels = _short_kinds(list(by_kind))

    figure, (axes,) = _figure(8, 4.2)
    width = 0.84 / len(by_kind)
    for number, (kind, values) in enumerate(by_kind.items()):
        offset = (number - (len(by_kind) - 1) / 2) * width
        xs = [block + offset for block in blocks if block in values]
        axes.bar(
            xs,
            [values[block] for block in blocks if block in values],
            width,
            label=labels[kind],
            color=f"C{number % 10}",
        )
    what = "over all weights" if total is not None else "mean of the layers"
    axes.axhline(mean, color="black", linestyle="--", linewidth=1.2, label=f"{mean:.1%} {what}")
    axes.set_ylim(0, max(1.0, max(map(float, layers.values()))) * 1.05)
    _percent_axis(axes.yaxis)
    axes.set_xlabel("block")
    axes.set_ylabel("zeros in the weight")
    step = max(1, math.ceil(len(blocks) / 30))
    axes.set_xticks(blocks[::step])
    axes.tick_params(axis="x", labelsize=8)
    axes.set_xlim(blocks[0] - 0.6, blocks[-1] + 0.6)
    axes.set_title(title)
    axes.grid(True, axis="y", alpha=0.3)
    figure.legend(fontsize=8, ncol=min(len(by_kind) + 1, 4), loc="outside lower center")
    return _save(figure, path)


def _config_widths(config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(MLP channels, KV groups) per block as a config.json describes them (its text config for multimodal ones)."""
    source = config
    if not any(key in config for key in ("intermediate_size", "ffn_dim", "n_inner")) and isinstance(
        config.get("text_config"), Mapping
    ):
        source = config["text_config"]
    mlp = next((source[key] for key in ("intermediate_size", "ffn_dim", "n_inner") if source.get(key)), None)
    kv = next(
        (source[key] for key in ("num_key_value_heads", "num_attention_heads", "n_head") if source.get(key)), None
    )
    return (int(mlp) if mlp else None), (int(kv) if kv else None)


def kept_units_from_config(config: Mapping[str, Any]) -> tuple[dict[str, int], int | None, int | None]:
    """(kept units, dense MLP channels, dense KV groups) from a sliced checkpoint's config.json contents.

    A sliced checkpoint keeps its dense widths in the config's own fields, except a standard-shape one
    (`uniform_widths`: every block kept the same widths), whose fields were set to the kept widths: its
    dense widths are then unknown (None).
    """
    units = config.get("sliced_units")
    if not units:
        raise ValueError("the config has no 'sliced_units': it is not a channel-sliced checkpoint")
    kept = {str(name): int(count) for name, count in units.items()}
    mlp, kv = _config_widths(config)
    groups = _units_by_block(kept)
    if all(groups["mlp"].get(b, mlp) == mlp for b in groups["mlp"]) and all(
        groups["attention"].get(b, kv) == kv for b in groups["attention"]
    ):
        mlp = kv = None  # the config describes the sliced widths (standard shape)
    return kept, mlp, kv


def _units_by_block(units: Mapping[str, int]) -> dict[str, dict[int, int]]:
    """{"mlp": {block: channels}, "attention": {block: KV groups}} from {"model.layers.3.mlp": 682, ...}."""
    grouped: dict[str, dict[int, int]] = {"mlp": {}, "attention": {}}
    for name, count in units.items():
        numbers = [int(part) for part in name.split(".") if part.isdigit()]
        if not numbers:
            raise ValueError(f"sliced unit name {name!r} has no block index (expected e.g. 'model.layers.3.mlp')")
        last = name.rsplit(".", 1)[-1].lower()
        kind = "attention" if any(hint in last for hint in _ATTENTION_HINTS) else "mlp"
        grouped[kind][numbers[-1]] = int(count)
    return grouped


def channels_per_block_plot(
    units: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    dense_mlp: int | None = None,
    dense_kv: int | None = None,
    title: str = "Channels kept per block",
) -> str:
    """Bars of the MLP channels and KV groups each block of a channel-sliced model kept; returns `path`.

    `units` is {module name: kept units} (a sliced model's `config.sliced_units`) or a whole config.json
    (a mapping holding "sliced_units"), whose fields then give the dense widths drawn as dashed lines
    unless `dense_mlp` / `dense_kv` are given.
    """
    check_png_path(path)
    if "sliced_units" in units:
        kept, config_mlp, config_kv = kept_units_from_config(units)
        dense_mlp = config_mlp if dense_mlp is None else dense_mlp
        dense_kv = config_kv if dense_kv is None else dense_kv
    else:
        kept = {str(name): int(count) for name, count in units.items()}
    if not kept:
        raise ValueError("no kept units to draw: pass {module name: kept units} or a sliced config.json")
    grouped = _units_by_block(kept)
    panels = [
        (kind, label, dense)
        for kind, label, dense in (("mlp", "MLP channels", dense_mlp), ("attention", "KV groups", dense_kv))
        if grouped[kind]
    ]
    figure, axes_list = _figure(8, 2.6 * len(panels) + 0.6, rows=len(panels))
    for number, (axes, (kind, label, dense)) in enumerate(zip(axes_list, panels)):
        values = grouped[kind]
        blocks = sorted(values)
        axes.bar(blocks, [values[b] for b in blocks], 0.75, color=f"C{number}")
        kept_total = sum(values.values())
        heading = f"{label} kept: {kept_total}"
        if dense:
            axes.axhline(dense, color="0.3", linestyle="--", linewidth=1.2)
            axes.annotate(
                f"dense: {dense}",
                (1.0, dense),
                xycoords=("axes fraction", "data"),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=8,
                color="0.3",
            )
            heading += f" of {dense * len(blocks)} ({kept_total / (dense * len(blocks)):.0%})"
        axes.set_ylim(0, max([*values.values(), dense or 0]) * 1.2)
        axes.set_ylabel(label)
        axes.set_title(heading, fontsize=10)
        axes.grid(True, axis="y", alpha=0.3)
        if kind == "attention":
            axes.yaxis.get_major_locator().set_params(integer=True)
    blocks = sorted({b for values in grouped.values() for b in values})
    step = max(1, math.ceil(len(blocks) / 30))
    axes_list[-1].set_xticks(blocks[::step])
    axes_list[-1].tick_params(axis="x", labelsize=8)
    axes_list[-1].set_xlabel("block")
    figure.suptitle(title)
    return _save(figure, path)
