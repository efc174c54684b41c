"""The model card (README.md) that `SparseModel.save_pretrained` writes beside a pruned checkpoint.

A checkpoint pushed to the Hub is read by people who did not prune it: the card says what was done
(method, sparsity measured on the saved weights, calibration, the command that made it), how it
compares with the dense model, and how to load and fine-tune it without losing the zeros. The front
matter is a `huggingface_hub.ModelCardData` (`card.metadata`: base model and relation, library, tags,
`model-index`); the body's sections are in `card.sections`. It is built from plain values, so it needs no
model and no SparseModel. docs/format.md ("Model card") lists the fields.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from optimum_sparse.card.metadata import base_model_relation, learned_in_training, model_card_data, model_card_tags
from optimum_sparse.card.sections import (
    files_section,
    layer_summary,
    loading_sections,
    other_metrics,
    perplexity_section,
    provenance_section,
    table,
    zero_shot_section,
)
from optimum_sparse.config import SparsityConfig
from optimum_sparse.loading import is_hub_id

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

MODEL_CARD_NAME = "README.md"

__all__ = ["MODEL_CARD_NAME", "base_model_relation", "build_model_card", "describe_calibration", "model_card_tags"]


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


def _how_pruned(config: SparsityConfig, fine_tuned: bool) -> str:
    if learned_in_training(config):
        return "Masks learned on the training loss in a transformers Trainer run (optimum-sparse, `SparsityCallback`)"
    done = f"Pruned one-shot, block by block, with optimum-sparse (`{config.method}`)"
    return done + (", then fine-tuned with its zeros kept" if fine_tuned else "")


def build_model_card(
    config: SparsityConfig,
    *,
    class_name: str,
    pruned_layers: int,
    measured_sparsity: float,
    layer_sparsity: Mapping[str, float] | None = None,
    base_model_id: str | None = None,
    calibration: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    command: str | None = None,
    fine_tuned: bool = False,
    compact: bool = False,
) -> ModelCard:
    """The model card: a `huggingface_hub.ModelCard` (`str(card)` is the README.md text, `card.data` its
    front matter).

    Args:
        config: the `SparsityConfig` the model was pruned with.
        class_name: the transformers class of the pruned model (e.g. "LlamaForCausalLM").
        pruned_layers: how many linear layers carry a mask.
        measured_sparsity: fraction of zeros over those layers' weights.
        layer_sparsity: {module name: fraction of zeros} of the pruned layers, summarised per kind of layer.
        base_model_id: the model that was pruned; a Hub id becomes the card's `base_model` and a link
            (a local path is named in the text only: the Hub accepts only model ids there).
        calibration: how the calibration data were chosen (see `describe_calibration`).
        metrics: measured results: "perplexity" / "perplexity_dense" with "eval_data", "eval_seq_len",
            "eval_max_windows"; "zero_shot" / "zero_shot_dense" as {task: {"acc": ..., "acc_stderr": ...}};
            any other key is one row of the summary table.
        command: the shell command that made the model (`optimum-sparse prune ...`); None for a Python run.
        fine_tuned: the pruned model was trained afterwards (`SparseFineTuneCallback`).
        compact: whether the checkpoint is compact (kept values + bitmasks) rather than dense.
    """
    from huggingface_hub import ModelCard

    metrics = metrics or {}
    base = base_model_id if is_hub_id(base_model_id) else None
    causal = class_name.endswith(("ForCausalLM", "LMHeadModel"))
    title = f"{base or class_name}: {config.describe()} with optimum-sparse"
    data = model_card_data(
        config, base_model=base, causal=causal, fine_tuned=fine_tuned, metrics=metrics, model_name=title, compact=compact
    )
    amount = f"{config.pattern} ({config.sparsity:.0%})" if config.pattern else f"{config.sparsity:.0%}"
    if (budgets := config.block_budgets_phrase()) is not None:
        amount = budgets
    elif config.layer_sparsity is not None:
        amount += f", budgets by module: {json.dumps(config.layer_sparsity)}"
    elif config.sparsity_profile:
        amount += f" on average, {config.sparsity_profile.upper()} budgets per block"
    method = config.method + (f" + {config.weight_update} weight update" if config.weight_update else "")
    rows = [
        ("method", method),
        ("target sparsity", amount),
        ("measured sparsity", f"{measured_sparsity:.2%} of the weights of {pruned_layers} pruned linear layers"),
        ("calibration", calibration or "not recorded"),
        ("checkpoint format", "compact (kept values + bitmasks)" if compact else "dense (zeros where pruned)"),
        *other_metrics(metrics),
    ]
    if base_model_id:
        rows.insert(0, ("base model", f"[{base}](https://huggingface.co/{base})" if base else base_model_id))
    subject = f"`{base}`" if base else f"a {class_name}"
    sections = [
        layer_summary(layer_sparsity, measured_sparsity) if layer_sparsity else [],
        perplexity_section(metrics),
        zero_shot_section(metrics),
        provenance_section(config, command, fine_tuned),
        loading_sections(causal, class_name, compact),
        files_section(compact),
    ]
    lines = [
        f"# {title}",
        "",
        f"A pruned copy of {subject}: {measured_sparsity:.1%} of the weights of its {pruned_layers} pruned linear "
        f"layers are zero. {_how_pruned(config, fine_tuned)}; embeddings and `lm_head` stay dense.",
        "",
        *table(("", ""), rows),
    ]
    for section in sections:
        if section:
            lines += ["", *section]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
