"""Per-layer weight masks of channel units, and the unit keep-vector behind such masks.

A channel-pruned model is described two ways: a flat keep-vector over its units (what slicing and
the channel mask space work with) and {layer name: (out, in) keep-mask} (what `prune()` returns and
what checkpoints store). These two functions convert between them, so that channel masks from any
source can be sliced into a smaller model (`sliced_checkpoint.slice_pruned_channels`).
"""

from __future__ import annotations

import torch

from optimum_sparse.architecture import get_weight
from optimum_sparse.structured.units import ChannelGroup


def unit_weight_masks(groups: list[ChannelGroup], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """{full layer name: (out, in) bool mask} removing the rows / columns of the units not in `keep`."""
    keep = keep.reshape(-1).cpu().bool()
    masks = {}
    for group in groups:
        kept_units = torch.nonzero(keep[group.units]).reshape(-1)
        for unit_slice in group.slices:
            weight = get_weight(unit_slice.layer)
            features = torch.zeros(weight.shape[0 if unit_slice.side == "out" else 1], dtype=torch.bool)
            features[unit_slice.indices(kept_units)] = True
            mask = features.unsqueeze(1) if unit_slice.side == "out" else features.unsqueeze(0)
            masks[f"{group.name}.{unit_slice.attr}"] = mask.expand(tuple(weight.shape)).clone()
    return masks


def channel_keep_from_masks(groups: list[ChannelGroup], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat unit keep-vector behind per-layer channel masks (what `unit_weight_masks` inverts).

    A unit is kept if its columns of the output projection are; a ValueError when a projection has no
    mask, or when the masks do not remove whole channels / KV groups (per-weight masks)."""
    keep = torch.zeros(sum(group.num_units for group in groups), dtype=torch.bool)
    for group in groups:
        consumer = group.consumer
        name = f"{group.name}.{consumer.attr}"
        if name not in masks:
            raise ValueError(f"no mask for {name}: the masks do not cover every channel projection")
        columns = masks[name].to("cpu", torch.bool).any(0)
        owned = consumer.indices(torch.arange(group.num_units)).reshape(len(consumer.offsets), group.num_units, -1)
        keep[group.units] = columns[owned].all(dim=2).all(dim=0)
    implied = unit_weight_masks(groups, keep)
    wrong = [name for name, mask in implied.items() if name in masks and not torch.equal(masks[name].cpu(), mask)]
    if wrong:
        raise ValueError(
            f"the masks of {wrong[:3]} do not remove whole channels / KV groups (pattern 'channels' needs "
            f"masks of that pattern, e.g. from prune() with pattern='channels')"
        )
    return keep
