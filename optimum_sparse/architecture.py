"""Finding what to prune in an arbitrary transformers model, without per-architecture tables.

The repeated decoder (or encoder) blocks are the longest `nn.ModuleList` whose children all share
one class; every `nn.Linear` or transformers `Conv1D` inside a block is a candidate, filtered by the
config's `targets` / `ignore` regexes. This covers Llama, Mistral, Qwen, Gemma, Phi, OPT, GPT-2,
GPT-NeoX and BERT-style encoders alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from optimum_sparse.config import SparsityConfig

try:  # transformers' GPT-2 style linear with (in, out) weight layout
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


PRUNABLE_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the model's repeated blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(isinstance(m, PRUNABLE_TYPES) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find repeated transformer blocks in {type(model).__name__}: no nn.ModuleList of "
            "identical modules containing linear layers"
        )
    return best


def is_transposed(module: nn.Module) -> bool:
    """True for Conv1D, whose weight is stored as (in_features, out_features)."""
    return not isinstance(module, nn.Linear)


def in_features_of(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed(module) else module.weight.shape[1]


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) layout, as a view (no copy)."""
    return module.weight.t() if is_transposed(module) else module.weight


@dataclass
class PrunableLayer:
    name: str  # full module name inside the model
    module: nn.Module

    @property
    def in_features(self) -> int:
        return in_features_of(self.module)


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(re.search(p, name) for p in patterns or [])


def find_prunable_layers(model: nn.Module, config: SparsityConfig) -> dict[int, list[PrunableLayer]]:
    """Target layers grouped by block index, in execution-friendly module order.

    Raises a ValueError naming the fix when a target regex matches nothing, or when an N:M pattern
    does not divide a target layer's input width.
    """
    blocks_name, blocks = find_blocks(model)
    per_block: dict[int, list[PrunableLayer]] = {}
    matched_targets: set[str] = set()
    for index, block in enumerate(blocks):
        layers = []
        for sub_name, module in block.named_modules():
            if not isinstance(module, PRUNABLE_TYPES):
                continue
            full = f"{blocks_name}.{index}.{sub_name}"
            if config.targets is not None:
                hits = [p for p in config.targets if re.search(p, full)]
                if not hits:
                    continue
                matched_targets.update(hits)
            if _matches(full, config.ignore_patterns):
                continue
            layers.append(PrunableLayer(full, module))
        per_block[index] = layers
    if config.targets is not None:
        missing = [p for p in config.targets if p not in matched_targets]
        if missing:
            examples = [layer.name for layer in _all_linears(model, blocks_name, blocks)[:6]]
            raise ValueError(
                f"target pattern(s) {missing} match no linear layer inside the blocks; module names look "
                f"like {examples}"
            )
    if not any(per_block.values()):
        raise ValueError("no layer left to prune: every linear layer is excluded by `ignore`/`targets`")
    if config.nm is not None:
        n, m = config.nm
        for layers in per_block.values():
            for layer in layers:
                if layer.in_features % m:
                    raise ValueError(
                        f"pattern {n}:{m} needs input widths divisible by {m}, but {layer.name} has "
                        f"{layer.in_features} inputs; exclude it with ignore=[...] or choose another M"
                    )
    return per_block


def _all_linears(model: nn.Module, blocks_name: str, blocks: nn.ModuleList) -> list[PrunableLayer]:
    return [
        PrunableLayer(f"{blocks_name}.0.{n}", m) for n, m in blocks[0].named_modules() if isinstance(m, PRUNABLE_TYPES)
    ]
