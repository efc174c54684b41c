"""Block reconstruction: after a block's masks are chosen, fit its kept weights to the dense block's output.

Layer-wise solvers (SparseGPT, ADMM) minimise each linear's own output error; the errors of a block's
linears still add up through attention, the MLP's gate and the residual stream. Reconstructing the
whole block with its masks fixed closes much of that gap: Shin et al., EMNLP 2024, "Rethinking Pruning
Large Language Models: Benefits and Pitfalls of Reconstruction Error Minimization" (block-wise
reconstruction after any mask), and Guo et al. 2024, "EBFT: Effective and Block-Wise Fine-Tuning for
Sparse LLMs". Both warn that it can overfit the calibration windows, so a held-out share of them
decides when to stop and which weights to keep.

The target is always the dense model's output of the block on the dense model's inputs. The inputs
are either the pruned model's own activations ("pruned": the block also learns to undo the errors of
the blocks before it) or the dense model's ("dense": each block alone). Only the weights of the
pruned linears move; every pruned position keeps a zero weight and gets a zero gradient, so Adam's
state there stays zero too. Training runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer, is_transposed
from optimum_sparse.blocks import BlockInputs
from optimum_sparse.config import SparsityConfig

logger = logging.getLogger(__name__)


@dataclass
class ReconstructionReport:
    """Losses (||block(x) - dense||^2 / ||dense||^2, mean over windows) before and after, and the epochs run."""

    train_before: float
    train_after: float
    heldout_before: float | None
    heldout_after: float | None
    epochs: int
    best_epoch: int
    #: wall-clock seconds of the fit (the dense targets' forward pass not included)
    seconds: float = 0.0


def _param_mask(module: nn.Module, mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The keep-mask in the parameter's own layout (GPT-2's Conv1D stores weights transposed)."""
    mask = mask.t() if is_transposed(module) else mask
    return mask.to(device=device, dtype=torch.float32)


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(output.device)  # targets stay on the CPU with the activations
    return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)


def _mean_error(
    block: nn.Module, inputs: BlockInputs, sources: list[torch.Tensor], targets: list[torch.Tensor]
) -> float:
    with torch.no_grad():
        return sum(float(_relative_error(inputs.run(block, s), t)) for s, t in zip(sources, targets)) / len(sources)


def reconstruct_block(
    block: nn.Module,
    layers: list[PrunableLayer],
    masks: dict[str, torch.Tensor],
    inputs: BlockInputs,
    sources: list[torch.Tensor],
    targets: list[torch.Tensor],
    config: SparsityConfig,
) -> ReconstructionReport:
    """Fit the kept weights of `layers` (masks fixed) so that block(sources) matches `targets`.

    The last `reconstruction_holdout` share of the windows is held out: after every epoch its error
    is measured, the best weights are kept, and training stops after `reconstruction_patience`
    epochs without improvement.
    """
    start = time.perf_counter()
    device = next(block.parameters()).device
    dtypes = {name: t.dtype for name, t in [*block.named_parameters(), *block.named_buffers()]}
    block.float()
    sources = [s.float() for s in sources]
    targets = [t.float() for t in targets]
    held = int(round(len(sources) * config.reconstruction_holdout)) if len(sources) > 1 else 0
    train = list(range(len(sources) - held))
    heldout = list(range(len(sources) - held, len(sources)))

    weights = {layer.name: layer.module.weight for layer in layers}
    keep = {layer.name: _param_mask(layer.module, masks[layer.name], device) for layer in layers}
    trainable = {id(w) for w in weights.values()}
    saved_flags = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(id(p) in trainable)
    hooks = [weights[name].register_hook(lambda grad, m=keep[name]: grad * m) for name in weights]
    optimizer = torch.optim.Adam(list(weights.values()), lr=config.reconstruction_lr)
    generator = torch.Generator().manual_seed(config.seed)

    def error_on(indices: list[int]) -> float:
        return _mean_error(block, inputs, [sources[i] for i in indices], [targets[i] for i in indices])

    train_before = error_on(train)
    heldout_before = error_on(heldout) if heldout else None
    best_score = heldout_before if heldout else train_before
    best = {name: w.detach().clone() for name, w in weights.items()}
    best_epoch, stale, epochs = 0, 0, 0
    try:
        for epoch in range(1, config.reconstruction_epochs + 1):
            epochs = epoch
            for i in torch.randperm(len(train), generator=generator).tolist():
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = _relative_error(inputs.run(block, sources[train[i]]), targets[train[i]])
                    loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for name, w in weights.items():
                        w.mul_(keep[name])  # exact zeros, whatever the optimiser's arithmetic did
            score = error_on(heldout) if heldout else error_on(train)
            if score < best_score:
                best_score, best_epoch, stale = score, epoch, 0
                for name, w in weights.items():  # in place: one copy of the block's weights, never two
                    best[name].copy_(w.detach())
            else:
                stale += 1
                if stale >= config.reconstruction_patience:
                    break
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(best[name])
    for name, w in weights.items():
        if bool((w.detach()[keep[name] == 0] != 0).any()):
            raise RuntimeError(f"block reconstruction moved a pruned weight of {name}")
    report = ReconstructionReport(
        train_before=train_before,
        train_after=error_on(train),
        heldout_before=heldout_before,
        heldout_after=error_on(heldout) if heldout else None,
        epochs=epochs,
        best_epoch=best_epoch,
    )
    _restore_dtypes(block, dtypes)
    report.seconds = time.perf_counter() - start
    return report


