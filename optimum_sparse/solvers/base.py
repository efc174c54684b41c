"""The contract every pruning method fulfils, and the statistics it is given.

The engine hands a solver one decoder block at a time through `prune_block(context)`. The default
walks the block's linear layers: each is given as its weight in (out_features, in_features) layout
(float32) with the `LayerStatistics` of the calibration inputs that reached it, and `prune_layer`
returns the new weight (zeros outside the mask) and the keep-mask. Methods that prune several layers
jointly (SparseLLM's MLP, pg's block objective) override `prune_block` and may return a report, which
the engine records in `PruningResult.block_reports`.

So a new method is one file: subclass `Solver`, declare its capabilities (class flags) and settings
(`options`), implement `prune_layer` (or `prune_block`), decorate with `@register_solver("name")`.
See docs/adding_a_method.md.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer
from optimum_sparse.config import SparsityConfig
from optimum_sparse.distributed import all_reduce_sum, is_distributed
from optimum_sparse.options import Option, optional_positive

#: factorise / solve in float64 up to this many input features, in float32 above: a float64 matrix of a 7B
#: model's 11008-wide down_proj is 1 GB, and float32 is what the reference implementations use on GPUs
FLOAT64_MAX_FEATURES = 8192

#: the Hessian dampening setting, shared by the methods that invert H (same name, same meaning)
DAMPENING = Option(
    "dampening",
    None,
    "fraction of mean(diag(H)) added to the Hessian diagonal; None: the method's own default",
    optional_positive(" (fraction of mean diag(H))"),
)


class LayerStatistics:
    """Statistics of a layer's inputs X (tokens x in_features), summed over the calibration windows.

    Always keeps the squared column norms sum_t x_tj^2 (Wanda's activation norms). With
    `with_hessian` it also keeps H = X^T X / tokens (SparseGPT/ADMM use H only up to scale).

    Each update's products are formed in float32 and added into float64 sums; the float32 results
    (`sq_norms`, `hessian`) are made once, when first read, and the float64 Hessian sum is then freed.
    Why float64: the order in which windows are added then (almost never) changes a float32 result, so
    one process and several (each summing its own windows, then all-reduced) get the same statistics,
    and methods that break near-ties the same way prune the same weights. That holds where windows run
    one at a time (the CPU default); batched replay on a GPU groups windows by process, and a batched
    forward pass may differ from a single one in its last bits.
    """

    #: most elements of the float32 product formed at once (X^T X is added in row chunks)
    CHUNK_ELEMENTS = 1 << 24

    def __init__(self, in_features: int, with_hessian: bool, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.num_tokens = 0
        self.device = torch.device(device)
        # Apple's MPS has no float64: the sums live on the CPU there, the float32 results on the device
        sums = torch.device("cpu") if self.device.type == "mps" else self.device
        self._sq_sum = torch.zeros(in_features, dtype=torch.float64, device=sums)
        self._h_sum = (
            torch.zeros(in_features, in_features, dtype=torch.float64, device=sums) if with_hessian else None
        )
        self._hessian: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.in_features).to(self._sq_sum.device, torch.float32)
        tokens = x.shape[0]
        if tokens == 0:
            return
        self._sq_sum += x.pow(2).sum(0, dtype=torch.float64)
        h_sum = self._hessian_sum()
        if h_sum is not None:
            rows = max(1, self.CHUNK_ELEMENTS // self.in_features)
            for start in range(0, self.in_features, rows):
                h_sum[start : start + rows] += x[:, start : start + rows].t() @ x
        self.num_tokens += tokens

    def _hessian_sum(self) -> torch.Tensor | None:
        """The float64 sum X^T X, rebuilt from the float32 mean if that was already read."""
        if self._h_sum is None and self._hessian is not None:
            self._h_sum = self._hessian.to(self._sq_sum.device).double() * self.num_tokens
            self._hessian = None
        return self._h_sum

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of a distributed run (each saw its own windows)."""
        if not is_distributed():
            return
        tokens = torch.tensor([float(self.num_tokens)], dtype=torch.float64, device=self._sq_sum.device)
        all_reduce_sum(self._sq_sum)
        h_sum = self._hessian_sum()
        if h_sum is not None:
            all_reduce_sum(h_sum)
        all_reduce_sum(tokens)
        self.num_tokens = int(tokens.item())

    @property
    def sq_norms(self) -> torch.Tensor:
        """sum_t x_tj^2 for every input feature j (float32)."""
        return self._sq_sum.float().to(self.device)

    @property
    def hessian(self) -> torch.Tensor | None:
        """H = X^T X / tokens in float32, or None without `with_hessian`."""
        if self._h_sum is not None:
            self._hessian = self._h_sum.div_(max(self.num_tokens, 1)).float().to(self.device)
            self._h_sum = None  # 1 GB on a 7B model's down_proj: not kept beside the float32 copy
        return self._hessian

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 for every input feature j."""
        return self.sq_norms.sqrt()


@dataclass
class LayerResult:
    """What a solver hands back for one layer."""

    weight: torch.Tensor  # float32, (out, in), zeros outside mask
    mask: torch.Tensor  # bool, (out, in), True = kept


class BlockView(Protocol):
    """What a solver sees of the block being pruned (the engine's `BlockContext` provides it).

    Solvers are written against this view, not the engine, so that the engine may change how it runs
    blocks (devices, batching, offloading) without touching a method.
    """

    block: nn.Module
    index: int
    #: the block's full module name (e.g. "model.layers.3")
    name: str
    layers: list[PrunableLayer]
    device: torch.device
    #: the run's weight update (`weight_update`), applied by `prune_layer` after the mask is chosen
    refit: Solver | None
    #: the model's config (head counts and other architecture facts), if it has one
    model_config: object | None
    #: {layer name: keep-mask} in weight-update-only mode (`refit_weights`), else None
    fixed_masks: dict[str, torch.Tensor] | None

    @property
    def num_tokens(self) -> int:
        """Calibration tokens flowing through the block."""

    def capture(self, modules: dict[str, nn.Module], dtype: torch.dtype = ..., **kwargs: Any) -> dict[str, tuple]:
        """{name: (inputs, outputs)} of `modules` over the calibration windows, as (tokens x features) tensors."""

    def write(self, layer: PrunableLayer, outcome: LayerResult, stats: LayerStatistics | None = None) -> None:
        """Write weights the solver computed itself, checking them and recording the mask."""

    def groups(self, layers: list[PrunableLayer] | None = None) -> list[list[PrunableLayer]]:
        """Layers grouped by shared input tensor (q/k/v; gate/up), in call order."""

    def statistics(self, groups: list[list[PrunableLayer]]) -> dict[str, LayerStatistics]:
        """One calibration pass of the block, accumulating the statistics of `groups`."""

    def prune_layer(self, layer: PrunableLayer, stats: LayerStatistics | None, solver: Solver) -> LayerResult:
        """Prune (or, on a fixed mask, refit) one layer with `solver`, then the run's weight update; record it."""


class Solver:
    """Base class of pruning methods; see the module docstring."""

    name: str = ""
    #: the settings this method reads from `SparsityConfig` (checked and defaulted by the config)
    options: ClassVar[tuple[Option, ...]] = ()
    #: the patterns it prunes: "unstructured", "n:m", and "channels" for whole MLP channels / KV groups
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "n:m")
    #: offers `refit_layer` as a weight update after any method's masks (`weight_update=<name>`)
    can_refit: ClassVar[bool] = False
    #: settings of a quick run that `prune()` accepts (few iterations): what the contract tests run
    smoke_settings: ClassVar[dict[str, Any]] = {}
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        abstract = ABC in cls.__bases__  # an intermediate base class (class Mine(Solver, ABC)) may defer both
        if not abstract and cls.prune_layer is Solver.prune_layer and cls.prune_block is Solver.prune_block:
            raise TypeError(f"{cls.__name__} must implement prune_layer (one layer) or prune_block (a whole block)")

    @classmethod
    def uses(cls, settings: dict[str, Any]) -> Sequence[str]:
        """Other registered methods this one calls with these settings (e.g. an inner solver)."""
        return ()

    @classmethod
    def check_settings(cls, config: SparsityConfig) -> None:
        """Checks across settings, or between settings and the common fields (raise ValueError)."""
        return None

    @property
    def scope(self) -> str:
        return self.config.mask_scope or self.default_scope

    @property
    def dampening(self) -> float:
        """The config's `dampening`, or this method's default when it is None."""
        return self.config.dampening if self.config.dampening is not None else self.default_dampening

    def with_sparsity(self, sparsity: float) -> Solver:
        """This solver at another sparsity (a layer budget): the same settings in a config of its own."""
        if sparsity == self.config.sparsity:
            return self
        return type(self)(self.config.replace(sparsity=sparsity, sparsity_profile=None, layer_sparsity=None))

    @classmethod
    def prunes_whole_blocks(cls) -> bool:
        """Whether it overrides `prune_block` (one sparsity per block) rather than pruning layer by layer."""
        return cls.prune_block is not Solver.prune_block

    def check_model(self, model: nn.Module) -> None:
        """Refuse, before any work, a model this run cannot prune (a ValueError naming the fix)."""
        return None

    def prune_block(self, context: BlockView) -> Any:
        """Prune one block; the engine calls this for every block. Returns a report or None.

        The default prunes the block's layers one by one (`prune_groups`); joint methods override it.
        """
        self.prune_groups(context, context.groups())
        return None

    def refit_block(self, context: BlockView) -> None:
        """Refit the block's layers on their fixed masks (`context.fixed_masks`), one by one.

        The engine calls this instead of `prune_block` in weight-update-only mode (`refit_weights`):
        with the masks given there is nothing to choose jointly, whatever the method.
        """
        self.prune_groups(context, context.groups())

    def prune_groups(self, context: BlockView, groups: list[list[PrunableLayer]], solver: Solver | None = None) -> None:
        """Collect statistics and prune each layer of `groups` with `solver` (default: this one).

        With `sequential_update` each input group is calibrated after the groups before it are pruned,
        so later sub-layers see the pruned outputs of earlier ones; otherwise one pass serves all.
        """
        fixed = context.fixed_masks
        if fixed is not None:
            groups = [[layer for layer in group if layer.name in fixed] for group in groups]
        groups = [group for group in groups if group]
        passes = [[group] for group in groups] if self.config.sequential_update else [groups]
        for pass_groups in (p for p in passes if p):
            stats = context.statistics(pass_groups)
            for layer in (layer for group in pass_groups for layer in group):
                context.prune_layer(layer, stats.pop(layer.name), solver or self)

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        """Prune one layer. `weight` is a float32 (out, in) copy the solver may modify.

        Methods that only prune whole blocks (pg's block objective) override `prune_block` instead and
        leave this one, so a call here says which it is.
        """
        raise NotImplementedError(f"method {self.name!r} prunes whole blocks (prune_block), not single layers")

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
