"""Magnitude pruning: keep the largest |W|. The baseline every other method must beat."""

from __future__ import annotations

import torch

from optimum_sparse.masks import select_mask
from optimum_sparse.solvers import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver


@register_solver("magnitude")
class MagnitudeSolver(Solver):
    """Keeps the weights of largest absolute value, per layer by default (or per row / N:M group)."""

    requires_calibration = False
    default_scope = "layer"

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        config = self.config
        mask = select_mask(weight.abs(), config.sparsity, config.nm, self.scope, config.prune_ties)
        return LayerResult(weight * mask, mask)
