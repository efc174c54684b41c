"""Turning a channel-masked model into a smaller dense model.

Removed MLP channels and attention KV groups are sliced out of the projection layers, which are
replaced by smaller `nn.Linear` (or transformers `Conv1D`) modules; attention modules get their head
counts updated where they keep them (`num_heads`, `num_key_value_heads`, GPT-2's `split_size`) and
MLP modules their `intermediate_size`. The sliced model computes the same function as the masked one
(e.g. under `pg.submodels.masking.ChannelMasker`), with fewer parameters and FLOPs. The shared
`model.config` is left alone because layers may now differ in width; `sliced_checkpoint` records the
kept widths so that such a model can be saved and reloaded. Mask learning slices its sampled
sub-models with the same functions (`pg.submodels.instances`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from optimum_sparse.architecture import is_transposed
from optimum_sparse.structured.units import ChannelGroup, UnitSlice

logger = logging.getLogger(__name__)


@torch.no_grad()
def slice_layer(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A copy of `layer` keeping output features `rows` and input features `cols` (None keeps all)."""
    weight = layer.weight.t() if is_transposed(layer) else layer.weight  # (out, in)
    bias = getattr(layer, "bias", None)
    if rows is not None:
        rows = rows.to(weight.device)
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    out_features, in_features = weight.shape
    if is_transposed(layer):
        new = type(layer)(out_features, in_features)  # Conv1D(nf=out, nx=in), weight stored (in, out)
        new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=layer.weight.requires_grad)
        if bias is not None:
            new.bias = nn.Parameter(bias.clone(), requires_grad=layer.bias.requires_grad)
        return new
    new = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if bias is not None:
        new.bias.copy_(bias)
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new


def slice_units(unit_slice: UnitSlice, kept: torch.Tensor, layer: nn.Module | None = None) -> nn.Module:
    """A copy of `layer` (default: the slice's current layer) keeping the features of units `kept`."""
    features = unit_slice.indices(kept)
    layer = unit_slice.layer if layer is None else layer
    return slice_layer(layer, rows=features) if unit_slice.side == "out" else slice_layer(layer, cols=features)


def group_attributes(group: ChannelGroup, kept_units: int) -> dict[str, int]:
    """The size attributes the group's module must carry once `kept_units` units remain (those it has)."""
    module = group.module
    if group.kind == "mlp":
        values = {"intermediate_size": kept_units}
    else:
        heads = kept_units * group.heads_per_unit
        values = {"num_heads": heads, "num_key_value_heads": kept_units}
        if group.extra.get("fused_qkv"):
            values["split_size"] = heads * group.extra["head_dim"]
    return {name: value for name, value in values.items() if hasattr(module, name)}


def set_attributes(group: ChannelGroup, values: dict[str, int]) -> None:
    for name, value in values.items():
        setattr(group.module, name, value)


@torch.no_grad()
def slice_channels(groups: Sequence[ChannelGroup], keep: torch.Tensor) -> dict[str, int]:
    """Slice every group down to its kept units (`keep`: flat bool over all units); returns kept counts.

    The model must not carry masking hooks on the layers being replaced (remove the masker first).
    An attention module must keep at least one KV group (a zero-head attention has no valid shape).
    """
    keep = keep.reshape(-1).bool().cpu()
    kept_counts: dict[str, int] = {}
    for group in groups:
        kept = torch.nonzero(keep[group.units]).reshape(-1)
        if group.kind == "attention" and kept.numel() == 0:
            raise ValueError(f"{group.name}: every KV group is pruned; keep at least one per attention module")
        for unit_slice in group.slices:
            setattr(unit_slice.owner, unit_slice.attr, slice_units(unit_slice, kept))
        set_attributes(group, group_attributes(group, kept.numel()))
        kept_counts[group.name] = int(kept.numel())
    logger.info("sliced %d channel groups: %s", len(kept_counts), kept_counts)
    return kept_counts
