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
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from optimum_sparse.architecture import PrunableLayer, find_blocks, find_prunable_layers, get_weight
from optimum_sparse.calibration import CalibrationSource, get_calibration_data
from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import LayerStatistics, Solver, get_solver_class

logger = logging.getLogger(__name__)


@dataclass
class PruningResult:
    """What a pruning run did: the masks (bool, (out, in), on CPU), per-layer sparsity, time taken."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    #: relative reconstruction error ||X(W - W')^T||^2 / ||X W^T||^2 per layer (Hessian methods)
    layer_errors: dict[str, float] = field(default_factory=dict)
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


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors nested in tuples/lists/dicts to `device` (caches and other objects are kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _StopForward(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded."""


@dataclass
class BlockInputs:
    """Calibration activations entering a block, plus the extra call arguments to replay."""

    hidden: list[torch.Tensor]
    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool
    #: (args, kwargs) each block received, as the model passed them (not moved); None: every block gets
    #: `args`/`kwargs`. Models mixing layer types (Gemma 2/3: sliding-window and global layers) hand each
    #: block its own attention mask and rotary tables.
    per_block: list[tuple[tuple, dict]] | None = None

    def use_block(self, index: int) -> None:
        """Replay the extra arguments block `index` received in the model's own forward pass."""
        if self.per_block is not None and index < len(self.per_block):
            device = self.hidden[0].device
            self.args, self.kwargs = _to(self.per_block[index][0], device), _to(self.per_block[index][1], device)

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_in_kwargs:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device
) -> BlockInputs:
    """Run the model up to block 0 on each window and record what block 0 receives.

    The first window runs through every block (one full forward pass) to record the extra arguments
    each block is given, which differ per block in models that mix layer types.
    """
    hidden: list[torch.Tensor] = []
    replay: dict[str, Any] = {}
    per_block: dict[int, tuple[tuple, dict]] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict, index: int):
        if args:
            states, rest, in_kwargs = args[0], args[1:], False
        else:
            kwargs = dict(kwargs)
            states, rest, in_kwargs = kwargs.pop("hidden_states"), (), True
        if index == 0:
            hidden.append(states.detach().to(device))
            replay.setdefault("in_kwargs", in_kwargs)
        per_block.setdefault(index, (rest, kwargs))
        if len(per_block) == len(blocks) or len(hidden) > 1:
            raise _StopForward

    handles = [
        block.register_forward_pre_hook(lambda m, a, k, i=i: pre_hook(m, a, k, i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    input_device = model.get_input_embeddings().weight.device
    try:
        for row in windows:
            try:
                model(input_ids=row.unsqueeze(0).to(input_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if not hidden:
        raise RuntimeError("block 0 was never called; is this a decoder model with repeated blocks?")
    order = [per_block[i] for i in range(len(blocks))] if len(per_block) == len(blocks) else None
    args, kwargs = per_block[0]
    return BlockInputs(hidden, _to(args, device), _to(kwargs, device), replay["in_kwargs"], order)


def _input_groups(block: nn.Module, layers: list[PrunableLayer], inputs: BlockInputs) -> list[list[PrunableLayer]]:
    """Split a block's target layers into groups that read the same input tensor, in call order."""
    # the inputs themselves are kept alive, so equal (address, shape, stride) means the same tensor
    seen: list[tuple[PrunableLayer, torch.Tensor]] = []
    handles = [
        layer.module.register_forward_hook(lambda m, i, o, layer=layer: seen.append((layer, i[0]))) for layer in layers
    ]
    try:
        inputs.run(block, inputs.hidden[0][:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[PrunableLayer]] = []
    last = None
    for layer, tensor in seen:
        if any(layer is other for group in groups for other in group):
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if groups and key == last:
            groups[-1].append(layer)
        else:
            groups.append([layer])
        last = key
    missing = [layer for layer in layers if not any(layer is o for g in groups for o in g)]
    return groups + ([missing] if missing else [])


@torch.no_grad()
def _collect_statistics(
    block: nn.Module,
    groups: list[list[PrunableLayer]],
    inputs: BlockInputs,
    with_hessian: bool,
    device: torch.device,
) -> dict[str, LayerStatistics]:
    """One `LayerStatistics` per input group (q/k/v share one), keyed by every layer name of the group."""
    stats: dict[str, LayerStatistics] = {}
    handles = []
    for group in groups:
        shared = LayerStatistics(group[0].in_features, with_hessian, device)
        stats.update({layer.name: shared for layer in group})
        handles.append(group[0].module.register_forward_hook(lambda m, i, o, s=shared: s.update(i[0])))
    try:
        for hidden in inputs.hidden:
            inputs.run(block, hidden)
    finally:
        for h in handles:
            h.remove()
    return stats


def _relative_error(original: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor | None) -> float | None:
    if hessian is None:
        return None
    delta = original - new
    num = torch.sum((delta @ hessian) * delta)
    den = torch.sum((original @ hessian) * original).clamp_min(1e-30)
    return float(num / den)


@torch.no_grad()
def _prune_layer(
    layer: PrunableLayer,
    stats: LayerStatistics | None,
    solver: Solver,
    refit: Solver | None,
    fixed_mask: torch.Tensor | None,
    device: torch.device,
    result: PruningResult,
) -> None:
    weight = get_weight(layer.module)
    # a real (contiguous) copy: the parameter is overwritten below and the error is measured against this
    original = weight.detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format)
    if fixed_mask is not None:
        outcome = (refit or solver).refit_layer(original.clone(), fixed_mask.to(device), stats)
    else:
        outcome = solver.prune_layer(original.clone(), stats)
        if refit is not None:
            outcome = refit.refit_layer(original.clone(), outcome.mask, stats)
    if not torch.isfinite(outcome.weight).all():
        raise FloatingPointError(f"{solver.name} produced non-finite weights for {layer.name}")
    weight.copy_(outcome.weight.to(weight.device, weight.dtype))
    mask = outcome.mask.to("cpu", torch.bool)
    result.masks[layer.name] = mask
    result.layer_sparsity[layer.name] = 1.0 - float(mask.sum()) / mask.numel()
    error = _relative_error(original, outcome.weight, stats.hessian if stats is not None else None)
    if error is not None:
        result.layer_errors[layer.name] = error
        logger.debug("%s: sparsity %.3f, relative error %.4g", layer.name, result.layer_sparsity[layer.name], error)


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
    _, blocks = find_blocks(model)
    solver = get_solver_class(config.method)(config)
    refit = get_solver_class(config.weight_update)(config) if config.weight_update else None
    needs_data = solver.requires_calibration or refit is not None or fixed_masks is not None
    with_hessian = (
        solver.requires_hessian
        or refit is not None
        or (fixed_masks is not None and getattr(solver, "requires_hessian", False))
    )
    device = resolve_device(config.device)
    result = PruningResult()
    desc = f"Pruning ({config.describe()})"
    was_training = model.training
    model.eval()
    try:
        if not needs_data:
            for index in tqdm(range(len(blocks)), desc=desc, disable=not show_progress):
                for layer in per_block[index]:
                    _prune_layer(layer, None, solver, None, None, device, result)
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
            groups = [g for g in _input_groups(block, per_block[index], inputs) if g]
            # sequential_update: calibrate each group after the groups before it are pruned
            passes = [[group] for group in groups] if config.sequential_update else [groups]
            for pass_groups in passes:
                stats = _collect_statistics(block, pass_groups, inputs, with_hessian, device)
                for layer in (layer for group in pass_groups for layer in group):
                    mask = fixed_masks.get(layer.name) if fixed_masks is not None else None
                    if fixed_masks is not None and mask is None:
                        continue
                    _prune_layer(layer, stats.pop(layer.name), solver, refit, mask, device, result)
            with torch.no_grad():
                inputs.hidden = [inputs.run(block, hidden) for hidden in inputs.hidden]
            block.to(home)
            if on_block_done:
                on_block_done(index)
        return result
    finally:
        result.seconds = time.perf_counter() - start
        model.train(was_training)
