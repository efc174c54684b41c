"""Weight-update-only mode: keep a model's masks, refit the kept weights (e.g. by ADMM).

Any mask can be improved this way: one from Wanda (cheap mask, then a strong update), one loaded
from a checkpoint, or one learned by the Trainer callback. Same sequential engine, same statistics;
only the solver's `refit_layer` is called instead of `prune_layer`.
"""

from __future__ import annotations

import torch
from torch import nn

from optimum_sparse.architecture import get_weight
from optimum_sparse.calibration import CalibrationSource
from optimum_sparse.config import SparsityConfig
from optimum_sparse.sequential import PruningResult, prune


def masks_from_zeros(model: nn.Module, config: SparsityConfig) -> dict[str, torch.Tensor]:
    """The current masks of a pruned model: True where a target weight is non-zero."""
    from optimum_sparse.architecture import find_prunable_layers

    return {
        layer.name: (get_weight(layer.module) != 0).detach().cpu()
        for layers in find_prunable_layers(model, config).values()
        for layer in layers
    }


def refit_weights(
    model: nn.Module,
    calibration: CalibrationSource = None,
    tokenizer=None,
    method: str = "admm",
    masks: dict[str, torch.Tensor] | None = None,
    config: SparsityConfig | None = None,
    show_progress: bool = True,
) -> PruningResult:
    """Refit the kept weights of a pruned `model` in place, masks unchanged.

    Args:
        model: a pruned model (zeros where pruned) or any model together with `masks`.
        calibration: as for `prune` (file, dataset spec, strings, token tensors).
        method: a solver implementing `refit_layer` ("admm").
        masks: {module name: bool mask (out, in)}; default: the model's current non-zeros.
        config: calibration and solver settings (method is replaced by `method`).
    """
    base = config or SparsityConfig(method=method)
    config = base.replace(method=method, weight_update=None)
    if masks is None:
        masks = masks_from_zeros(model, config)
    return prune(model, config, calibration, tokenizer, fixed_masks=masks, show_progress=show_progress)
