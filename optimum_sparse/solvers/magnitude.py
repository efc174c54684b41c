"""Magnitude pruning: keep the largest |W|. The baseline every other method must beat."""

from __future__ import annotations

import torch

from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import select_mask
from optimum_sparse.options import Option, boolean
from optimum_sparse.registry import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver


@register_solver("magnitude")
class MagnitudeSolver(Solver):
    """Keeps the weights of largest absolute value, per layer by default (or per row / N:M group)."""

    requires_calibration = False
    default_scope = "layer"
    options = (
        Option(
            "prune_ties",
            False,
            "(unstructured) prune every weight whose |W| is <= the k-th smallest, k = round(sparsity * n), the "
            "SparseGPT/Wanda repositories' rule, instead of exactly k weights (quantised checkpoints have many "
            "equal |W|, so layers end slightly above the target)",
            boolean(),
        ),
    )

    @classmethod
    def check_settings(cls, config: SparsityConfig) -> None:
        if config.prune_ties and config.nm is not None:
            raise ValueError("prune_ties applies to unstructured sparsity; an N:M pattern keeps exactly N of every M")

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        config = self.config
        mask = select_mask(weight.abs(), config.sparsity, config.nm, self.scope, config.prune_ties)
        return LayerResult(weight * mask, mask)
