"""What a mask space is: scores, how masks are sampled from them, and how a mask is put in the model.

A `MaskSpace` ties one mask distribution (`distributions.py`) to one way of instantiating sub-models
(`masking.py`) and one budget. The learner (`learner.py`) only talks to this interface, so the
sparsity pattern ("channels", "unstructured", "N:M") is a choice of space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from optimum_sparse.pg.estimator import MaskFamily


class MaskSpace(ABC):
    """Scores (keep-probabilities or pattern logits) of all units of a model, and their masks."""

    family: MaskFamily
    #: units of structured spaces are reported to the user under this name
    unit_name: str = "weights"

    @abstractmethod
    def initial_scores(self) -> torch.Tensor:
        """Uniform scores on the budget (before any importance-based initialisation)."""

    def sample(self, scores: torch.Tensor, num_samples: int, generator: torch.Generator | None = None):
        """`num_samples` masks from p_scores, stacked along the first dimension."""
        return self.family.sample(scores, num_samples, generator=generator)

    def log_prob(self, scores: torch.Tensor, samples: torch.Tensor, per_unit: bool = False) -> torch.Tensor:
        """log p of each sample (shape (num_samples,)), or of each unit of each sample (`per_unit`)."""
        if per_unit:
            return self.family.log_prob_units(scores, samples)
        return self.family.log_prob(scores, samples)

    def group_means(self, values: torch.Tensor) -> torch.Tensor:
        """Each unit's value replaced by the mean over its layer group (for `layer_sharing`)."""
        raise NotImplementedError(f"{type(self).__name__} has no layer groups to share gradients in")

    @abstractmethod
    def activate(self, sample: torch.Tensor) -> None:
        """Make the model compute the sub-model of one sample (one row of `sample(...)`)."""

    @abstractmethod
    def deactivate(self) -> None:
        """Back to the dense model."""

    def instantiation_stats(self) -> dict[str, float]:
        """Counters of the sub-model instantiations that are worth logging (none by default)."""
        return {}

    def project(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores moved back onto the feasible set after an optimizer step (identity by default)."""
        return scores

    @abstractmethod
    def harden(self, scores: torch.Tensor) -> torch.Tensor:
        """The deterministic final mask, in the same layout as one sample."""

    @abstractmethod
    def expected_sparsity(self, scores: torch.Tensor) -> float:
        """Expected fraction of the space's parameters removed under p_scores."""

    @abstractmethod
    def sparsity_of(self, sample: torch.Tensor) -> float:
        """Fraction of the space's parameters removed by one mask."""

    @abstractmethod
    def weight_masks(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """{module name: (out, in) bool keep-mask} of one mask, in the library's convention."""

    @abstractmethod
    def finalize(self, hard: torch.Tensor) -> dict[str, torch.Tensor]:
        """Write the hard mask into the model permanently (zeros), detach, return the weight masks."""

    @abstractmethod
    def init_from_metric(self, metric: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Scores from a per-unit importance metric (higher = keep), on the budget.

        `temperature` < 1 sharpens the distribution around the metric's hard mask (fewer uncertain
        units, so sampled sub-models stay close to it); > 1 flattens it."""
