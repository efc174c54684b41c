"""Structured units of a decoder: MLP intermediate channels and attention KV groups.

A unit is what a channel-pruned model removes as a whole:
- an MLP channel: one row of each input projection (gate/up, fc1, c_fc) and one column of the
  output projection (down, fc2, c_proj);
- an attention KV group: one key/value head, the query heads that share it under grouped-query
  attention (all of a head's rows when there is no GQA: then a group is a head) and the matching
  columns of the output projection.

Removing a unit from the masked model and slicing it out of the layers give the same function,
which is what lets a sampled sub-model be either masked (cheap, any device) or instantiated as a
smaller dense model. Layouts are recognised by the projection names of Llama-style models
(Llama, Mistral, Qwen2/3, Gemma 2/3), OPT and GPT-2 (fused c_attn, Conv1D weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from optimum_sparse.architecture import find_blocks, get_weight, in_features_of

# (query, key, value, output) projection names inside one attention module; "qkv" is a fused layer
ATTENTION_LAYOUTS = (
    {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},  # Llama, Mistral, Qwen, Gemma
    {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"},  # OPT
    {"qkv": "c_attn", "o": "c_proj"},  # GPT-2
)
# (input projections, output projection) of an MLP; the module holding them may be the block itself (OPT)
MLP_LAYOUTS = (
    (("gate_proj", "up_proj"), "down_proj"),  # Llama-style SwiGLU
    (("fc1",), "fc2"),  # OPT
    (("c_fc",), "c_proj"),  # GPT-2
)


@dataclass
class UnitSlice:
    """The features of one layer that belong to the units: output rows ("out") or input columns ("in").

    Unit u owns features [offset + u * width, offset + (u + 1) * width) for every offset (a fused
    q/k/v layer has three sections).
    """

    owner: nn.Module  # the module that holds the layer as attribute `attr`
    attr: str
    side: str  # "out" | "in"
    width: int
    offsets: tuple[int, ...] = (0,)

    @property
    def layer(self) -> nn.Module:
        return getattr(self.owner, self.attr)

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Feature indices owned by `units` (sorted unit indices), section by section."""
        units = units.reshape(-1).long().cpu()
        within = torch.arange(self.width)
        per_section = (units.unsqueeze(1) * self.width + within.unsqueeze(0)).reshape(-1)
        return torch.cat([per_section + offset for offset in self.offsets])

    def cost_per_unit(self) -> int:
        """Parameters one unit owns in this layer (bias entries included for output rows)."""
        layer = self.layer
        weight = get_weight(layer)
        if self.side == "out":
            has_bias = getattr(layer, "bias", None) is not None
            return self.width * len(self.offsets) * (weight.shape[1] + int(has_bias))
        return self.width * weight.shape[0]


@dataclass
class ChannelGroup:
    """The units of one MLP or one attention module (one block has one of each)."""

    name: str  # full name of the module holding the layers
    kind: str  # "mlp" | "attention"
    module: nn.Module
    num_units: int
    slices: list[UnitSlice]
    heads_per_unit: int = 1  # query heads per KV group (attention)
    offset: int = 0  # first index of this group in the flat vector of all units
    extra: dict = field(default_factory=dict)

    @property
    def consumer(self) -> UnitSlice:
        """The output projection, whose inputs are masked to remove units."""
        return next(s for s in self.slices if s.side == "in")

    @property
    def unit_cost(self) -> int:
        return sum(s.cost_per_unit() for s in self.slices)

    @property
    def units(self) -> slice:
        return slice(self.offset, self.offset + self.num_units)


def _child(module: nn.Module, name: str) -> nn.Module | None:
    return module._modules.get(name)