def _restore_dtypes(block: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Each parameter and buffer back in the dtype it had (mixed-precision blocks stay mixed)."""
    with torch.no_grad():
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.dtype != dtypes[name]:
                tensor.data = tensor.data.to(dtypes[name])


def summarize_reports(reports: dict[int, ReconstructionReport]) -> dict[str, Any]:
    """One JSON-ready summary of a run's block reports: where the time went and how far the fits got.

    Errors are means over blocks; `best_epochs` lists each block's kept epoch (0: the solver's weights
    were already best), so a run whose fits all stop early shows it was given more epochs than it used.
    """
    if not reports:
        return {}
    rows = [reports[index] for index in sorted(reports)]
    heldout = [r for r in rows if r.heldout_before is not None]
    summary: dict[str, Any] = {
        "blocks": len(rows),
        "seconds": sum(r.seconds for r in rows),
        "epochs_run": sum(r.epochs for r in rows),
        "best_epochs": [r.best_epoch for r in rows],
        "train_error_before": sum(r.train_before for r in rows) / len(rows),
        "train_error_after": sum(r.train_after for r in rows) / len(rows),
    }
    if heldout:
        summary["heldout_error_before"] = sum(r.heldout_before for r in heldout) / len(heldout)
        summary["heldout_error_after"] = sum(r.heldout_after for r in heldout) / len(heldout)
    return summary


class DenseStream:
    """The dense model's activations, carried beside the pruned ones so each block has its targets.

    `targets(block)` must run before the block is pruned (its dense output on the dense inputs);
    `advance` then moves the stream on to the next block.
    """

    def __init__(self, inputs: BlockInputs):
        self.inputs = inputs
        self.hidden = inputs.hidden

    @torch.no_grad()
    def targets(self, block: nn.Module) -> list[torch.Tensor]:
        return self.inputs.run_windows(block, self.hidden)

    def reconstruct(
        self,
        block: nn.Module,
        layers: list[PrunableLayer],
        masks: dict[str, torch.Tensor],
        targets: list[torch.Tensor],
        config: SparsityConfig,
    ) -> ReconstructionReport:
        sources = self.inputs.hidden if config.reconstruction_inputs == "pruned" else self.hidden
        report = reconstruct_block(block, layers, masks, self.inputs, sources, targets, config)
        logger.info(
            "reconstructed %d layers: error %.4g -> %.4g (held out %s), best epoch %d of %d, %.1f s",
            len(layers),
            report.train_before,
            report.train_after,
            "n/a" if report.heldout_before is None else f"{report.heldout_before:.4g} -> {report.heldout_after:.4g}",
            report.best_epoch,
            report.epochs,
            report.seconds,
        )
        return report

    def advance(self, targets: list[torch.Tensor]) -> None:
        self.hidden = targets
