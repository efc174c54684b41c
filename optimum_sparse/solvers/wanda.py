"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2023, arXiv 2306.11695).

Score |W_ij| * ||X_j||_2: a weight matters as much as it multiplies a large input. Scores are
compared within each output row (the paper's finding: per-output comparison beats per-layer for
LLMs) or within each N:M group. No weight update.
"""

from __future__ import annotations

import torch

from optimum_sparse.masks import select_mask
from optimum_sparse.registry import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver


def wanda_scores(weight: torch.Tensor, stats: LayerStatistics) -> torch.Tensor:
    return weight.abs() * stats.norms.to(weight.device).unsqueeze(0)


@register_solver("wanda")
class WandaSolver(Solver):
    default_scope = "row"

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        assert stats is not None, "wanda needs calibration statistics"
        mask = select_mask(wanda_scores(weight, stats), self.config.sparsity, self.config.nm, self.scope)
        return LayerResult(weight * mask, mask)
