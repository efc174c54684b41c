"""The layer-wise driver shared by every one-shot method.

1. Capture the inputs of block 0 (hidden states plus the positional args/kwargs the model passes:
   attention mask, rotary position embeddings, cache position, ...) by a pre-hook that stops the
   forward pass there, so only the embeddings run.
2. For each block, moved alone to the working device: hooks accumulate `LayerStatistics` for the
   target linears while the calibration windows flow through; the solver prunes each linear; the
   block is run again so the *pruned* outputs become the next block's inputs (errors of earlier
   blocks are seen, and partly corrected, by later ones).

Memory is one block plus the calibration activations (num_samples x seq_len x hidden), whatever the
model's depth. With `sequential_update`, linears that read the same input (q/k/v, gate/up) form a
group and each group is calibrated on the outputs of the already-pruned groups before it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from optimum_sparse.architecture import find_blocks, find_prunable_layers
from optimum_sparse.blocks import BlockContext, BlockInputs, capture_block_inputs, prune_and_write
from optimum_sparse.calibration import CalibrationSource, get_calibration_data
from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import Solver, get_solver_class

logger = logging.getLogger(__name__)


@dataclass
class PruningResult:
    """What a pruning run did: the masks (bool, (out, in), on CPU), per-layer sparsity, time taken."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    #: relative reconstruction error ||X(W - W')^T||^2 / ||X W^T||^2 per layer (Hessian methods)
    layer_errors: dict[str, float] = field(default_factory=dict)
    #: per-block reports of block-level solvers (pg's block objective, SparseLLM), by block index
    block_reports: dict[int, object] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(total, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _prune_block_layerwise(
    context: BlockContext, solver: Solver, sequential_update: bool, fixed_masks: dict[str, torch.Tensor] | None
) -> None:
    """The default: one statistics pass, then each target layer pruned (or refitted) on its own."""
    groups = context.groups()
    # sequential_update: calibrate each group after the groups before it are pruned
    passes = [[group] for group in groups] if sequential_update else [groups]
    for pass_groups in passes:
        stats = context.statistics(pass_groups)
        for layer in (layer for group in pass_groups for layer in group):
            mask = fixed_masks.get(layer.name) if fixed_masks is not None else None
            if fixed_masks is not None and mask is None:
                continue
            prune_and_write(layer, stats.pop(layer.name), solver, context.refit, mask, context.device, context.result)


def prune(
    model: nn.Module,
    config: SparsityConfig,
    calibration: CalibrationSource | BlockInputs = None,
    tokenizer=None,
    *,
    fixed_masks: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
) -> PruningResult:
    """Prune `model` in place with `config.method`, one block at a time.

    Args:
        model: a transformers model (decoder LM or encoder); its weights are modified in place.
        config: the `SparsityConfig`.
        calibration: text file path, Hub dataset spec, list of strings, token tensor(s), or None
            (text sampled from the model). Unused by methods that need no data (magnitude).
        tokenizer: turns calibration text into tokens.
        fixed_masks: {module name: bool mask}; when given, masks are not chosen but the weights are
            refitted on them (weight-update-only mode, see `refit_weights`).
    Returns:
        `PruningResult` with the masks and per-layer sparsity.
    """
    start = time.perf_counter()
    per_block = find_prunable_layers(model, config)  # validates targets / N:M before any work
    blocks_name, blocks = find_blocks(model)
    solver = get_solver_class(config.method)(config)
    refit = get_solver_class(config.weight_update)(config) if config.weight_update else None
    needs_data = solver.requires_calibration or refit is not None or fixed_masks is not None
    with_hessian = (
        solver.requires_hessian
        or refit is not None
        or (fixed_masks is not None and getattr(solver, "requires_hessian", False))
    )
    device = resolve_device(config.device)
    model_config = getattr(model, "config", None)
    result = PruningResult()
    desc = f"Pruning ({config.describe()})"
    was_training = model.training
    model.eval()
    try:
        if not needs_data:
            for index in tqdm(range(len(blocks)), desc=desc, disable=not show_progress):
                for layer in per_block[index]:
                    prune_and_write(layer, None, solver, None, None, device, result)
                if on_block_done:
                    on_block_done(index)
            return result
        if isinstance(calibration, BlockInputs):
            inputs = calibration
        else:
            windows = get_calibration_data(
                calibration, tokenizer, model, config.num_samples, config.seq_len, config.seed
            )
            logger.info("calibrating on %d windows x %d tokens", windows.shape[0], windows.shape[1])
            inputs = capture_block_inputs(model, blocks, windows, device)
        for index in tqdm(range(len(blocks)), desc=desc, disable=not show_progress):
            block = blocks[index]
            home = next(block.parameters()).device
            block.to(device)
            inputs.use_block(index)
            context = BlockContext(
                block,
                index,
                per_block[index],
                inputs,
                device,
                with_hessian,
                result,
                refit,
                model_config,
                name=f"{blocks_name}.{index}",
            )
            if fixed_masks is None and hasattr(solver, "prune_block"):
                solver.prune_block(context)  # block-level method (e.g. SparseLLM's joint MLP pruning)
            else:
                _prune_block_layerwise(context, solver, config.sequential_update, fixed_masks)
            with torch.no_grad():
                inputs.hidden = inputs.run_windows(block)
            block.to(home)
            if on_block_done:
                on_block_done(index)
        return result
    finally:
        result.seconds = time.perf_counter() - start
        model.train(was_training)
