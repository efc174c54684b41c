"""Prune a checkpoint larger than memory: one block's weights in memory at a time, read and written by shard.

`prune()` needs the whole model in memory. `prune_checkpoint` builds the model's skeleton without
weights (accelerate's `init_empty_weights`), loads only what sits outside the decoder blocks
(embeddings, final norm, head), and around the engine's block loop reads each block's tensors from the
safetensors shards when its turn comes and, once pruned, writes them to the output as a shard of their
own and drops them again. Neither reading nor saving ever holds more than one block (llm-compressor
issue 1183: out of memory while saving). The calibration activations stay in the model's dtype.

The result is the in-memory run's: the same engine, the same solvers, on the same tensors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from optimum_sparse.architecture import find_blocks
from optimum_sparse.blocks import PruningResult
from optimum_sparse.calibration import CalibrationSource
from optimum_sparse.config import SparsityConfig
from optimum_sparse.sequential import prune
from optimum_sparse.solvers import get_solver_class
from optimum_sparse.solvers.base import FLOAT64_MAX_FEATURES

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def weight_map(directory: str) -> dict[str, str]:
    """{tensor name: shard file} of a safetensors checkpoint (sharded or single-file)."""
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            return dict(json.load(handle)["weight_map"])
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{directory} has no model.safetensors or {INDEX_NAME}: pruning from disk reads safetensors checkpoints "
            "(save the model with save_pretrained(..., safe_serialization=True))"
        )
    with safe_open(single, "pt") as handle:
        return {name: "model.safetensors" for name in handle.keys()}


class ShardReader:
    """Reads named tensors from the checkpoint's shards, one file handle per shard at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.map = weight_map(directory)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.map[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(os.path.join(self.directory, file), "pt") as handle:
                tensors.update({name: handle.get_tensor(name) for name in wanted})
        return tensors


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Put `value` in place of parameter/buffer `name` (None: an empty meta tensor, freeing the memory)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if value is None:
        value = torch.empty_like(current, device="meta")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _own_names(model: nn.Module, prefix: str) -> list[str]:
    """Checkpoint names of the parameters and persistent buffers under `prefix` (all when prefix is "")."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers() if n.split(".")[-1] not in _non_persistent(model, n)]
    return [n for n in names if n.startswith(prefix)]


def _non_persistent(model: nn.Module, name: str) -> set[str]:
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name) if module_name else model
    return set(getattr(module, "_non_persistent_buffers_set", set()))


class BlockStreamer:
    """Loads block i's weights before the engine prunes it, writes and frees them after."""

    def __init__(self, model: nn.Module, reader: ShardReader, output: str, blocks_name: str, num_blocks: int):
        self.model, self.reader, self.output = model, reader, output
        self.blocks_name, self.num_blocks = blocks_name, num_blocks
        self.written: dict[str, str] = {}
        #: the dtype the run holds blocks in (--dtype; the checkpoint may store another)
        self.dtype = next(model.parameters()).dtype

    def names(self, index: int) -> list[str]:
        prefix = f"{self.blocks_name}.{index}."
        return [n for n in _own_names(self.model, prefix) if n in self.reader.map]

    def load(self, index: int) -> None:
        for name, tensor in self.reader.read(self.names(index)).items():
            _set_tensor(self.model, name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def release(self, index: int) -> None:
        for name in self.names(index):
            _set_tensor(self.model, name, None)

    def finish(self, index: int) -> None:
        names = self.names(index)
        state = {name: self.model.get_parameter(name).detach().contiguous() for name in names}
        file = f"model-block-{index:05d}.safetensors"
        save_file(state, os.path.join(self.output, file), metadata={"format": "pt"})
        self.written.update({name: file for name in state})
        self.release(index)


def prune_checkpoint(
    source: str,
    output: str,
    config: SparsityConfig,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    *,
    dtype: str | torch.dtype = "auto",
    show_progress: bool = True,
    overwrite: bool = False,
) -> PruningResult:
    """Prune the safetensors checkpoint `source` into `output`, holding one block's weights at a time.

    The output is an ordinary sharded checkpoint (one shard per block plus one for the rest) with the
    source's config, generation config and tokenizer files, and `sparsity_config.json`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise FileExistsError(f"{output!r} exists and is not empty; pass overwrite=True or choose another path")
    reader = ShardReader(source)  # a missing checkpoint fails here, before any work
    model_config = AutoConfig.from_pretrained(source)
    torch_dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    if dtype != "auto":
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype)
    model.eval()
    blocks_name, blocks = find_blocks(model)
    outside = [n for n in _own_names(model, "") if not n.startswith(f"{blocks_name}.") and n in reader.map]
    for name, tensor in reader.read(outside).items():
        _set_tensor(model, name, tensor.to(torch_dtype) if tensor.is_floating_point() else tensor)
    if getattr(model_config, "tie_word_embeddings", False):
        model.tie_weights()
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)

    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".tmp-optimum-sparse-", dir=parent)
    streamer = BlockStreamer(model, reader, stage, blocks_name, len(blocks))
    try:
        result = prune(
            model,
            config,
            calibration,
            tokenizer,
            show_progress=show_progress,
            block_source=streamer,
        )
        _write_rest(model, streamer, outside, stage)
        model_config.save_pretrained(stage)
        for extra in os.listdir(source):
            if extra.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
                shutil.copy(os.path.join(source, extra), stage)
        config.save_pretrained(stage, measured_sparsity=result.sparsity, measured_layer_sparsity=result.layer_sparsity)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return result


def _write_rest(model: nn.Module, streamer: BlockStreamer, outside: list[str], stage: str) -> None:
    """The tensors outside the blocks as the last shard, and the index of every shard."""
    state, seen = {}, {}
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name in outside:
        tensor = tensors[name]
        if tensor.data_ptr() in seen:  # tied (lm_head = embeddings): saved once, as the checkpoint had it
            continue
        seen[tensor.data_ptr()] = name
        state[name] = tensor.detach().contiguous()
    save_file(state, os.path.join(stage, "model-rest.safetensors"), metadata={"format": "pt"})
    mapping = {**streamer.written, **{name: "model-rest.safetensors" for name in state}}
    total = sum(os.path.getsize(os.path.join(stage, f)) for f in set(mapping.values()))
    with open(os.path.join(stage, INDEX_NAME), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}, handle, indent=2)


def parse_size(text: str) -> int:
    """Bytes from "4GiB", "512MiB", "6GB", "1e9" (binary and decimal units)."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
    }
    lowered = text.strip().lower()
    unit = next((u for u in sorted(units, key=len, reverse=True) if lowered.endswith(u)), None)
    number, factor = (lowered[: -len(unit)].strip(), units[unit]) if unit else (lowered.rstrip("b"), 1)
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"--max-memory takes a size such as 4GiB, 512MiB or 6GB, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"--max-memory must be positive, got {text!r}")
    return int(value)


