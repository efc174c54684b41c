"""The model card's YAML front matter (`huggingface_hub.ModelCardData`): what the Hub reads from it.

The Hub builds its model tree, filters and evaluation widgets from these fields, so they follow its
vocabulary: `base_model` must be a Hub model id (the Hub rejects anything else, hence no local paths),
`base_model_relation` one of "adapter", "merge", "quantized", "finetune", `library_name` the library
whose loading snippet the Hub shows, and `model-index` the results in the Papers-with-Code layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from optimum_sparse.calibration import looks_like_path, parse_dataset_spec
from optimum_sparse.config import SparsityConfig

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData

#: keys of `SparseModel.metrics` that the card reads as such (the others become rows of its summary table)
PERPLEXITY = "perplexity"
PERPLEXITY_DENSE = "perplexity_dense"
EVAL_DATA = "eval_data"
EVAL_SEQ_LEN = "eval_seq_len"
EVAL_MAX_WINDOWS = "eval_max_windows"
ZERO_SHOT = "zero_shot"
ZERO_SHOT_DENSE = "zero_shot_dense"
#: `library_name` of compact checkpoints: the library whose loader reads them
COMPACT_LIBRARY = "optimum-sparse"
EVALUATION_KEYS = (PERPLEXITY, PERPLEXITY_DENSE, EVAL_DATA, EVAL_SEQ_LEN, EVAL_MAX_WINDOWS, ZERO_SHOT, ZERO_SHOT_DENSE)

#: one-shot pruning compresses the same model, as quantization does: the Hub lists it among the base
#: model's quantizations, not among models trained from it
ONE_SHOT_RELATION = "quantized"
#: weights or masks trained on a loss (a Trainer run): a fine-tune of the base model
TRAINED_RELATION = "finetune"


def model_card_tags(config: SparsityConfig) -> list[str]:
    """The Hub tags of a model pruned with `config` (the card's front matter; also given to a Trainer's card)."""
    pattern = f"{config.pattern}-sparsity" if config.pattern else "unstructured-sparsity"
    tags = ["optimum-sparse", "sparse", "pruned", config.method, pattern]
    if config.weight_update and config.weight_update not in tags:
        tags.append(config.weight_update)
    return tags


def learned_in_training(config: SparsityConfig) -> bool:
    """Whether `config` learns its masks on the training loss in a Trainer run (`SparsityCallback`)."""
    return config.method == "pg" and getattr(config, "pg_objective", None) == "lm"


def base_model_relation(config: SparsityConfig, fine_tuned: bool = False) -> str:
    """The Hub relation to the base model: "finetune" when trained on a loss, "quantized" for one-shot pruning.

    One-shot methods (magnitude, Wanda, SparseGPT, ADMM, block-wise mask learning) read a little
    calibration data and change no weight by training on a loss: the result is a compressed copy of
    the base model, which is what the Hub's "quantized" relation stands for. Learning the masks on the
    training loss, or fine-tuning the pruned weights, trains the model: "finetune".
    """
    return TRAINED_RELATION if fine_tuned or learned_in_training(config) else ONE_SHOT_RELATION


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def zero_shot_scores(results: Mapping[str, Any]) -> dict[str, dict[str, tuple[float, float | None]]]:
    """{task: {metric: (value, standard error or None)}} of an lm-eval style results dict.

    Metric names lose lm-eval's filter suffix ("acc,none" -> "acc"); "<metric>_stderr" entries become
    the error of their metric, and what is not a number (an alias, "N/A") is left out.
    """
    scores: dict[str, dict[str, tuple[float, float | None]]] = {}
    for task, values in results.items():
        if not isinstance(values, Mapping):
            continue
        plain = {str(key).split(",")[0]: value for key, value in values.items()}
        metrics = {}
        for key, value in plain.items():
            number = _number(value)
            if number is not None and not key.endswith("_stderr"):
                metrics[key] = (number, _number(plain.get(f"{key}_stderr")))
        if metrics:
            scores[str(task)] = metrics
    return scores


def _perplexity_result(metrics: Mapping[str, Any]) -> EvalResult | None:
    """The perplexity as a model-index result, when measured on a named Hub dataset (a local file's result
    cannot be compared by anyone else, so it stays in the card's text)."""
    from huggingface_hub import EvalResult

    value, data = _number(metrics.get(PERPLEXITY)), metrics.get(EVAL_DATA)
    if value is None or not math.isfinite(value) or not isinstance(data, str) or looks_like_path(data):
        return None
    name, config, split = parse_dataset_spec(data, "test")
    args = {key: metrics[key] for key in (EVAL_SEQ_LEN, EVAL_MAX_WINDOWS) if metrics.get(key) is not None}
    return EvalResult(
        task_type="text-generation",
        dataset_type=name,
        dataset_name=name,
        dataset_config=config,
        dataset_split=split,
        dataset_args={key.removeprefix("eval_"): value for key, value in args.items()} or None,
        metric_type="perplexity",
        metric_value=value,
    )


def eval_results(metrics: Mapping[str, Any]) -> list[EvalResult]:
    """The pruned model's own results as `huggingface_hub.EvalResult`s: perplexity on a Hub dataset, and
    each zero-shot task's metrics (lm-eval task names as dataset names). Dense baselines stay in the text."""
    from huggingface_hub import EvalResult

    results = [result for result in [_perplexity_result(metrics)] if result is not None]
    zero_shot = metrics.get(ZERO_SHOT)
    for task, scores in zero_shot_scores(zero_shot if isinstance(zero_shot, Mapping) else {}).items():
        for metric, (value, _) in scores.items():
            if not math.isfinite(value):  # YAML's .nan / .inf are no result the Hub can show
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="zero-shot (lm-evaluation-harness)",
                    dataset_type=task,
                    dataset_name=task,
                    dataset_args={"num_fewshot": 0},
                    metric_type=metric,
                    metric_name=f"{metric} (0-shot)",
                    metric_value=value,
                )
            )
    return results


def model_card_data(
    config: SparsityConfig,
    *,
    base_model: str | None,
    causal: bool,
    fine_tuned: bool,
    metrics: Mapping[str, Any],
    model_name: str,
    compact: bool = False,
) -> ModelCardData:
    """The card's `huggingface_hub.ModelCardData`.

    Args:
        base_model: the Hub id the model was pruned from, or None when unknown or local (then the card
            states no relation either: a relation needs a base).
        causal: a causal LM (the Hub's "text-generation" task).
        fine_tuned: trained after pruning (see `base_model_relation`).
        metrics: `SparseModel.metrics`; perplexity and zero-shot results go into `model-index`.
        model_name: the name `model-index` gives the model.
        compact: a compact checkpoint (kept values + bitmasks), which plain transformers cannot read: the
            Hub's loading snippet must then be this library's.
    """
    from huggingface_hub import ModelCardData

    results = eval_results(metrics)
    extra = {"base_model_relation": base_model_relation(config, fine_tuned)} if base_model else {}
    return ModelCardData(
        base_model=base_model,
        library_name=COMPACT_LIBRARY if compact else "transformers",
        pipeline_tag="text-generation" if causal else None,
        tags=model_card_tags(config),
        model_name=model_name if results else None,
        eval_results=results or None,
        **extra,
    )
