"""Physically smaller channel models: MLP channels and attention KV groups removed, not masked.

units (which rows / columns of which projections make one unit, and what a unit costs), unit_masks
(per-layer keep-masks <-> flat unit keep-vector), slicing (layers cut down to the kept units),
sliced_checkpoint (save / reload a model whose layers differ in width, slice a model pruned with
pattern "channels").

Kept apart from `optimum_sparse.pg` because nothing here learns anything: a channel mask from any
source (`prune()`, mask learning, a file) can be sliced and saved. It builds on the core modules only
(architecture, checkpoint, ...), never on `pg`, so loading and the CLI can use it without importing
mask learning.
"""

from optimum_sparse.structured.sliced_checkpoint import (
    is_sliced_checkpoint,
    load_sliced_model,
    record_sliced_units,
    save_sliced_model,
    slice_pruned_channels,
)
from optimum_sparse.structured.slicing import slice_channels
from optimum_sparse.structured.unit_masks import channel_keep_from_masks, unit_weight_masks
from optimum_sparse.structured.units import ChannelGroup, UnitSlice, find_channel_groups, unit_costs

__all__ = [
    "ChannelGroup",
    "UnitSlice",
    "channel_keep_from_masks",
    "find_channel_groups",
    "is_sliced_checkpoint",
    "load_sliced_model",
    "record_sliced_units",
    "save_sliced_model",
    "slice_channels",
    "slice_pruned_channels",
    "unit_costs",
    "unit_weight_masks",
]
