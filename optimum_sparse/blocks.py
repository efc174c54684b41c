"""What one block sees during pruning, and the tools a solver uses on it.

`BlockInputs` holds the calibration activations entering a block and the extra call arguments
(attention mask, rotary tables, ...) recorded from the model's own forward pass. `BlockContext` is
what the engine hands to every solver's `prune_block` (the `BlockView` the solvers are written
against): it runs the block, collects statistics, captures activations, prunes single layers with a
per-layer solver and writes results back, recording masks in the run's `PruningResult`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer, get_weight
from optimum_sparse.distributed import broadcast, rank_and_world
from optimum_sparse.solvers import LayerResult, LayerStatistics, Solver

logger = logging.getLogger(__name__)


@dataclass
class PruningResult:
    """What a pruning run did: the masks (bool, (out, in), on CPU), per-layer sparsity, time taken."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    #: relative reconstruction error ||X(W - W')^T||^2 / ||X W^T||^2 per layer (Hessian methods)
    layer_errors: dict[str, float] = field(default_factory=dict)
    #: reports that block-level solvers return from `prune_block` (pg's block objective, SparseLLM), by block
    block_reports: dict[int, object] = field(default_factory=dict)
    #: {layer name: target sparsity} when layer budgets were set (OWL or explicit); empty: uniform
    budgets: dict[str, float] = field(default_factory=dict)
    #: block reconstruction's report per block (`optimum_sparse.reconstruction.ReconstructionReport`)
    reconstruction: dict[int, object] = field(default_factory=dict)
    seconds: float = 0.0
    #: (kept, total) weights per pruned layer: outlives `masks`, which a run from disk drops block by block
    layer_counts: dict[str, tuple[int, int]] = field(default_factory=dict)

    def record_mask(self, name: str, mask: torch.Tensor) -> None:
        """Keep a layer's mask (bool, on CPU) with its counts and sparsity."""
        self.masks[name] = mask
        kept = int(mask.sum())
        self.layer_counts[name] = (kept, mask.numel())
        self.layer_sparsity[name] = 1.0 - kept / max(mask.numel(), 1)

    def drop_masks(self, names: list[str]) -> None:
        """Forget these layers' masks, keeping their counts: a bool mask is a byte per weight, 6.5 GB over
        a 7B model, while a run from disk has written the zeros to its output already."""
        for name in names:
            self.masks.pop(name, None)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers (every mask is recorded through `record_mask`)."""
        kept = sum(k for k, _ in self.layer_counts.values())
        return 1.0 - kept / max(sum(t for _, t in self.layer_counts.values()), 1)


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
    """Calibration activations entering a block, plus the extra call arguments to replay.

    The activations are kept on the CPU in the model's dtype (`capture_block_inputs`); each window goes
    to `device`, where the block runs, when its turn comes, and its output comes back. On a GPU this keeps
    128 x 2048 tokens of a 7B model's activations (2 GiB in bfloat16, twice that in and out) off the
    accelerator; on a CPU run nothing moves.
    """

    hidden: list[torch.Tensor]
    args: tuple
    kwargs: dict
    hidden_in_kwargs: bool
    #: (args, kwargs) each block received, as the model passed them (not moved); None: every block gets
    #: `args`/`kwargs`. Models mixing layer types (Gemma 2/3: sliding-window and global layers) hand each
    #: block its own attention mask and rotary tables.
    per_block: list[tuple[tuple, dict]] | None = None
    #: where the blocks run (None: where the activations are)
    device: torch.device | None = None

    @property
    def compute_device(self) -> torch.device:
        return self.device if self.device is not None else self.hidden[0].device

    def use_block(self, index: int) -> None:
        """Replay the extra arguments block `index` received in the model's own forward pass."""
        if self.per_block is not None and index < len(self.per_block):
            device = self.compute_device
            self.args, self.kwargs = _to(self.per_block[index][0], device), _to(self.per_block[index][1], device)

    #: most tokens per batched block call when replaying the windows (`run_windows`); 0 disables batching;
    #: None (default): batch on accelerators only. On CPU, batching was slower (SmolLM2 Wanda 50%, 32 x 512
    #: tokens, 2 threads: 68.5 s batched against 60.6 s one window at a time).
    batch_tokens: int | None = None

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output for one window (or a batch), on the compute device."""
        hidden = hidden.to(self.compute_device)
        if self.hidden_in_kwargs:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def run_windows(self, block: nn.Module, windows: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run calibration windows (default: all) through `block`; one output per window, in order, each
        on the device its window came from (the CPU for the activations the engine keeps).

        On accelerators (or whenever `batch_tokens` > 0) windows of equal shape are stacked along the
        batch axis, up to `batch_tokens` tokens per call, so that a GPU gets large matrix products. The recorded
        extra arguments (attention mask, rotary tables) have batch size 1 and broadcast. Should a
        block refuse a batch, or answer with the wrong shape, batching is switched off for this run
        and the windows go one by one (the results are the same either way).
        """
        windows = self.hidden if windows is None else windows
        per_call = self._windows_per_call(windows)
        if per_call > 1:
            try:
                outputs = []
                for start in range(0, len(windows), per_call):
                    chunk = torch.cat(windows[start : start + per_call])
                    out = self.run(block, chunk)
                    if out.shape != chunk.shape:
                        raise ValueError(f"batched block output {tuple(out.shape)} != input {tuple(chunk.shape)}")
                    out = out.to(chunk.device)
                    outputs.extend(out.split([w.shape[0] for w in windows[start : start + per_call]]))
                return outputs
            except Exception as error:  # noqa: BLE001 - any failure means: do not batch this model
                logger.debug("batched block call failed (%s); running windows one at a time", error)
                self.batch_tokens = 0
        return [self.run(block, hidden).to(hidden.device) for hidden in windows]

    def _windows_per_call(self, windows: list[torch.Tensor]) -> int:
        budget = self.batch_tokens
        if budget is None:
            budget = 0 if not windows or self.compute_device.type == "cpu" else 8192
        if budget <= 0 or len(windows) < 2:
            return 1
        shape = windows[0].shape
        if len(shape) != 3 or shape[0] != 1 or any(w.shape != shape for w in windows):
            return 1
        return max(1, min(len(windows), budget // shape[1]))


class BlockSource(Protocol):
    """Where block weights come from when the model is not in memory (`optimum_sparse.streaming`)."""

    def load(self, index: int) -> None:
        """Materialise block `index`'s weights."""

    def release(self, index: int) -> None:
        """Drop them again, unchanged (after a pass that only reads the block)."""

    def finish(self, index: int) -> None:
        """Write the pruned block out and drop it."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    device: torch.device,
    source: BlockSource | None = None,
) -> BlockInputs:
    """Run the model up to block 0 on each window and record what block 0 receives (on the CPU).

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
            hidden.append(states.detach().to("cpu"))
            replay.setdefault("in_kwargs", in_kwargs)
        per_block.setdefault(index, (rest, kwargs))
        if len(per_block) == len(blocks) or len(hidden) > 1:
            raise _StopForward

    handles = [
        block.register_forward_pre_hook(lambda m, a, k, i=i: pre_hook(m, a, k, i), with_kwargs=True)
        for i, block in enumerate(blocks)
    ]
    if source is not None:  # blocks on disk: each is read for the one window that runs through them all
        for i, block in enumerate(blocks):
            handles.insert(0, block.register_forward_pre_hook(lambda m, a, i=i: source.load(i)))
            handles.append(block.register_forward_hook(lambda m, a, o, i=i: source.release(i)))
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
    return BlockInputs(hidden, _to(args, device), _to(kwargs, device), replay["in_kwargs"], order, device=device)


def input_groups(block: nn.Module, layers: list[PrunableLayer], inputs: BlockInputs) -> list[list[PrunableLayer]]:
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
def collect_statistics(
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
        inputs.run_windows(block)
    finally:
        for h in handles:
            h.remove()
    for shared in {id(s): s for s in stats.values()}.values():
        shared.all_reduce()  # a distributed run: every rank gets the statistics of all the windows
    return stats


def _relative_error(original: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor | None) -> float | None:
    if hessian is None:
        return None
    delta = original - new
    num = torch.sum((delta @ hessian) * delta)
    den = torch.sum((original @ hessian) * original).clamp_min(1e-30)
    return float(num / den)


@torch.no_grad()
def prune_and_write(
    layer: PrunableLayer,
    stats: LayerStatistics | None,
    solver: Solver,
    refit: Solver | None,
    fixed_mask: torch.Tensor | None,
    device: torch.device,
    result: PruningResult,
) -> LayerResult:
    weight = get_weight(layer.module)
    # a real (contiguous) copy: the parameter is overwritten below and the error is measured against this
    original = weight.detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format)
    if fixed_mask is not None:
        outcome = (refit or solver).refit_layer(original.clone(), fixed_mask.to(device), stats)
    else:
        outcome = solver.prune_layer(original.clone(), stats)
        if refit is not None:
            outcome = refit.refit_layer(original.clone(), outcome.mask, stats)
    _write(layer, original, outcome, stats, result, solver.name)
    return outcome


@torch.no_grad()
def _write(
    layer: PrunableLayer,
    original: torch.Tensor,
    outcome: LayerResult,
    stats: LayerStatistics | None,
    result: PruningResult,
    who: str,
) -> None:
    """Copy the new weight into the model (its dtype/device) and record mask, sparsity and error."""
    if not torch.isfinite(outcome.weight).all():
        raise FloatingPointError(f"{who} produced non-finite weights for {layer.name}")
    weight = get_weight(layer.module)
    weight.copy_(outcome.weight.to(weight.device, weight.dtype))
    result.record_mask(layer.name, outcome.mask.to("cpu", torch.bool))
    error = _relative_error(original, outcome.weight.to(original.device), stats.hessian if stats is not None else None)
    if error is not None:
        result.layer_errors[layer.name] = error
        logger.debug("%s: sparsity %.3f, relative error %.4g", layer.name, result.layer_sparsity[layer.name], error)


@torch.no_grad()
def share_layer(layer: PrunableLayer, owner: int, result: PruningResult) -> LayerResult:
    """Broadcast the weights, mask and error that rank `owner` computed for `layer`, and record them."""
    weight = get_weight(layer.module)
    broadcast(layer.module.weight.data, owner)
    device = weight.device
    mask = result.masks.get(layer.name)
    mask = (
        mask.to(device, torch.uint8)
        if mask is not None
        else torch.zeros(weight.shape, dtype=torch.uint8, device=device)
    )
    broadcast(mask, owner)
    error = torch.tensor([result.layer_errors.get(layer.name, float("nan"))], dtype=torch.float64, device=device)
    broadcast(error, owner)
    result.record_mask(layer.name, mask.to("cpu", torch.bool))
    if not torch.isnan(error).item():
        result.layer_errors[layer.name] = float(error.item())
    return LayerResult(weight.detach().float().clone(), result.masks[layer.name])


@dataclass
class BlockContext:
    """One block being pruned: what every solver's `prune_block` works with (see `solvers.base.BlockView`)."""

    block: nn.Module
    index: int
    layers: list[PrunableLayer]
    #: the calibration activations; None for methods that need no data (each layer is then its own group)
    inputs: BlockInputs | None
    device: torch.device
    with_hessian: bool
    result: PruningResult
    refit: Solver | None = None
    #: the model's config, for block-level solvers that need the architecture (head counts)
    model_config: object | None = None
    #: the block's full module name (e.g. "model.layers.3"), for solvers that name its modules
    name: str = ""
    #: {layer name: keep-mask} in weight-update-only mode: listed layers are refitted, the others left alone
    fixed_masks: dict[str, torch.Tensor] | None = None
    #: {layer name: sparsity} when layer budgets differ from the config's sparsity (`optimum_sparse.budgets`)
    layer_sparsity: dict[str, float] | None = None
    #: layers solved so far in this block (a distributed run hands them to the ranks in turn)
    _solved: int = 0

    def groups(self, layers: list[PrunableLayer] | None = None) -> list[list[PrunableLayer]]:
        """Layers grouped by shared input tensor (q/k/v; gate/up), in call order."""
        layers = self.layers if layers is None else layers
        if self.inputs is None:
            return [[layer] for layer in layers]
        return [g for g in input_groups(self.block, layers, self.inputs) if g]

    def statistics(self, groups: list[list[PrunableLayer]]) -> dict[str, LayerStatistics | None]:
        """One calibration pass of the block (current weights) accumulating statistics for `groups`."""
        if self.inputs is None:
            return {layer.name: None for group in groups for layer in group}
        return collect_statistics(self.block, groups, self.inputs, self.with_hessian, self.device)

    @property
    def num_tokens(self) -> int:
        """Calibration tokens flowing through the block (all windows): the row count of `capture`'s tensors."""
        return sum(h.numel() // h.shape[-1] for h in self.inputs.hidden)

    @torch.no_grad()
    def capture(
        self,
        modules: dict[str, nn.Module],
        dtype: torch.dtype = torch.float32,
        *,
        parts: dict[str, str] | None = None,
        max_windows: int | None = None,
    ) -> dict[str, tuple]:
        """Run the calibration windows through the block; return {name: (inputs, outputs)} of `modules`.

        Each is a (tokens x features) tensor in `dtype` on the working device: the raw activations that
        block-level solvers need beyond the Hessian. Memory: tokens x (in + out) per module.

        `parts` ({name: "inputs" | "outputs" | "both"}, default "both") keeps only what is needed (the
        other entry of the pair is None), which halves the memory of large captures. `max_windows`
        runs only the first windows (cheap probes, e.g. checking how modules are wired).
        """
        parts = parts or {}
        for name in modules:
            if parts.get(name, "both") not in ("inputs", "outputs", "both"):
                raise ValueError(f"parts[{name!r}] must be 'inputs', 'outputs' or 'both', got {parts[name]!r}")
        seen: dict[str, tuple[list, list]] = {name: ([], []) for name in modules}
        handles = []
        for name, module in modules.items():
            keep = parts.get(name, "both")

            def hook(m, i, o, name=name, keep=keep):
                if keep != "outputs":
                    seen[name][0].append(i[0].detach().reshape(-1, i[0].shape[-1]).to(self.device, dtype))
                if keep != "inputs":
                    out = o[0] if isinstance(o, (tuple, list)) else o
                    seen[name][1].append(out.detach().reshape(-1, out.shape[-1]).to(self.device, dtype))

            handles.append(module.register_forward_hook(hook))
        windows = self.inputs.hidden if max_windows is None else self.inputs.hidden[:max_windows]
        try:
            self.inputs.run_windows(self.block, windows)
        finally:
            for h in handles:
                h.remove()
        return {name: tuple(torch.cat(t) if t else None for t in pair) for name, pair in seen.items()}

    def prune_layer(self, layer: PrunableLayer, stats: LayerStatistics | None, solver: Solver) -> LayerResult:
        """Prune one layer with a per-layer `solver` (then the run's weight update, if any) and record it.

        On fixed masks the layer's given mask is refitted instead (by the weight update, else `solver`).
        """
        mask = self.fixed_masks.get(layer.name) if self.fixed_masks is not None else None
        if self.fixed_masks is not None and mask is None:
            raise ValueError(f"{layer.name} has no fixed mask: in weight-update-only mode only masked layers change")
        refit = self.refit
        if self.layer_sparsity is not None and layer.name in self.layer_sparsity:
            solver = solver.with_sparsity(self.layer_sparsity[layer.name])
            refit = refit.with_sparsity(self.layer_sparsity[layer.name]) if refit is not None else None
        rank, world = rank_and_world()
        if world == 1:
            return prune_and_write(layer, stats, solver, refit, mask, self.device, self.result)
        # distributed: the layers of a block are solved round-robin over the ranks, then shared
        owner = self._solved % world
        self._solved += 1
        if rank == owner:
            prune_and_write(layer, stats, solver, refit, mask, self.device, self.result)
        return share_layer(layer, owner, self.result)

    def write(self, layer: PrunableLayer, outcome: LayerResult, stats: LayerStatistics | None = None) -> None:
        """Write weights a block-level solver computed itself, checking them and recording the mask."""
        original = get_weight(layer.module).detach().to(self.device, torch.float32).clone()
        _write(layer, original, outcome, stats, self.result, "block solver")
