"""Registers "pg": masks learned during training by policy gradients on stale sub-models.

Not a layer-wise solver: the masks are learned by `optimum_sparse.pg.SparsityCallback` inside a
`transformers.Trainer` (see docs/mask_learning.md). Registering the name makes
`SparsityConfig(method="pg", ...)` valid everywhere; the one-shot engine refuses it with directions.
"""

from __future__ import annotations

import torch

from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver


@register_solver("pg")
class PolicyGradientSolver(Solver):
    requires_calibration = False

    def __init__(self, config: SparsityConfig):
        raise ValueError(
            "method 'pg' learns masks during training: pass optimum_sparse.pg.SparsityCallback(config) to a "
            "transformers.Trainer instead of calling prune() (see docs/mask_learning.md)"
        )

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:  # pragma: no cover
        raise NotImplementedError
