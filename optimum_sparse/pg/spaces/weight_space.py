"""Per-weight mask spaces: "unstructured" (Bernoulli per weight) and "N:M" (categorical per group).

Units are the weights of the target linears (`find_prunable_layers`), laid out layer after layer in
(out, in) order and flattened. N:M groups are M consecutive input weights of a row, matching
`masks.nm_mask`. Sub-models are instantiated by writing W0 * m into the weights (`WeightMasker`);
2:4 sub-models are compressed into semi-structured sparse weights where torch supports it (CUDA,
`pg.submodels.semi_structured.SemiStructuredMasker`) unless `pg_submodels="masked"`.
"""

from __future__ import annotations

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer, find_prunable_layers, get_weight
from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import num_pruned, topk_mask
from optimum_sparse.pg.estimation.distributions import BernoulliMasks, NMCategorical
from optimum_sparse.pg.estimation.projection import project_to_budget, sigmoid_to_budget, zscore
from optimum_sparse.pg.spaces.space import MaskSpace
from optimum_sparse.pg.submodels.masking import WeightMasker, sample_digest
from optimum_sparse.pg.submodels.semi_structured import SemiStructuredMasker


class _WeightLayout:
    """Names, shapes and flat offsets of the target weights (all of the model's, or the `layers` given)."""

    def __init__(self, model: nn.Module, config: SparsityConfig, layers: list[PrunableLayer] | None = None):
        if layers is None:
            layers = [layer for group in find_prunable_layers(model, config).values() for layer in group]
        self.modules = {layer.name: layer.module for layer in layers}
        self.shapes = {name: tuple(get_weight(module).shape) for name, module in self.modules.items()}
        self.offsets: dict[str, int] = {}
        total = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = total
            total += shape[0] * shape[1]
        self.numel = total

    def zscores(self, metric: torch.Tensor) -> torch.Tensor:
        """A per-weight metric z-scored within each layer (float64, flat)."""
        return torch.cat([zscore(part.double()) for part in self.split(metric.detach().reshape(-1)).values()])

    def flatten_masks(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (out, in) keep-mask} of every target layer, flattened in the layout's order."""
        missing = [name for name in self.shapes if name not in masks]
        if missing:
            raise ValueError(f"no mask for {missing[:3]} ({len(missing)} target layers): pass a mask for every one")
        wrong = [name for name, shape in self.shapes.items() if tuple(masks[name].shape) != shape]
        if wrong:
            name = wrong[0]
            raise ValueError(f"the mask of {name} has shape {tuple(masks[name].shape)}, its weight {self.shapes[name]}")
        return torch.cat([masks[name].reshape(-1).cpu().bool() for name in self.shapes])

    def split(self, flat: torch.Tensor, per_unit: int = 1) -> dict[str, torch.Tensor]:
        """Per-layer (out, in) views of a flat per-weight vector (`per_unit` entries per N:M group)."""
        views = {}
        for name, (rows, cols) in self.shapes.items():
            start = self.offsets[name] // per_unit
            views[name] = flat[start : start + rows * cols // per_unit]
        return views


@torch.no_grad()
def _zero_outside(
    masker: WeightMasker | SemiStructuredMasker, masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Back to the dense weights, then zero them outside `masks` in place (keeps any refit done since)."""
    masker.deactivate()
    masker.remove()
    for name, module in masker.modules.items():
        weight = get_weight(module)
        weight.mul_(masks[name].to(weight.device, weight.dtype))
    return {name: mask.cpu() for name, mask in masks.items()}


class _PerWeightSpace(MaskSpace):
    """What the unstructured and N:M spaces share: masks over the weights of `self.layout`."""

    layout: _WeightLayout

    def finalize(self, hard: torch.Tensor) -> dict[str, torch.Tensor]:
        return _zero_outside(self.masker, self.weight_masks(hard))

    def metric_zscores(self, metric: torch.Tensor) -> torch.Tensor:
        return self.layout.zscores(metric)


class UnstructuredSpace(_PerWeightSpace):
    """One Bernoulli keep-probability per weight; budget: sum(s) = (1 - sparsity) * #weights (global)."""

    family = BernoulliMasks

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        harden_scope: str = "global",
        layers: list[PrunableLayer] | None = None,
    ):
        self.layout = _WeightLayout(model, config, layers)
        self.sparsity = float(config.sparsity)
        self.harden_scope = harden_scope
        self.costs = torch.ones(self.layout.numel, dtype=torch.float64)
        self.budget = (1.0 - self.sparsity) * self.layout.numel
        self.masker = WeightMasker(self.layout.modules)

    def initial_scores(self) -> torch.Tensor:
        return torch.full((self.layout.numel,), 1.0 - self.sparsity)

    def activate(self, sample: torch.Tensor) -> None:
        self.masker.activate(self.weight_masks(sample))

    def deactivate(self) -> None:
        self.masker.deactivate()

    def project(self, scores: torch.Tensor) -> torch.Tensor:
        return project_to_budget(scores, self.costs.to(scores.device), self.budget)

    def harden(self, scores: torch.Tensor) -> torch.Tensor:
        flat = scores.detach().reshape(-1)
        if self.harden_scope == "global":
            keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            kept = flat.numel() - num_pruned(flat.numel(), self.sparsity)
            keep[torch.topk(flat, kept).indices] = True
            return keep
        parts = self.layout.split(flat)
        scope = "row" if self.harden_scope == "row" else "layer"  # "row": the same sparsity in every output row
        masks = [
            topk_mask(parts[name].reshape(shape), self.sparsity, scope) for name, shape in self.layout.shapes.items()
        ]
        return torch.cat([mask.reshape(-1) for mask in masks])

    def expected_sparsity(self, scores: torch.Tensor) -> float:
        return 1.0 - float(scores.detach().double().clamp(0, 1).sum()) / self.layout.numel

    def sparsity_of(self, sample: torch.Tensor) -> float:
        return 1.0 - float(sample.reshape(-1).sum()) / self.layout.numel

    def weight_masks(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.layout.split(sample.reshape(-1).bool())
        return {name: parts[name].reshape(shape) for name, shape in self.layout.shapes.items()}

    def scores_from_zscores(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """sigmoid(z / temperature + tau), tau putting sum(s) on the budget."""
        return sigmoid_to_budget(z / temperature, self.costs.to(z.device), self.budget).float()

    def keep_from_masks(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten_masks(masks)


class NMSpace(_PerWeightSpace):
    """One categorical over the C(M, N) keep-patterns of every group of M consecutive input weights."""

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        layers: list[PrunableLayer] | None = None,
    ):
        assert config.nm is not None, "NMSpace needs an N:M pattern"
        self.n, self.m = config.nm
        self.family = NMCategorical(self.n, self.m)
        self.layout = _WeightLayout(model, config, layers)
        self.num_groups = self.layout.numel // self.m
        self.masker: WeightMasker | SemiStructuredMasker
        if (self.n, self.m) == (2, 4) and config.pg_submodels != "masked":
            self.masker = SemiStructuredMasker(self.layout.modules, capacity=config.samples_per_step)
        else:
            self.masker = WeightMasker(self.layout.modules)

    def initial_scores(self) -> torch.Tensor:
        return torch.zeros(self.num_groups, self.family.num_patterns)

    def activate(self, sample: torch.Tensor) -> None:
        if isinstance(self.masker, SemiStructuredMasker):
            self.masker.activate(self.weight_masks(sample), key=sample_digest(sample))
        else:
            self.masker.activate(self.weight_masks(sample))

    def deactivate(self) -> None:
        self.masker.deactivate()

    def instantiation_stats(self) -> dict[str, float]:
        """Compressed 2:4 sub-models built so far and the seconds spent (empty when no layer is compressed)."""
        if isinstance(self.masker, SemiStructuredMasker) and self.masker.compressed_layers:
            return {"instantiations": float(self.masker.instantiations), "instantiation_seconds": self.masker.seconds}
        return {}

    def harden(self, scores: torch.Tensor) -> torch.Tensor:
        return self.family.mode(scores)

    def expected_sparsity(self, scores: torch.Tensor) -> float:
        return 1.0 - self.n / self.m

    def sparsity_of(self, sample: torch.Tensor) -> float:
        return 1.0 - self.n / self.m

    def weight_masks(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.family.to_mask(sample.reshape(-1)).reshape(-1)
        parts = self.layout.split(flat)
        return {name: parts[name].reshape(shape) for name, shape in self.layout.shapes.items()}

    def scores_from_zscores(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Pattern logits = sum of the weights' z over the pattern's kept weights / temperature."""
        groups = z.float().reshape(self.num_groups, self.m)
        return groups @ self.family.patterns.to(groups.device).float().t() / temperature

    def keep_from_masks(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = self.layout.flatten_masks(masks)
        kept_per_group = keep.reshape(self.num_groups, self.m).sum(1)
        if not bool((kept_per_group == self.n).all()):
            raise ValueError(
                f"the masks are not {self.n}:{self.m} (every {self.m} consecutive inputs of a row keep {self.n}); "
                f"start from masks of the same pattern"
            )
        return keep
