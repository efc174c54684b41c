"""The Markdown sections of the model card's body, each from plain values (no model needed).

A reader of the card did not prune the model: the sections say what was measured on the saved weights
(sparsity per kind of layer), how the pruned model compares with the dense one (perplexity, zero-shot
accuracy), exactly how it was made (the command line, or the `SparsityConfig` of a Python run), and how
to load and fine-tune it without losing the zeros.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from optimum_sparse.calibration import looks_like_path, parse_dataset_spec
from optimum_sparse.card.metadata import (
    EVAL_DATA,
    EVAL_MAX_WINDOWS,
    EVAL_SEQ_LEN,
    EVALUATION_KEYS,
    PERPLEXITY,
    PERPLEXITY_DENSE,
    ZERO_SHOT,
    ZERO_SHOT_DENSE,
    learned_in_training,
    zero_shot_scores,
)
from optimum_sparse.checkpoint import COMPACT_WEIGHTS_NAME, MASKS_NAME
from optimum_sparse.config import CONFIG_NAME, FORMAT_VERSION, SparsityConfig
from optimum_sparse.registry import find_option
from optimum_sparse.version import __version__

# "model.layers.3.self_attn.q_proj" -> blocks "model.layers", index 3, kind "self_attn.q_proj"
_BLOCK_LAYER = re.compile(r"^(?P<blocks>.*?)\.(?P<index>\d+)\.(?P<kind>.+)$")


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_value(value: Any) -> str:
    """A metric as a table cell: 4 significant digits for a float, JSON for a list or dict."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list, tuple)):
        return "`" + json.dumps(value, sort_keys=True, default=str) + "`"
    return str(value)


def other_metrics(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, cell) of each metric that no section of its own shows, for the summary table."""
    return [(key, format_value(value)) for key, value in metrics.items() if key not in EVALUATION_KEYS]


def layer_summary(layer_sparsity: Mapping[str, float], measured_sparsity: float) -> list[str]:
    """Sparsity per kind of linear layer (min / mean / max over the blocks), then over all pruned layers.

    One row per layer would be hundreds of rows for a real model; the values per layer are in
    sparsity_config.json (`layer_sparsity`).
    """
    kinds: dict[str, list[float]] = {}
    blocks = set()
    for name, value in layer_sparsity.items():
        match = _BLOCK_LAYER.match(name)
        kind = match["kind"] if match else name
        if match:
            blocks.add((match["blocks"], match["index"]))
        kinds.setdefault(kind, []).append(value)
    rows = [
        (f"`{kind}`", str(len(values)), f"{min(values):.2%}", f"{sum(values) / len(values):.2%}", f"{max(values):.2%}")
        for kind, values in kinds.items()
    ]
    rows.append(("all pruned layers (weighted by size)", str(len(layer_sparsity)), "", f"{measured_sparsity:.2%}", ""))
    return [
        "## Sparsity per layer",
        "",
        f"Zeros measured on the saved weights, per kind of linear layer over {len(blocks)} blocks "
        f"(every layer's value: `layer_sparsity` in `{CONFIG_NAME}`).",
        "",
        *table(("layer", "count", "min", "mean", "max"), rows),
    ]


def _eval_data_text(metrics: Mapping[str, Any]) -> str:
    data = metrics.get(EVAL_DATA)
    if not isinstance(data, str):
        return "Evaluation data not recorded."
    if looks_like_path(data):
        where = f"the local text file `{os.path.basename(data)}`"
    else:
        name, config, split = parse_dataset_spec(data, "test")
        where = f"`{name}`" + (f" ({config})" if config else "") + f", {split} split"
    windows = metrics.get(EVAL_MAX_WINDOWS)
    count = f"the first {windows}" if windows else "all of them"
    seq_len = metrics.get(EVAL_SEQ_LEN)
    size = f"{seq_len}-token windows" if seq_len else "windows"
    return f"Measured on {where}: {size}, {count}."


def perplexity_section(metrics: Mapping[str, Any]) -> list[str]:
    """Perplexity of the pruned model, beside the dense model's when both were measured (lower is better)."""
    pruned, dense = metrics.get(PERPLEXITY), metrics.get(PERPLEXITY_DENSE)
    if not isinstance(pruned, (int, float)) and not isinstance(dense, (int, float)):
        return []
    rows = []
    if isinstance(dense, (int, float)):
        rows.append(("dense (before pruning)", f"{dense:.2f}"))
    if isinstance(pruned, (int, float)):
        change = f" ({pruned / dense - 1:+.1%})" if isinstance(dense, (int, float)) and dense else ""
        rows.append(("pruned (this model)", f"{pruned:.2f}{change}"))
    return ["## Perplexity", "", *table(("model", "perplexity"), rows), "", _eval_data_text(metrics)]


