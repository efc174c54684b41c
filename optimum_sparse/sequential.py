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

__all__ = ["BlockRun", "PruningResult", "prune", "resolve_device"]


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
    run = BlockRun(  # every check, before any work
        model, config, calibration, fixed_masks=fixed_masks, resume_dir=resume_dir, block_source=block_source
    )
    was_training = model.training
    model.eval()
    try:
        run.prepare(tokenizer)
        indices = tqdm(
            range(run.done, len(run.blocks)),
            desc=f"Pruning ({config.describe()})",
            disable=not show_progress,
            initial=run.done,
            total=len(run.blocks),
        )
        for index in indices:
            run.prune_block(index)
            if on_block_done:
                on_block_done(index)
        return run.result
    finally:
        run.result.seconds = time.perf_counter() - run.start
        model.train(was_training)


class BlockRun:
    """One pruning run, block by block: what the run needs is set up (and checked) once, then each block
    is calibrated, pruned, optionally reconstructed, recorded and its outputs fed forward.

    The constructor only checks and plans: a wrong budget, a run that cannot be distributed, or a
    resume directory of another run is refused before any calibration pass.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        calibration: CalibrationSource | BlockInputs = None,
        *,
        fixed_masks: dict[str, torch.Tensor] | None = None,
        resume_dir: str | os.PathLike | None = None,
        block_source: BlockSource | None = None,
    ):
        self.start = time.perf_counter()
        self.model, self.config, self.calibration = model, config, calibration
        self.fixed_masks, self.block_source = fixed_masks, block_source
        self.per_block = find_prunable_layers(model, config)  # validates targets / N:M before any work
        if resume_dir is not None and block_source is not None:
            raise ValueError("resume_dir works on a model in memory; pruning from disk cannot resume yet")
        self.resume = ResumeLog(resume_dir, config, model, calibration) if resume_dir is not None else None
        #: blocks a previous run of this resume directory finished (another run's directory is refused here)
        self.done = self.resume.finished_blocks() if self.resume is not None else 0
        self.solver = get_solver_class(config.method)(config)
        #: {layer: sparsity} under layer budgets; explicit ones are checked here, OWL's once data flows
        self.budgets: dict[str, float] | None = None
        if config.layer_sparsity is not None and fixed_masks is None:
            self.budgets = check_one_budget_per_block(
                self.solver, explicit_budgets(config, self.per_block), self.per_block
            )
        self.owl = config.sparsity_profile == "owl" and fixed_masks is None
        if is_distributed():
            check_distributable(config, resume_dir, block_source is not None)
        self.blocks_name, self.blocks = find_blocks(model)
        self.solver.check_model(model)
        self.refit = get_solver_class(config.weight_update)(config) if config.weight_update else None
        self.reconstructing = config.reconstruction == "block"
        self.needs_data = (
            self.solver.requires_calibration
            or self.refit is not None
            or fixed_masks is not None
            or self.owl
            or self.reconstructing
        )
        self.with_hessian = (
            self.solver.requires_hessian
            or self.refit is not None
            or (fixed_masks is not None and getattr(self.solver, "requires_hessian", False))
        )
        self.device = resolve_device(config.device)
        self.result = PruningResult()
        self.inputs: BlockInputs | None = None
        self.dense: DenseStream | None = None
        self.prepared = False

    def prepare(self, tokenizer=None) -> None:
        """The calibration activations at block 0, OWL's budgets, the dense stream for reconstruction,
        and what a resumed run had recorded. Once per run: a second call would capture and restore again."""
        if self.prepared:
            raise RuntimeError("BlockRun.prepare() runs once per run; make a new BlockRun to prune again")
        self.prepared = True
        config = self.config
        if isinstance(self.calibration, BlockInputs) and self.needs_data:
            self.inputs = self.calibration
        elif self.needs_data:
            windows = get_calibration_data(
                self.calibration, tokenizer, self.model, config.num_samples, config.seq_len, config.seed
            )
            logger.info("calibrating on %d windows x %d tokens", windows.shape[0], windows.shape[1])
            windows = shard(windows)  # distributed: this rank's share; the statistics are summed over ranks
            self.inputs = capture_block_inputs(self.model, self.blocks, windows, self.device, self.block_source)
        if self.owl:
            owl = owl_budgets(config, self.blocks, self.per_block, self.inputs, self.device, self.block_source)
            self.budgets = check_one_budget_per_block(self.solver, owl, self.per_block)
        self.result.budgets = self.budgets or {}
        self.dense = DenseStream(self.inputs) if self.reconstructing else None
        if self.done:
            self.start -= self.resume.restore(self.done, self.blocks, self.inputs, self.result, self.dense)

    def prune_block(self, index: int) -> None:
        """Calibrate, prune (or refit), reconstruct and record block `index`; its outputs feed the next."""
        if not self.prepared:  # without it OWL budgets and reconstruction would be skipped silently
            raise RuntimeError("call BlockRun.prepare() before prune_block()")
        block, layers, result = self.blocks[index], self.per_block[index], self.result
        if self.block_source is not None:
            self.block_source.load(index)
        home = next(block.parameters()).device
        if self.inputs is not None:  # without calibration (magnitude) weights are copied layer by layer
            block.to(self.device)
            self.inputs.use_block(index)
        context = BlockContext(
            block,
            index,
            layers,
            self.inputs,
            self.device,
            self.with_hessian,
            result,
            self.refit,
            getattr(self.model, "config", None),
            name=f"{self.blocks_name}.{index}",
            fixed_masks=self.fixed_masks,
            layer_sparsity=self.budgets,
        )
        solver = _solver_for_block(self.solver, self.budgets, layers)
        targets = self.dense.targets(block) if self.dense is not None and layers else None
        if self.fixed_masks is not None:
            solver.refit_block(context)
        elif (report := solver.prune_block(context)) is not None:
            result.block_reports[index] = report
        if targets is not None:
            masked = [layer for layer in layers if layer.name in result.masks]
            result.reconstruction[index] = self.dense.reconstruct(block, masked, result.masks, targets, self.config)
        if self.inputs is not None:
            with torch.no_grad():
                self.inputs.hidden = self.inputs.run_windows(block)
            if self.dense is not None:
                self.dense.advance(targets if targets is not None else self.dense.targets(block))
            block.to(home)
        if self.block_source is not None:
            self.block_source.finish(index)
            result.drop_masks([layer.name for layer in layers])  # its zeros are written
        if self.resume is not None:
            result.seconds = time.perf_counter() - self.start
            self.resume.record(index, block, [layer.name for layer in layers], self.inputs, result, self.dense)