def _head_counts(config, hidden: int) -> tuple[int, int, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return heads, kv_heads, head_dim


def _attention_group(name: str, module: nn.Module, config) -> ChannelGroup | None:
    for layout in ATTENTION_LAYOUTS:
        if not all(_child(module, attr) is not None for attr in layout.values()):
            continue
        output = _child(module, layout["o"])
        heads, kv_heads, head_dim = _head_counts(config, get_weight(output).shape[0])
        if heads % kv_heads:
            raise ValueError(f"{name}: {heads} query heads do not split into {kv_heads} KV groups")
        per_group = heads // kv_heads
        if in_features_of(output) != heads * head_dim:
            raise ValueError(
                f"{name}: output projection reads {in_features_of(output)} features, expected "
                f"{heads} heads x {head_dim}"
            )
        o_slice = UnitSlice(module, layout["o"], "in", per_group * head_dim)
        if "qkv" in layout:
            if kv_heads != heads:
                raise ValueError(f"{name}: fused q/k/v with grouped-query attention is not supported")
            size = heads * head_dim
            slices = [UnitSlice(module, layout["qkv"], "out", head_dim, (0, size, 2 * size)), o_slice]
        else:
            slices = [
                UnitSlice(module, layout["q"], "out", per_group * head_dim),
                UnitSlice(module, layout["k"], "out", head_dim),
                UnitSlice(module, layout["v"], "out", head_dim),
                o_slice,
            ]
        extra = {"head_dim": head_dim, "fused_qkv": "qkv" in layout}
        return ChannelGroup(name, "attention", module, kv_heads, slices, per_group, extra=extra)
    return None


def _mlp_group(name: str, module: nn.Module) -> ChannelGroup | None:
    for inputs, output in MLP_LAYOUTS:
        layers = [_child(module, attr) for attr in (*inputs, output)]
        if any(layer is None for layer in layers):
            continue
        if any(isinstance(layer, nn.Module) and not hasattr(layer, "weight") for layer in layers):
            continue
        width = in_features_of(layers[-1])
        slices = [UnitSlice(module, attr, "out", 1) for attr in inputs] + [UnitSlice(module, output, "in", 1)]
        for unit_slice in slices[:-1]:
            if get_weight(unit_slice.layer).shape[0] != width:
                raise ValueError(
                    f"{name}.{unit_slice.attr} has {get_weight(unit_slice.layer).shape[0]} outputs, "
                    f"but {name}.{output} reads {width}"
                )
        return ChannelGroup(name, "mlp", module, width, slices)
    return None


def block_channel_groups(block: nn.Module, prefix: str, config) -> list[ChannelGroup]:
    """[attention group, MLP group] of one block (`prefix`: the block's full name; offsets from 0).

    `config` is the model's config (its text config gives the head counts).
    """
    config = text_config(config)
    found: dict[str, ChannelGroup] = {}
    for sub_name, module in block.named_modules():
        full = prefix + (f".{sub_name}" if sub_name else "")
        if "attention" not in found:
            group = _attention_group(full, module, config)
            if group is not None:
                found["attention"] = group
                continue
        if "mlp" not in found:
            group = _mlp_group(full, module)
            if group is not None:
                found["mlp"] = group
    if len(found) < 2:
        missing = {"attention", "mlp"} - set(found)
        raise ValueError(
            f"block {prefix} ({type(block).__name__}): no {' / '.join(sorted(missing))} layout "
            f"recognised; channel pruning knows {[list(layout.values()) for layout in ATTENTION_LAYOUTS]} "
            f"and {[[*i, o] for i, o in MLP_LAYOUTS]}"
        )
    return set_offsets([found["attention"], found["mlp"]])


def text_config(config):
    """The part of a model's config holding the head counts (multimodal: the text config), or a ValueError."""
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError("channel units need model.config.num_attention_heads (a transformers model)")
    return config


def set_offsets(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Give the groups consecutive flat offsets (in list order); returns them."""
    offset = 0
    for group in groups:
        group.offset = offset
        offset += group.num_units
    return groups


def find_channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The attention and MLP unit groups of every block, in block order, with flat offsets set."""
    blocks_name, blocks = find_blocks(model)
    config = text_config(getattr(model, "config", None))  # checked once, before any block
    groups: list[ChannelGroup] = []
    for index, block in enumerate(blocks):
        groups.extend(block_channel_groups(block, f"{blocks_name}.{index}", config))
    return set_offsets(groups)


def unit_costs(groups: list[ChannelGroup], device: torch.device | str = "cpu") -> torch.Tensor:
    """Parameter cost of every unit, in flat order (float64)."""
    return torch.cat(
        [torch.full((g.num_units,), float(g.unit_cost), dtype=torch.float64, device=device) for g in groups]
    )
