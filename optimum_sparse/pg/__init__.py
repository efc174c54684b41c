"""Mask learning by policy gradients on stale sub-models.

The method is that of "Computation and Memory-Efficient Model Compression with Gradient Reweighting"
(NeurIPS 2025, https://openreview.net/forum?id=qILtlupwrR): the keep-probabilities of the mask units
are learned from forward passes only, by a score-function gradient; a sampled sub-model is reused for
several steps and its gradient reweighted by clipped importance ratios. The modules of this package
cite it by pointing here; docs/mask_learning.md describes the settings and measurements.

Subpackages, each importing only the ones listed before it:
- estimation: mask distributions, the score-function estimator, budget projection;
- submodels: instantiating a sampled mask (hooks, masked weights, sliced or 2:4-compressed layers);
- spaces: one mask space per pattern (channels, unstructured, N:M) and the Wanda initialisation;
- learner.py (stale samples, refresh schedule, statistics) and block_objective.py (masks learned block
  by block inside `prune()`), both on top of the spaces;
- trainer: `SparsityCallback` and its Trainer wiring, distributed and checkpointing helpers.
Channel units, slicing and sliced checkpoints are `optimum_sparse.structured`.

The names below are resolved on first use, so that importing any module of this package does not
import transformers' Trainer machinery (only `SparsityCallback` / `build_space` do).
"""

from __future__ import annotations

from optimum_sparse.lazy import lazy_exports

_LAZY = {
    "SparsityCallback": "optimum_sparse.pg.trainer.callback",
    "build_space": "optimum_sparse.pg.trainer.callback",
    "BernoulliMasks": "optimum_sparse.pg.estimation.distributions",
    "NMCategorical": "optimum_sparse.pg.estimation.distributions",
    "ScoreFunctionEstimator": "optimum_sparse.pg.estimation.estimator",
    "importance_weights": "optimum_sparse.pg.estimation.estimator",
    "surrogate_loss": "optimum_sparse.pg.estimation.estimator",
    "harden_to_budget": "optimum_sparse.pg.estimation.projection",
    "project_to_budget": "optimum_sparse.pg.estimation.projection",
    "sigmoid_to_budget": "optimum_sparse.pg.estimation.projection",
    "load_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
    "save_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
    "slice_pruned_channels": "optimum_sparse.structured.sliced_checkpoint",
    "slice_channels": "optimum_sparse.structured.slicing",
    "find_channel_groups": "optimum_sparse.structured.units",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = [
    "BernoulliMasks",
    "NMCategorical",
    "ScoreFunctionEstimator",
    "SparsityCallback",
    "build_space",
    "find_channel_groups",
    "harden_to_budget",
    "importance_weights",
    "load_sliced_model",
    "project_to_budget",
    "save_sliced_model",
    "sigmoid_to_budget",
    "slice_channels",
    "slice_pruned_channels",
    "surrogate_loss",
]
