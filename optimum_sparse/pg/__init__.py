"""Mask learning by policy gradients on stale sub-models (ICLR 2025 submission 5866): see docs/mask_learning.md.

distributions (Bernoulli / N:M categorical masks), estimator (score-function gradient, importance
weights, surrogate loss), projection (budget), units / masking / slicing / instances (channel
sub-models), spaces (channels, unstructured, N:M), wanda_init, learner, wiring (Trainer integration),
distributed (several processes), checkpointing (resume), sliced_checkpoint (save / reload a sliced
model), callback.
"""

from optimum_sparse.pg.callback import SparsityCallback, build_space
from optimum_sparse.pg.distributions import BernoulliMasks, NMCategorical
from optimum_sparse.pg.estimator import ScoreFunctionEstimator, importance_weights, surrogate_loss
from optimum_sparse.pg.projection import harden_to_budget, project_to_budget, sigmoid_to_budget
from optimum_sparse.structured.sliced_checkpoint import load_sliced_model, save_sliced_model, slice_pruned_channels
from optimum_sparse.structured.slicing import slice_channels
from optimum_sparse.structured.units import find_channel_groups

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
