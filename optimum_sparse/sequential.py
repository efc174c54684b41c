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
import os
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from optimum_sparse.architecture import find_blocks, find_prunable_layers
from optimum_sparse.blocks import BlockContext, BlockInputs, BlockSource, PruningResult, capture_block_inputs
from optimum_sparse.budgets import check_one_budget_per_block, explicit_budgets, owl_budgets
from optimum_sparse.calibration import CalibrationSource, get_calibration_data
from optimum_sparse.config import SparsityConfig
from optimum_sparse.distributed import is_distributed, shard
from optimum_sparse.reconstruction import DenseStream
from optimum_sparse.resume import ResumeLog
from optimum_sparse.solvers import Solver, get_solver_class

logger = logging.getLogger(__name__)

__all__ = ["PruningResult", "prune", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_distributable(config: SparsityConfig, resume_dir: object = None, from_disk: bool = False) -> None:
    """Refuse, before any work, what a distributed run cannot share: block-level solvers and reconstruction,
    and (each rank holding its own activations) resume directories and pruning from disk."""
    if get_solver_class(config.method).prunes_whole_blocks() or config.reconstruction:
        raise ValueError(
            f"a distributed run shares per-layer statistics; {config.method!r} with block-level work "
            "(block solvers, block reconstruction) runs in one process: launch it without torchrun"
        )
    if resume_dir is not None or from_disk:
        what = "--resume-dir" if resume_dir is not None else "--low-memory"
        raise ValueError(f"{what} runs in one process: launch it without torchrun")


def _solver_for_block(solver: Solver, budgets: dict[str, float] | None, layers: list) -> Solver:
    """The solver at the block's own budget when layer budgets give all its layers one sparsity."""
    values = {budgets[layer.name] for layer in layers} if budgets and layers else set()
    return solver.with_sparsity(values.pop()) if len(values) == 1 else solver


def prune(
    model: nn.Module,
    config: SparsityConfig,
    calibration: CalibrationSource | BlockInputs = None,
    tokenizer=None,
    *,
    fixed_masks: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    resume_dir: str | os.PathLike | None = None,
    block_source: BlockSource | None = None,
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
        resume_dir: record every finished block there; a run started again with the same config and
            model continues after the last recorded block (`optimum_sparse.resume`).
        block_source: the blocks' weights are not in memory: it loads each block when its turn comes
            and writes it out once pruned (`optimum_sparse.streaming.prune_checkpoint`).
    Returns:
        `PruningResult` with the masks and per-layer sparsity.
    """
    start = time.perf_counter()
    per_block = find_prunable_layers(model, config)  # validates targets / N:M before any work
    if resume_dir is not None and block_source is not None:
        raise ValueError("resume_dir works on a model in memory; pruning from disk cannot resume yet")
    resume = ResumeLog(resume_dir, config, model, calibration) if resume_dir is not None else None
    done = resume.finished_blocks() if resume is not None else 0  # a different run is refused here
    solver = get_solver_class(config.method)(config)
    budgets = None  # {layer: sparsity} under layer budgets; explicit ones are checked before any work
    if config.layer_sparsity is not None and fixed_masks is None:
        budgets = check_one_budget_per_block(solver, explicit_budgets(config, per_block), per_block)
    owl = config.sparsity_profile == "owl" and fixed_masks is None
    if is_distributed():
        check_distributable(config, resume_dir, block_source is not None)
    blocks_name, blocks = find_blocks(model)
    solver.check_model(model)
    refit = get_solver_class(config.weight_update)(config) if config.weight_update else None
    reconstructing = config.reconstruction == "block"
    needs_data = solver.requires_calibration or refit is not None or fixed_masks is not None or owl or reconstructing
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
        inputs: BlockInputs | None = None
        if isinstance(calibration, BlockInputs) and needs_data:
            inputs = calibration
        elif needs_data:
            windows = get_calibration_data(
                calibration, tokenizer, model, config.num_samples, config.seq_len, config.seed
            )
            logger.info("calibrating on %d windows x %d tokens", windows.shape[0], windows.shape[1])
            windows = shard(windows)  # distributed: this rank's share; the statistics are summed over ranks
            inputs = capture_block_inputs(model, blocks, windows, device, block_source)
        if owl:
            budgets = check_one_budget_per_block(
                solver, owl_budgets(config, blocks, per_block, inputs, device, block_source), per_block
            )
        result.budgets = budgets or {}
        dense = DenseStream(inputs) if reconstructing else None
        earlier_seconds = resume.restore(done, blocks, inputs, result, dense) if done else 0.0
        start -= earlier_seconds
        for index in tqdm(
            range(done, len(blocks)), desc=desc, disable=not show_progress, initial=done, total=len(blocks)
        ):
            block = blocks[index]
            if block_source is not None:
                block_source.load(index)
            home = next(block.parameters()).device
            if inputs is not None:  # without calibration (magnitude) weights are copied layer by layer
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
                fixed_masks=fixed_masks,
                layer_sparsity=budgets,
            )
            block_solver = _solver_for_block(solver, budgets, per_block[index])
            targets = dense.targets(block) if dense is not None and per_block[index] else None
            if fixed_masks is not None:
                block_solver.refit_block(context)
            elif (report := block_solver.prune_block(context)) is not None:
                result.block_reports[index] = report
            if targets is not None:
                masked = [layer for layer in per_block[index] if layer.name in result.masks]
                result.reconstruction[index] = dense.reconstruct(block, masked, result.masks, targets, config)
            if inputs is not None:
                with torch.no_grad():
                    inputs.hidden = inputs.run_windows(block)
                if dense is not None:
                    dense.advance(targets if targets is not None else dense.targets(block))
                block.to(home)
            if block_source is not None:
                block_source.finish(index)
                result.drop_masks([layer.name for layer in per_block[index]])  # its zeros are written
            if resume is not None:
                result.seconds = time.perf_counter() - start
                resume.record(index, block, [layer.name for layer in per_block[index]], inputs, result, dense)
            if on_block_done:
                on_block_done(index)
        return result
    finally:
        result.seconds = time.perf_counter() - start
        model.train(was_training)
