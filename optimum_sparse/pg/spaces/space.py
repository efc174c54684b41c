"""What a mask space is: scores, how masks are sampled from them, and how a mask is put in the model.

A `MaskSpace` ties one mask distribution (`pg.estimation.distributions`) to one way of instantiating
sub-models (`pg.submodels`) and one budget. The learner (`pg.learner`) only talks to this interface,
so the sparsity pattern ("channels", "unstructured", "N:M") is a choice of space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from optimum_sparse.pg.estimation.estimator import MaskFamily

#: gap (in logits, before the temperature) between the least preferred kept unit and the most
#: preferred removed one when scores start from a given mask (`init_from_mask`)
MASK_MARGIN = 1.0


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
    def metric_zscores(self, metric: torch.Tensor) -> torch.Tensor:
        """The metric (one value per unit, or per weight for N:M) z-scored within each layer (float64)."""

    @abstractmethod
    def scores_from_zscores(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Scores on the budget from per-unit (per-weight) preferences z: higher = keep."""

    @abstractmethod
    def keep_from_masks(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat keep-vector (the metric's layout) behind {module name: (out, in) keep-mask}."""

    def init_from_metric(self, metric: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Scores from a per-unit importance metric (higher = keep), on the budget.

        `temperature` < 1 sharpens the distribution around the metric's hard mask (fewer uncertain
        units, so sampled sub-models stay close to it); > 1 flattens it."""
        return self.scores_from_zscores(self.metric_zscores(metric), temperature)

    def init_from_mask(
        self, keep: torch.Tensor, metric: torch.Tensor | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """Scores whose hard mask is `keep` (e.g. a mask learned block by block), to refine from there.

        Each unit's preference is its metric z-score (zero without a metric) plus a margin towards
        its side of `keep`, wide enough that every kept unit outranks every removed one: sampled
        sub-models then explore first where the metric doubts the mask (kept units with a low metric,
        removed units with a high one). `temperature` scales the whole as in `init_from_metric`.
        """
        keep = keep.reshape(-1).cpu().bool()
        if metric is None:
            z = torch.zeros(keep.numel(), dtype=torch.float64)
        else:
            z = self.metric_zscores(metric).cpu()
        if z.numel() != keep.numel():
            raise ValueError(f"the mask has {keep.numel()} entries, the space's metric {z.numel()}")
        margin = 0.5 * float(z.max() - z.min()) + MASK_MARGIN
        return self.scores_from_zscores(z + margin * (2.0 * keep.double() - 1.0), temperature)
