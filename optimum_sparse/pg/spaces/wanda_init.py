"""Initial keep-probabilities from the Wanda metric (Sun et al. 2023, arXiv 2306.11695).

One calibration pass through the dense model collects ||X_j||_2 for the inputs of every layer the
mask space touches. The metric of a weight is |W_ij| * ||X_j||; the metric of a channel unit is the
sum of its weights' metrics over the rows it owns in the input projections and the columns it owns
in the output projection. Each space turns the metric into scores on its budget
(`MaskSpace.init_from_metric`: sigmoid of the z-scored metric shifted to the budget, or pattern logits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from optimum_sparse.architecture import get_weight
from optimum_sparse.pg.spaces.channel_space import ChannelSpace
from optimum_sparse.pg.spaces.space import MaskSpace
from optimum_sparse.solvers.base import LayerStatistics


def layers_of(space: MaskSpace) -> dict[str, nn.Module]:
    """{full name: layer} of every linear whose weights the space's units cover."""
    if isinstance(space, ChannelSpace):
        return {f"{g.name}.{s.attr}": s.layer for g in space.groups for s in g.slices}
    return dict(space.layout.modules)


@torch.no_grad()
def input_norms(
    layers: dict[str, nn.Module], run: Callable[[dict], object], batches: Iterable[dict]
) -> dict[str, torch.Tensor]:
    """||X_j||_2 over all calibration tokens for the inputs of each layer (`run(batch)` runs the dense model)."""
    stats = {name: LayerStatistics(get_weight(layer).shape[1], with_hessian=False) for name, layer in layers.items()}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            stats[name].update(args[0])

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        seen = 0
        for batch in batches:
            run(batch)
            seen += 1
        if not seen:
            raise ValueError("Wanda initialisation needs at least one calibration batch")
    finally:
        for handle in handles:
            handle.remove()
    return {name: s.norms for name, s in stats.items()}


def wanda_metric(space: MaskSpace, norms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-unit metric in the space's flat unit order (per weight, or per channel unit)."""
    layers = layers_of(space)
    scores = {
        name: get_weight(layer).detach().float().abs() * norms[name].to(layer.weight.device)
        for name, layer in layers.items()
    }
    if not isinstance(space, ChannelSpace):
        return torch.cat([scores[name].reshape(-1).cpu() for name in space.layout.shapes])
    metric = torch.zeros(space.num_units, dtype=torch.float64)
    for group in space.groups:
        for unit_slice in group.slices:
            score = scores[f"{group.name}.{unit_slice.attr}"]
            per_feature = score.sum(1) if unit_slice.side == "out" else score.sum(0)  # rows or columns
            units = torch.arange(group.num_units)
            owned = unit_slice.indices(units).reshape(len(unit_slice.offsets), group.num_units, unit_slice.width)
            metric[group.units] += per_feature.double().cpu()[owned].sum(dim=(0, 2))
    return metric
