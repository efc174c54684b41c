"""Registers "pg": masks learned by policy gradients on stale sub-models.

With `pg_objective="lm"` (the default) masks are learned during training by
`optimum_sparse.pg.SparsityCallback` inside a `transformers.Trainer` (see docs/mask_learning.md); the
one-shot engine refuses it with directions. With `pg_objective="block"` the engine itself learns
per-weight masks block by block against the dense block's output (`optimum_sparse.pg.block_objective`).
"""

from __future__ import annotations

import torch

from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver


@register_solver("pg")
class PolicyGradientSolver(Solver):
    """Block-level solver of pg_objective="block"; its per-layer step only applies the learned mask."""

    requires_calibration = True

    def __init__(self, config: SparsityConfig):
        if config.pg_objective != "block":
            raise ValueError(
                "method 'pg' learns masks during training: pass optimum_sparse.pg.SparsityCallback(config) to a "
                "transformers.Trainer instead of calling prune() (see docs/mask_learning.md), or set "
                "pg_objective='block' to learn per-weight masks block by block in prune()"
            )
        super().__init__(config)
        self.reports: dict[int, object] = {}

    def prune_block(self, context) -> None:
        from optimum_sparse.pg.block_objective import learn_block_masks

        report = learn_block_masks(context, self.config, self)
        self.reports[context.index] = context.result.block_reports[context.index] = report

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        raise ValueError("pg_objective='block' learns the masks of a whole block at once (prune_block)")

    def refit_layer(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        """The learned mask applied to the weights as they are (no weight update of its own)."""
        mask = mask.to(weight.device, torch.bool)
        return LayerResult(weight * mask, mask)
