"""Layer budgets: how sparse each block (or layer) is when the model as a whole is at `sparsity`.

A uniform sparsity treats every block alike, but blocks are not alike: some carry far more outlier
features (inputs whose weights matter out of proportion) than others, and pruning those as hard as the
rest costs the most. Two ways to set the budgets, both for every method:

- `sparsity_profile="owl"`: Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024, "Outlier
  Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity",
  arXiv:2310.05175). Each block's outlier ratio D_l is the share of its Wanda scores |W_ij| ||X_j||
  above `owl_m` times the block's mean score, measured on the dense model with the calibration
  windows. Budgets fall as D_l rises, spread over 2 x `owl_lambda`: with d_l = D_l min-max scaled
  to [0, 1], s_l = S - 2 lambda (d_l - mean d), the mean weighted by each block's pruned parameters,
  so the model still loses exactly S of them.
- `layer_sparsity`: explicit budgets, one value per block (a list) or {regex: sparsity} over module
  names (first match wins; unmatched layers keep `sparsity`).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer, get_weight
from optimum_sparse.blocks import BlockInputs, BlockSource
from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import LayerStatistics, Solver

logger = logging.getLogger(__name__)

#: the highest budget a profile may give a block (a fully pruned block cannot be calibrated)
MAX_BLOCK_SPARSITY = 0.99


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of `scores` (one block's, all layers together) above `m` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


@torch.no_grad()
def owl_outlier_ratios(
    blocks: nn.ModuleList,
    per_block: dict[int, list[PrunableLayer]],
    inputs: BlockInputs,
    device: torch.device,
    m: float,
    source: BlockSource | None = None,
) -> list[float]:
    """Each block's outlier ratio on the dense model, in one pass of the calibration windows.

    The windows flow through the dense blocks (inputs.hidden is replaced block by block); callers
    that prune afterwards start again from block 0's inputs.
    """
    ratios = []
    for index, block in enumerate(blocks):
        if source is not None:
            source.load(index)
        home = next(block.parameters()).device
        block.to(device)
        inputs.use_block(index)
        stats = {layer.name: LayerStatistics(layer.in_features, False, device) for layer in per_block.get(index, [])}
        handles = [
            layer.module.register_forward_hook(lambda mod, i, o, s=stats[layer.name]: s.update(i[0]))
            for layer in per_block.get(index, [])
        ]
        try:
            inputs.hidden = inputs.run_windows(block)
        finally:
            for handle in handles:
                handle.remove()
        for layer_stats in stats.values():
            layer_stats.all_reduce()
        scores = [
            get_weight(layer.module).detach().to(device, torch.float32).abs() * stats[layer.name].sq_norms.sqrt()
            for layer in per_block.get(index, [])
        ]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        block.to(home)
        if source is not None:
            source.release(index)
    return ratios


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios: fewer zeros where outliers are many, mean `target`.

    The mean is weighted by `sizes` (each block's pruned parameters). Budgets are kept in
    [0, MAX_BLOCK_SPARSITY]; what clipping removes is spread over the other blocks.
    """
    ratio = torch.tensor(ratios, dtype=torch.float64)
    weight = torch.tensor(sizes, dtype=torch.float64)
    weight = weight / weight.sum()
    pruned = weight > 0  # a block without pruned layers neither sets the scale nor takes a budget
    low, high = ratio[pruned].min(), ratio[pruned].max()
    scaled = ((ratio - low) / (high - low) if high > low else torch.zeros_like(ratio)) * pruned
    budgets = target - 2.0 * lam * (scaled - (weight * scaled).sum())
    for _ in range(len(sizes)):
        clipped = budgets.clamp(0.0, MAX_BLOCK_SPARSITY)
        free = (clipped > 0) & (clipped < MAX_BLOCK_SPARSITY) & pruned
        missing = target - float((weight * clipped).sum())
        if abs(missing) < 1e-12 or not free.any():
            budgets = clipped
            break
        budgets = clipped + free * missing / float(weight[free].sum())
    return [float(b) for b in budgets]


def check_layer_sparsity(config: SparsityConfig, per_block: dict[int, list[PrunableLayer]]) -> None:
    """Refuse explicit budgets that do not fit the model (before any work)."""
    budgets = config.layer_sparsity
    if isinstance(budgets, (list, tuple)) and len(budgets) != len(per_block):
        raise ValueError(
            f"layer_sparsity has {len(budgets)} values but the model has {len(per_block)} blocks; give one "
            "per block, or a {regex: sparsity} mapping over module names"
        )
    if isinstance(budgets, dict):
        names = [layer.name for layers in per_block.values() for layer in layers]
        unmatched = [regex for regex in budgets if not any(re.search(regex, name) for name in names)]
        if unmatched:
            raise ValueError(f"layer_sparsity: {unmatched} match no pruned layer (e.g. {names[0]!r})")


def explicit_budgets(config: SparsityConfig, per_block: dict[int, list[PrunableLayer]]) -> dict[str, float]:
    """{layer name: sparsity} from `config.layer_sparsity` (list per block or {regex: sparsity})."""
    check_layer_sparsity(config, per_block)
    budgets = config.layer_sparsity
    if isinstance(budgets, (list, tuple)):
        return {layer.name: float(budgets[i]) for i, layers in per_block.items() for layer in layers}
    resolved = {}
    for layers in per_block.values():
        for layer in layers:
            match = next((value for regex, value in budgets.items() if re.search(regex, layer.name)), None)
            resolved[layer.name] = float(config.sparsity if match is None else match)
    return resolved


def owl_budgets(
    config: SparsityConfig,
    blocks: nn.ModuleList,
    per_block: dict[int, list[PrunableLayer]],
    inputs: BlockInputs,
    device: torch.device,
    source: BlockSource | None = None,
) -> dict[str, float]:
    """{layer name: sparsity} of the OWL profile (every layer of a block at its block's budget)."""
    start_hidden, start_args, start_kwargs = inputs.hidden, inputs.args, inputs.kwargs
    ratios = owl_outlier_ratios(blocks, per_block, inputs, device, config.owl_m, source)
    inputs.hidden, inputs.args, inputs.kwargs = start_hidden, start_args, start_kwargs
    sizes = [sum(get_weight(layer.module).numel() for layer in per_block.get(i, [])) for i in range(len(blocks))]
    block_budgets = owl_sparsities(ratios, sizes, config.sparsity, config.owl_lambda)
    logger.info(
        "OWL budgets (M=%g, lambda=%g): %s",
        config.owl_m,
        config.owl_lambda,
        ", ".join(f"{s:.3f}" for s in block_budgets),
    )
    return {layer.name: block_budgets[i] for i, layers in per_block.items() for layer in layers}


def check_one_budget_per_block(
    solver: Solver, budgets: dict[str, float], per_block: dict[int, list[PrunableLayer]]
) -> dict[str, float]:
    """`budgets`, unless `solver` prunes blocks as a whole and a block's layers got different ones."""
    if solver.prunes_whole_blocks():
        for layers in per_block.values():
            if len({budgets[layer.name] for layer in layers}) > 1:
                raise ValueError(
                    f"method {solver.name!r} prunes a block as a whole at one sparsity, but layer_sparsity gives "
                    f"{layers[0].name} and the other layers of its block different budgets; give one value per block"
                )
    return budgets
