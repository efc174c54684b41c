"""The model card (README.md) that `SparseModel.save_pretrained` writes beside a pruned checkpoint.

A checkpoint pushed to the Hub is read by people who did not prune it: the card says what was done
(method, sparsity measured on the saved weights, calibration, metrics) and how to load and fine-tune it
without losing the zeros. It is built from plain values, so it needs no model and no SparseModel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from optimum_sparse.checkpoint import COMPACT_WEIGHTS_NAME, MASKS_NAME
from optimum_sparse.config import CONFIG_NAME, FORMAT_VERSION, SparsityConfig
from optimum_sparse.loading import is_hub_id

MODEL_CARD_NAME = "README.md"


def describe_calibration(calibration: Any, config: SparsityConfig) -> str:
    """One line on the calibration data `prune` used (for the card and sparsity_config.json).

    A method that reads no data says so, rather than naming data that played no part.
    """
    from optimum_sparse.solvers import get_solver_class

    if not get_solver_class(config.method).requires_calibration and config.weight_update is None:
        return f"none ({config.method} needs no data)"
    if calibration is None:
        source = "text sampled from the model itself"
    elif isinstance(calibration, (str, os.PathLike)):
        source = os.fspath(calibration)
    elif isinstance(calibration, torch.Tensor):
        source = f"token ids {list(calibration.shape)}"
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], str):
        source = f"{len(calibration)} texts"
    else:
        source = type(calibration).__name__
    return f"{source}; {config.num_samples} windows x {config.seq_len} tokens, seed {config.seed}"


def _loading_sections(causal: bool, class_name: str, compact: bool) -> list[str]:
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


def model_card_tags(config: SparsityConfig) -> list[str]:
    """The Hub tags of a model pruned with `config` (the card's front matter; also given to a Trainer's card)."""
    pattern = f"{config.pattern}-sparsity" if config.pattern else "unstructured-sparsity"
    return ["optimum-sparse", "sparse", "pruned", config.method, pattern]


def _how_pruned(config: SparsityConfig) -> str:
    if config.method == "pg" and getattr(config, "pg_objective", None) == "lm":
        return "Masks learned on the training loss in a transformers Trainer run (optimum-sparse, `SparsityCallback`)"
    return f"Pruned one-shot, block by block, with optimum-sparse (`{config.method}`)"


def build_model_card(
    config: SparsityConfig,
    *,
    class_name: str,
    pruned_layers: int,
    measured_sparsity: float,
    base_model_id: str | None = None,
    calibration: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    compact: bool = False,
) -> str:
    """README.md text: YAML front matter, what was done, how to load it, the files.

    Args:
        config: the `SparsityConfig` the model was pruned with.
        class_name: the transformers class of the pruned model (e.g. "LlamaForCausalLM").
        pruned_layers: how many linear layers carry a mask.
        measured_sparsity: fraction of zeros over those layers' weights.
        base_model_id: the model that was pruned; a Hub id becomes the card's `base_model` and a link.
        calibration: how the calibration data were chosen (see `describe_calibration`).
        metrics: measured results, e.g. {"perplexity": 31.5}, one table row each.
        compact: whether the checkpoint is compact (kept values + bitmasks) rather than dense.
    """
    from huggingface_hub import ModelCardData

    base = base_model_id if is_hub_id(base_model_id) else None
    causal = class_name.endswith(("ForCausalLM", "LMHeadModel"))
    data = ModelCardData(
        library_name="transformers",
        base_model=base,
        tags=model_card_tags(config),
        pipeline_tag="text-generation" if causal else None,
    )
    amount = f"{config.pattern} ({config.sparsity:.0%})" if config.pattern else f"{config.sparsity:.0%}"
    method = config.method + (f" + {config.weight_update} weight update" if config.weight_update else "")
    rows = [
        ("method", method),
        ("target sparsity", amount),
        ("measured sparsity", f"{measured_sparsity:.2%} of the weights of {pruned_layers} pruned linear layers"),
        ("calibration", calibration or "not recorded"),
        ("checkpoint format", "compact (kept values + bitmasks)" if compact else "dense (zeros where pruned)"),
    ]
    if base_model_id:
        rows.insert(0, ("base model", f"[{base}](https://huggingface.co/{base})" if base else base_model_id))
    for key, value in (metrics or {}).items():
        rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    subject = f"`{base}`" if base else f"a {class_name}"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {base or class_name}: {config.describe()} with optimum-sparse",
        "",
        f"A pruned copy of {subject}: {measured_sparsity:.1%} of the weights of its {pruned_layers} pruned linear "
        f"layers are zero. {_how_pruned(config)}; embeddings and `lm_head` stay dense.",
        "",
        "| | |",
        "|---|---|",
        table,
        "",
        *_loading_sections(causal, class_name, compact),
        "",
        "## Files",
        "",
        f"- `{MASKS_NAME}`: one bit-packed mask per pruned weight (checkpoint format version {FORMAT_VERSION})",
        f"- `{CONFIG_NAME}`: the pruning config, measured per-layer sparsity, metrics, library version",
    ]
    if compact:
        lines.append(f"- `{COMPACT_WEIGHTS_NAME}`: dense tensors, and the kept values of each pruned weight")
    return "\n".join(lines) + "\n"
