"""Saving and reloading a channel-sliced model (layers of different widths) as a transformers checkpoint.

A model sliced by `SparsityCallback.slice_model()` has, say, 1075 MLP channels in layer 0 and 1190 in
layer 1, while its `config.json` can only name one `intermediate_size`. The kept unit counts are
therefore recorded in the config itself under `sliced_units` ({module name: kept units}: MLP
channels, or KV groups of an attention module). `model.save_pretrained(dir)` writes them with the
config, and `load_sliced_model(dir)` rebuilds the model at its original widths without initialising
it, slices every recorded module to its count (the first units: the saved tensors hold the kept ones
in order) and loads the saved tensors, which must then fit exactly.

Plain `AutoModelForCausalLM.from_pretrained(dir)` cannot read such a checkpoint (the tensor shapes
disagree with the config), which is why `load_model_and_tokenizer` and the CLI route directories whose
config carries `sliced_units` through `load_sliced_model`. When every block kept the same widths
(`uniform_widths=True`) the config's own fields are set to them as well (`structured.uniform`): the
checkpoint is then an ordinary one that plain transformers loads, and `load_sliced_model` still does.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from optimum_sparse.checkpoint import save_directory_atomically
from optimum_sparse.loading import model_class, restore_generation_config
from optimum_sparse.structured.slicing import slice_channels
from optimum_sparse.structured.uniform import set_standard_shape
from optimum_sparse.structured.unit_masks import channel_keep_from_masks
from optimum_sparse.structured.units import ChannelGroup, find_channel_groups

logger = logging.getLogger(__name__)

#: the config attribute (and config.json key) holding {module name: kept units}
SLICED_UNITS_KEY = "sliced_units"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def record_sliced_units(
    model: nn.Module, kept_counts: dict[str, int], groups: list[ChannelGroup] | None = None
) -> bool:
    """Remember the kept unit counts in `model.config`, so that `save_pretrained` writes them.

    With the sliced `groups` given, a model whose blocks all kept the same widths also gets them in its
    config's standard fields (intermediate_size, head counts, head_dim). Returns whether it did.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("a sliced model needs a transformers config to record its widths in")
    setattr(config, SLICED_UNITS_KEY, {name: int(count) for name, count in kept_counts.items()})
    return groups is not None and set_standard_shape(model, groups, kept_counts)


def slice_pruned_channels(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Slice a model pruned with pattern "channels" (e.g. by `prune()` with pg_objective="block") down to
    its kept units; returns and records the kept counts, ready for `save_sliced_model`."""
    groups = find_channel_groups(model)
    keep = channel_keep_from_masks(groups, masks)
    kept = slice_channels(groups, keep)
    if record_sliced_units(model, kept, groups):
        logger.info("every block kept the same widths: the config describes the sliced model (standard shape)")
    return kept


def is_sliced_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local directory whose config.json records sliced widths."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as handle:
        return bool(json.load(handle).get(SLICED_UNITS_KEY))


def save_sliced_model(model: nn.Module, directory: str | os.PathLike, tokenizer=None, **kwargs: Any) -> None:
    """Write a sliced model (and its tokenizer) to `directory`, all or nothing; reload with `load_sliced_model`."""
    if not getattr(getattr(model, "config", None), SLICED_UNITS_KEY, None):
        raise ValueError(
            "the model records no sliced widths: slice it with SparsityCallback.slice_model() first "
            "(an unsliced model is saved with save_pretrained / SparseModel.save_pretrained)"
        )

    def write(target: str) -> None:
        model.save_pretrained(target, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)

    save_directory_atomically(directory, write)
    logger.info("saved the sliced model to %s", directory)


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = os.path.join(directory, _SINGLE_FILE)
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(directory, _INDEX_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{directory}: no {_SINGLE_FILE} or {_INDEX_FILE} (save with safetensors)")
    with open(index, encoding="utf-8") as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(directory, shard)))
    return tensors


def _no_init():
    """Skip the random initialisation of weights that the checkpoint overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def _keep_first(groups, kept: dict[str, int]) -> torch.Tensor:
    total = sum(group.num_units for group in groups)
    keep = torch.zeros(total, dtype=torch.bool)
    names = {group.name for group in groups}
    unknown = sorted(set(kept) - names)
    if unknown:
        raise ValueError(f"{SLICED_UNITS_KEY} names modules this architecture does not have: {unknown[:3]}")
    for group in groups:
        count = kept.get(group.name, group.num_units)
        if not 0 <= count <= group.num_units:
            raise ValueError(f"{SLICED_UNITS_KEY}[{group.name!r}] = {count}, outside [0, {group.num_units}]")
        keep[group.offset : group.offset + count] = True
    return keep


def load_sliced_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """The model saved by `save_sliced_model` (or by `save_pretrained` after slicing), in eval mode."""
    from transformers import AutoConfig

    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory holding a sliced checkpoint")
    config = AutoConfig.from_pretrained(directory)
    kept = getattr(config, SLICED_UNITS_KEY, None)
    if not kept:
        raise ValueError(f"{directory}: config.json has no {SLICED_UNITS_KEY!r}; load it with from_pretrained")
    if dtype is None or dtype == "auto":  # the dtype the model was saved in
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _no_init():
        model = model_class(config)._from_config(config, dtype=dtype)
    groups = find_channel_groups(model)
    slice_channels(groups, _keep_first(groups, kept))
    tensors = _read_tensors(directory)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # a tensor of another shape than its recorded width gives
        raise ValueError(f"{directory}: the saved tensors do not fit the recorded widths: {err}") from None
    model.tie_weights()
    untied = sorted(set(missing) - _tied_names(model))
    if unexpected or untied:
        raise ValueError(
            f"{directory}: the saved tensors do not fit the sliced architecture "
            f"(missing {untied[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    restore_generation_config(model, directory)
    model.eval()
    logger.info("loaded the sliced model %s (%d parameters)", directory, sum(p.numel() for p in model.parameters()))
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another one (tied embeddings are saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = Counter(id(param) for param in params.values())
    return {name for name, param in params.items() if owners[id(param)] > 1}
