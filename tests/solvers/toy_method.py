"""A toy pruning method, added the way docs/adding_a_method.md shows: one file, registered by name.

Wanda's score with the input norms raised to a power, |W_ij| * ||X_j||^p (p = `toy_power`; p = 1 is
Wanda, p = 0 magnitude per row). Importing this module is all it takes for `SparsityConfig`,
`prune()`, the CLI and the contract tests to know it.
"""

from __future__ import annotations

import torch

from optimum_sparse.masks import select_mask
from optimum_sparse.options import Option, finite_positive
from optimum_sparse.registry import register_solver
from optimum_sparse.solvers import LayerResult, LayerStatistics, Solver


@register_solver("toy")
class ToySolver(Solver):
    """Keeps the weights of largest |W| * ||X||^p within each output row (or N:M group)."""

    default_scope = "row"
    options = (Option("toy_power", 1.0, "exponent p of the input norms in the score |W| * ||X||^p", finite_positive()),)

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        scores = weight.abs() * stats.norms.to(weight.device).pow(self.config.toy_power).unsqueeze(0)
        mask = select_mask(scores, self.config.sparsity, self.config.nm, self.scope)
        return LayerResult(weight * mask, mask)
