"""The contract every pruning method fulfils, and the statistics it is given.

A solver sees one linear layer at a time: its weight in (out_features, in_features) layout as
float32, and `LayerStatistics` accumulated from the calibration inputs that reached that layer.
It returns the new weight (zeros outside the mask) and the keep-mask. The sequential engine does
everything else (finding layers, running calibration, writing weights back), so a new method is one
file: subclass `Solver`, set the class flags, implement `prune_layer`, decorate with
`@register_solver("name")`.

Methods that prune several layers of a block jointly (SparseLLM) also define
`prune_block(context: optimum_sparse.blocks.BlockContext) -> None`; the engine then hands them the
whole block (its layers, calibration inputs, helpers to capture activations and write weights).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from optimum_sparse.config import SparsityConfig


class LayerStatistics:
    """Running statistics of a layer's inputs X (tokens x in_features).

    Always keeps the squared column norms sum_t x_tj^2 (Wanda's activation norms). With
    `with_hessian` it also keeps H = X^T X / tokens as a running mean, which stays well scaled
    however many tokens are seen (SparseGPT/ADMM use H only up to scale).
    """

    def __init__(self, in_features: int, with_hessian: bool, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.num_tokens = 0
        self.sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.hessian = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if with_hessian else None
        )

    @torch.no_grad()
    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.in_features).to(self.sq_norms.device, torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return
        self.sq_norms += x.pow(2).sum(0)
        if self.hessian is not None:
            total = self.num_tokens + tokens
            self.hessian.mul_(self.num_tokens / total)
            self.hessian.addmm_(x.t(), x, alpha=1.0 / total)
        self.num_tokens += tokens

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 for every input feature j."""
        return self.sq_norms.sqrt()


@dataclass
class LayerResult:
    """What a solver hands back for one layer."""

    weight: torch.Tensor  # float32, (out, in), zeros outside mask
    mask: torch.Tensor  # bool, (out, in), True = kept


class Solver(ABC):
    """Base class of pruning methods; see the module docstring."""

    name: str = ""
    #: needs calibration inputs at all (magnitude does not: no forward pass is run for it)
    requires_calibration: bool = True
    #: needs H = X^T X (else only the column norms are accumulated)
    requires_hessian: bool = False
    #: default comparison scope for unstructured masks ("row" or "layer")
    default_scope: str = "row"
    #: Hessian dampening when the config leaves `dampening` at None (fraction of mean diag(H))
    default_dampening: float = 0.01

    def __init__(self, config: SparsityConfig):
        self.config = config

    @property
    def scope(self) -> str:
        return self.config.mask_scope or self.default_scope

    @property
    def dampening(self) -> float:
        """The config's `dampening`, or this method's default when it is None."""
        return self.config.dampening if self.config.dampening is not None else self.default_dampening

    @abstractmethod
    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        """Prune one layer. `weight` is a float32 (out, in) copy the solver may modify."""

    def refit_layer(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        """Weight-update-only mode: keep `mask` fixed and refit the kept weights (if the method can)."""
        raise NotImplementedError(
            f"method {self.name!r} cannot refit weights on a fixed mask; use a weight-update method such as 'admm'"
        )


def dampened_hessian(hessian: torch.Tensor, weight: torch.Tensor, dampening: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, with dead inputs (zero diagonal) made harmless.

    Inputs that never fire carry no information: their diagonal is set to 1 and the matching weight
    columns are zeroed in place, so the matrix is positive definite and the solution is unaffected.
    """
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += dampening * torch.mean(torch.diag(h))
    return h
