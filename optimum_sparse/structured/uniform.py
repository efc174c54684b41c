"""Standard-shape structured models: every block keeps the same number of MLP channels and KV groups.

A model whose blocks differ in width needs our loader (`load_sliced_model`); one whose blocks all kept
the same widths is an ordinary checkpoint once its config says so: `intermediate_size`,
`num_key_value_heads`, `num_attention_heads` (the query heads follow their KV groups) and an explicit
`head_dim` (it no longer equals hidden_size / num_attention_heads). Plain transformers, vLLM, TGI and
llama.cpp's converters then load it with no code of ours.

How many units each block keeps is fixed before any mask is chosen (`uniform_counts`): every
attention module keeps round((1 - sparsity) x its KV groups), at least one, and every MLP as many
channels as the rest of the parameter budget allows, rounded down to a multiple of `width_multiple`
(32 by default, llama.cpp's block size), so the model removes at least the requested fraction of the
parameters and less than `width_multiple` more MLP channels per block. Learning or the metric then
decides which units each block keeps.
"""

from __future__ import annotations

from torch import nn

from optimum_sparse.structured.units import ChannelGroup, text_config

#: model types whose config describes every block by intermediate_size / head counts / head_dim
STANDARD_SHAPE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")


def check_standard_shape_architecture(model: nn.Module) -> None:
    """A ValueError naming the supported families unless `model`'s config can describe uniform widths."""
    model_type = getattr(text_config(getattr(model, "config", None)), "model_type", None)
    if model_type not in STANDARD_SHAPE_MODEL_TYPES:
        raise ValueError(
            f"uniform_widths writes a standard checkpoint for the model types {list(STANDARD_SHAPE_MODEL_TYPES)}; "
            f"this model is {model_type!r}: prune it without uniform_widths (its sliced model then reloads with "
            "load_sliced_model)"
        )


def _shape_of(groups: list[ChannelGroup], kind: str) -> tuple[int, int, int]:
    """(groups of this kind, units per group, parameters per unit), which must agree across blocks."""
    shapes = {(g.num_units, g.unit_cost) for g in groups if g.kind == kind}
    if len(shapes) != 1:
        raise ValueError(f"uniform widths need blocks of one shape, but the {kind} modules differ: {sorted(shapes)}")
    (units, cost), count = shapes.pop(), sum(g.kind == kind for g in groups)
    return count, units, cost


def uniform_counts(groups: list[ChannelGroup], sparsity: float, width_multiple: int = 1) -> dict[str, int]:
    """{"attention": KV groups, "mlp": channels} that every block keeps at `sparsity` of the parameters.

    The channels are rounded down to a multiple of `width_multiple` when at least one multiple fits:
    llama.cpp quantizes rows in blocks of 32 values (a `down_proj` of 682 inputs stays f16 in a q8_0
    file) and its fast matrix kernels want whole tiles, so a 682-channel MLP ran prompts at 0.9x a
    dense SmolLM2 where 672 channels ran at 1.8x (docs/deploy.md).
    """
    attention, kv_groups, kv_cost = _shape_of(groups, "attention")
    mlps, channels, channel_cost = _shape_of(groups, "mlp")
    budget = (1.0 - sparsity) * (attention * kv_groups * kv_cost + mlps * channels * channel_cost)
    kept_kv = min(kv_groups, max(1, round((1.0 - sparsity) * kv_groups)))
    kept_channels = min(channels, int((budget * (1 + 1e-12) - attention * kept_kv * kv_cost) // (mlps * channel_cost)))
    if kept_channels < 1:
        raise ValueError(f"sparsity {sparsity:g} leaves no MLP channel once each block keeps one KV group")
    if kept_channels >= width_multiple:
        kept_channels -= kept_channels % width_multiple
    return {"attention": kept_kv, "mlp": kept_channels}


def set_standard_shape(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, int]) -> bool:
    """Write the kept widths into `model.config` when every block kept the same ones (and the type allows).

    `kept` is {group name: kept units} after slicing. Returns whether the config now describes the model.
    """
    config = text_config(getattr(model, "config", None))
    if getattr(config, "model_type", None) not in STANDARD_SHAPE_MODEL_TYPES:
        return False
    counts = {kind: {kept.get(g.name, g.num_units) for g in groups if g.kind == kind} for kind in ("attention", "mlp")}
    if any(len(values) != 1 for values in counts.values()):
        return False
    attention = next(g for g in groups if g.kind == "attention")
    kv_groups, channels = counts["attention"].pop(), counts["mlp"].pop()
    config.head_dim = attention.extra["head_dim"]
    config.num_key_value_heads = kv_groups
    config.num_attention_heads = kv_groups * attention.heads_per_unit
    config.intermediate_size = channels
    return True