def _score(scores: Mapping[str, tuple[float, float | None]], metric: str) -> str:
    if metric not in scores:
        return ""
    value, error = scores[metric]
    return f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def zero_shot_section(metrics: Mapping[str, Any]) -> list[str]:
    """A table of the zero-shot results (`metrics["zero_shot"]`, and `metrics["zero_shot_dense"]` beside them)."""
    pruned_raw, dense_raw = metrics.get(ZERO_SHOT), metrics.get(ZERO_SHOT_DENSE)
    pruned = zero_shot_scores(pruned_raw) if isinstance(pruned_raw, Mapping) else {}
    dense = zero_shot_scores(dense_raw) if isinstance(dense_raw, Mapping) else {}
    if not pruned:
        return []
    header = ("task", "metric", "pruned (this model)", *(["dense (before pruning)"] if dense else []))
    rows = []
    for task, scores in pruned.items():
        for metric in scores:
            dense_cell = [_score(dense.get(task, {}), metric)] if dense else []
            rows.append((task, metric, _score(scores, metric), *dense_cell))
    accuracy = [task for task, scores in pruned.items() if "acc" in scores]
    if len(accuracy) > 1:
        mean = sum(pruned[task]["acc"][0] for task in accuracy) / len(accuracy)
        dense_mean = []
        if dense:
            both = all("acc" in dense.get(task, {}) for task in accuracy)
            dense_mean = [f"{sum(dense[task]['acc'][0] for task in accuracy) / len(accuracy):.4f}" if both else ""]
        rows.append((f"mean of {len(accuracy)} tasks", "acc", f"{mean:.4f}", *dense_mean))
    return [
        "## Zero-shot accuracy",
        "",
        "lm-evaluation-harness, 0-shot (higher is better; ± is the standard error).",
        "",
        *table(header, rows),
    ]


def config_call(config: SparsityConfig) -> str:
    """`SparsityConfig(...)` with the method, the sparsity (unless an N:M pattern implies it) and every
    setting that differs from its default: Python that rebuilds `config`."""
    defaults: dict[str, Any] = {}
    for item in dataclasses.fields(SparsityConfig):
        has_factory = item.default_factory is not dataclasses.MISSING
        defaults[item.name] = item.default_factory() if has_factory else item.default
    arguments = [f"method={config.method!r}"]
    for key, value in config.to_dict().items():
        if key == "method" or (key == "sparsity" and config.nm):
            continue
        option = find_option(key) if key not in defaults else None
        default = defaults[key] if key in defaults else getattr(option, "default", None)
        if key == "sparsity" or value != json.loads(json.dumps(default)):
            arguments.append(f"{key}={value!r}")
    return f"SparsityConfig({', '.join(arguments)})"


def provenance_section(config: SparsityConfig, command: str | None, fine_tuned: bool) -> list[str]:
    """How the model was made: the exact command line, or the Python API with its `SparsityConfig`."""
    lines = ["## How it was made", ""]
    if command:
        lines += ["The command that made this model:", "", "```bash", command, "```"]
    else:
        lines += [
            f"Made with the optimum-sparse Python API ({__version__}), with this `SparsityConfig`:",
            "",
            "```python",
            "from optimum_sparse import SparsityConfig",
            "",
            f"config = {config_call(config)}",
            "```",
        ]
    if learned_in_training(config):
        trainer = "in a transformers `Trainer` run (`callbacks=[SparsityCallback(config)]`)"
        lines += ["", f"The masks were learned on the training loss {trainer}."]
    if fine_tuned:
        lines += ["", "Then fine-tuned in a transformers `Trainer` run, the zeros kept by `SparseFineTuneCallback`."]
    lines += ["", f"The whole record (config, per-layer sparsity, metrics) is in `{CONFIG_NAME}`."]
    return lines


def loading_sections(causal: bool, class_name: str, compact: bool) -> list[str]:
    """How to load the checkpoint (plain transformers when it can) and fine-tune it keeping the zeros."""
    auto = "AutoModelForCausalLM" if causal else class_name
    if compact:
        plain = (
            "This checkpoint uses the compact format (kept values + bitmasks): plain `transformers` cannot read "
            "it. Load it with `SparseModel` below; `sparse.model` is then a regular transformers model, and "
            "`sparse.save_pretrained(dir)` writes a plain checkpoint."
        )
    else:
        plain = (
            "A standard transformers checkpoint (safetensors, zeros where pruned):\n\n"
            f"```python\nfrom transformers import {auto}\n\n"
            f'model = {auto}.from_pretrained("<this repo or directory>")\n```'
        )
    return [
        "## Loading",
        "",
        plain,
        "",
        "With its masks and pruning config (`pip install optimum-sparse`):",
        "",
        "```python",
        "from optimum_sparse import SparseModel",
        "",
        'sparse = SparseModel.from_pretrained("<this repo or directory>")',
        "sparse.masks              # {module name: bool mask (out, in)}",
        "sparse.sparsity_config    # how it was pruned",
        "```",
        "",
        "## Fine-tuning without losing the zeros",
        "",
        "```python",
        "from optimum_sparse import SparseFineTuneCallback",
        "",
        "trainer = Trainer(model=sparse.model, args=args, train_dataset=data,",
        "                  callbacks=[SparseFineTuneCallback(sparse)])",
        "```",
        "",
        "LoRA adapters train as usual on `sparse.model`; `optimum_sparse.merge_and_mask(peft_model, sparse.masks)` "
        "merges them and keeps exactly these zeros.",
    ]


def files_section(compact: bool) -> list[str]:
    """The files beside transformers' own."""
    lines = [
        "## Files",
        "",
        f"- `{MASKS_NAME}`: one bit-packed mask per pruned weight (checkpoint format version {FORMAT_VERSION})",
        f"- `{CONFIG_NAME}`: the pruning config, measured per-layer sparsity, metrics, library version",
    ]
    if compact:
        lines.append(f"- `{COMPACT_WEIGHTS_NAME}`: dense tensors, and the kept values of each pruned weight")
    return lines
