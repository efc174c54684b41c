"""Sampled channel sub-models instantiated as physically smaller layers, built once and reused while stale.

Policy gradients on stale sub-models (see `optimum_sparse.pg`) reuse a sampled sub-model for
`refresh_every` steps; that reuse pays off when instantiating a sub-model costs something. Here a
channel mask is turned once into sliced copies of the projection layers
(`optimum_sparse.structured.slicing.slice_units`: the kept rows of q/k/v, gate/up, fc1, c_attn, c_fc
and the kept columns of o_proj, down, fc2, c_proj), and activating the sample swaps those copies into the model (a few `setattr`s), so every forward on
it runs the smaller matmuls. Deactivating swaps the dense layers back; the copies stay cached (the
most recent `capacity` masks, keyed by `masking.sample_digest`), so re-activating a stale sample after an
evaluation or a checkpoint save does not rebuild it.

A group whose every unit is dropped cannot be sliced to width 0 (an attention module without heads
has no valid shape); it keeps its first unit with the output projection's columns zeroed, which
computes exactly what the masked model computes (the output projection's bias, or zero).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from optimum_sparse.pg.submodels.masking import sample_digest
from optimum_sparse.structured.slicing import group_attributes, set_attributes, slice_units
from optimum_sparse.structured.units import ChannelGroup

logger = logging.getLogger(__name__)


@dataclass
class SubModel:
    """The sliced layers (per group, per unit slice) and size attributes (per group) of one channel mask."""

    layers: list[list[nn.Module]]
    attributes: list[dict[str, int]]


class SlicedSubModels:
    """Builds, caches and swaps in sliced sub-models of the channel `groups` of one model.

    Args:
        groups: the model's channel groups (`structured.units.find_channel_groups`), dense when this is created.
        capacity: how many sub-models stay cached (samples per step, plus one for the hard mask).

    `instantiations` counts the sub-models built and `seconds` the time spent building them.
    """

    def __init__(self, groups: Sequence[ChannelGroup], capacity: int = 2):
        self.groups = list(groups)
        self.capacity = max(1, int(capacity))
        self.dense_layers = [[s.layer for s in g.slices] for g in self.groups]
        self.dense_attributes = [
            {name: getattr(g.module, name) for name in group_attributes(g, g.num_units)} for g in self.groups
        ]
        self.cache: OrderedDict[bytes, SubModel] = OrderedDict()
        self.active: SubModel | None = None
        self.instantiations = 0
        self.seconds = 0.0

    @torch.no_grad()
    def build(self, keep: torch.Tensor) -> SubModel:
        """Slice the dense layers down to the units of `keep` (flat bool over all units)."""
        layers, attributes = [], []
        for group, dense in zip(self.groups, self.dense_layers):
            kept = torch.nonzero(keep[group.units]).reshape(-1)
            silenced = kept.numel() == 0
            if silenced:
                kept = torch.zeros(1, dtype=torch.long)
            sliced = [slice_units(s, kept, layer) for s, layer in zip(group.slices, dense)]
            if silenced:  # the kept unit contributes nothing: zero what the output projection reads from it
                consumer = next(i for i, s in enumerate(group.slices) if s.side == "in")
                sliced[consumer].weight.zero_()
            layers.append(sliced)
            attributes.append(group_attributes(group, kept.numel()))
        return SubModel(layers, attributes)

    def activate(self, keep: torch.Tensor) -> None:
        """Swap in the sub-model of `keep`, building it first unless it is cached."""
        keep = keep.detach().reshape(-1).bool().cpu()
        key = sample_digest(keep)
        sub_model = self.cache.get(key)
        if sub_model is None:
            start = time.perf_counter()
            sub_model = self.build(keep)
            weight = sub_model.layers[0][0].weight
            if weight.is_cuda:
                torch.cuda.synchronize(weight.device)
            self.seconds += time.perf_counter() - start
            self.instantiations += 1
            self.cache[key] = sub_model
            while len(self.cache) > self.capacity:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        self._swap(sub_model.layers, sub_model.attributes)
        self.active = sub_model

    def deactivate(self) -> None:
        """Put the dense layers back (the cached sub-models are kept)."""
        if self.active is not None:
            self._swap(self.dense_layers, self.dense_attributes)
            self.active = None

    def remove(self) -> None:
        """Dense layers back and the cache dropped."""
        self.deactivate()
        self.cache.clear()

    def _swap(self, layers: list[list[nn.Module]], attributes: list[dict[str, int]]) -> None:
        for group, group_layers, values in zip(self.groups, layers, attributes):
            for unit_slice, layer in zip(group.slices, group_layers):
                setattr(unit_slice.owner, unit_slice.attr, layer)
            set_attributes(group, values)