def estimate_peak_bytes(source: str, config: SparsityConfig, low_memory: bool) -> dict[str, int]:
    """What a run on the checkpoint `source` will hold at its peak, from the shard headers alone.

    weights: the whole model, or (low_memory) what sits outside the blocks plus one block; masks: a
    byte per pruned weight of every block (in memory) or of one block (low_memory: each block's masks
    are dropped once written); activations: the calibration windows entering a block and leaving it
    (twice that with block reconstruction's dense stream), in the checkpoint's dtype; solver: the
    larger of the statistics pass (float64 Hessian sums of a block's four input groups) and the solve
    (float32 copies of the largest layer, its Hessian and the factorisation, float64 up to
    FLOAT64_MAX_FEATURES inputs); reconstruction (block reconstruction, after the solve): for one
    block's weights the float32 gradients, Adam's two moments, the best epoch's copy, the keep-masks,
    the widening of half-precision weights to float32 and the optimiser step's temporaries (24 bytes a
    weight for float32 checkpoints, 26 for half precision); float32 copies of the fit's inputs and the
    dense targets when the activations are half precision; and one window's saved tensors (with eager
    attention's probabilities and their gradients). An estimate, checked before any work, not a
    measurement.
    """
    from transformers import AutoConfig

    sizes: dict[str, tuple[int, int]] = {}  # name -> (elements, bytes per element)
    matrices: set[str] = set()  # 2-D tensors: what a solver prunes and keeps a mask of
    mapping = weight_map(source)
    for file in set(mapping.values()):
        with safe_open(os.path.join(source, file), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                numel = 1
                for dim in piece.get_shape():
                    numel *= dim
                width = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(piece.get_dtype(), 4)
                sizes[name] = (numel, width)
                if len(piece.get_shape()) == 2:
                    matrices.add(name)
    total = sum(n * w for n, w in sizes.values())
    block_names = [name for name in sizes if ".0." in name and name.split(".0.")[0].endswith(("layers", "h", "blocks"))]
    one_block = sum(sizes[n][0] * sizes[n][1] for n in block_names)
    model_config = AutoConfig.from_pretrained(source)
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    layers = max(1, int(getattr(text, "num_hidden_layers", 1)))
    outside = total - one_block * layers
    width = max((w for _, w in sizes.values()), default=4)
    hidden = int(getattr(text, "hidden_size", 0))
    streams = 2 if config.reconstruction else 1
    activations = 2 * streams * config.num_samples * config.seq_len * hidden * width
    largest = max((sizes[n][0] for n in block_names), default=0)
    inter = int(getattr(text, "intermediate_size", 0) or 0)
    widest = max(hidden, inter)
    if get_solver_class(config.method).requires_hessian or config.weight_update:
        factor = 8 if widest <= FLOAT64_MAX_FEATURES else 4
        solve = 3 * largest * 4 + (8 + factor) * widest * widest
        solver = max(8 * (3 * hidden * hidden + inter * inter), solve)
    else:
        solver = 3 * largest * 4
    weights = outside + one_block if low_memory else total
    block_weights = sum(sizes[n][0] for n in block_names if n in matrices)
    masks = block_weights * (1 if low_memory else layers)
    reconstruction = 0
    if config.reconstruction:  # after the solve, so the larger of the two counts
        block_width = max((sizes[n][1] for n in block_names if n in matrices), default=4)
        # gradients, Adam's two moments, the best epoch's copy and the keep-masks (float32: 20 bytes a
        # weight), the block's own weights widened to float32, and the optimiser step's temporaries
        fit = (20 + (4 - block_width) + 4) * block_weights
        # the fit's inputs and the dense targets as float32 copies, when the activations are narrower
        copies = 0 if width >= 4 else 2 * config.num_samples * config.seq_len * hidden * 4
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        # one window's saved tensors, and eager attention's probabilities with their two gradients
        window = config.seq_len * (12 * hidden + 4 * inter) * 4 + 3 * heads * config.seq_len**2 * 4
        reconstruction = fit + copies + window
    return {
        "weights": weights,
        "masks": masks,
        "activations": activations,
        "solver": solver,
        "reconstruction": reconstruction,
        "total": weights + masks + activations + max(solver, reconstruction),
    }
