"""Masks on a model's modules: checked against the weights, and kept as `sparse_mask` buffers while it trains.

`register_mask_buffers` stores each mask on its module as a non-persistent buffer `sparse_mask` (in the
weight's own layout, so it follows `.to(device)` and never enters a state dict or checkpoint) and adds a
gradient hook that zeroes the gradient of pruned weights; `apply_mask_buffers` re-zeroes the weights.

Nothing here needs transformers' Trainer: `SparseModel.keep_masks` and `merge_and_mask` use these helpers
without importing the Trainer machinery, and `SparseFineTuneCallback` (optimum_sparse.callbacks) calls
them from its training hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn

from optimum_sparse.architecture import get_weight, is_transposed

MASK_BUFFER = "sparse_mask"

# module -> handle of its gradient hook (kept outside the module so that copies and pickles stay clean)
_GRAD_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weight_module(module: nn.Module) -> nn.Module:
    """The module that owns the weight: the base layer of a PEFT-wrapped (e.g. LoRA) linear, else `module`."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """`model.<name>`, also when `model` wraps the model the name refers to (PeftModel, SparseModel)."""
    try:
        return weight_module(model.get_submodule(name))
    except AttributeError:
        pass
    hits = [module for full, module in model.named_modules() if full.endswith("." + name)]
    if len(hits) != 1:
        reason = "no module" if not hits else f"{len(hits)} modules"
        raise ValueError(f"mask for {name!r}: {reason} of {type(model).__name__} match this name")
    return weight_module(hits[0])


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool CPU masks, each matching its module's (out, in) weight, or a ValueError naming the mismatch.

    Masks from another model or architecture are refused here, before anything is registered or saved.
    """
    checked: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        try:
            module = weight_module(model.get_submodule(name))
        except AttributeError:
            raise ValueError(
                f"mask for {name!r}: {type(model).__name__} has no such module; the masks belong to another model"
            ) from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"mask for {name!r}: that module has no 2-D weight to mask")
        expected = tuple(get_weight(module).shape)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"mask for {name} has shape {list(mask.shape)} but the model's weight is {list(expected)} (out, in); "
                "the masks belong to a different model or architecture"
            )
        checked[name] = mask.detach().to("cpu", torch.bool)
    return checked


def _mask_gradient(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The gradient hook: reads the buffer at each call, so a re-registered mask takes effect at once."""
    mask = module._buffers.get(MASK_BUFFER)
    return grad if mask is None else grad.masked_fill(~mask, 0)


def masked_target(model: nn.Module, name: str, mask: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The module `name` and its (out, in) weight view, after checking that `mask` has the weight's shape."""
    module = resolve_module(model, name)
    weight = get_weight(module)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"mask for {name} has shape {list(mask.shape)} but the weight is {list(weight.shape)} (out, in)"
        )
    return module, weight


def register_mask_buffers(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[nn.Module]:
    """Attach each (out, in) mask to its module as the `sparse_mask` buffer plus a gradient-masking hook."""
    modules = []
    for name, mask in masks.items():
        module, _ = masked_target(model, name, mask)
        stored = (mask.t() if is_transposed(module) else mask).to(device=module.weight.device, dtype=torch.bool)
        stored = stored.contiguous()
        if MASK_BUFFER in module._buffers:
            module._buffers[MASK_BUFFER] = stored
        else:
            module.register_buffer(MASK_BUFFER, stored, persistent=False)
        if module not in _GRAD_HOOKS and module.weight.requires_grad:
            _GRAD_HOOKS[module] = module.weight.register_hook(lambda grad, m=module: _mask_gradient(m, grad))
        modules.append(module)
    return modules


def remove_mask_buffers(model: nn.Module) -> int:
    """Undo `register_mask_buffers` on every module of `model`; returns how many modules had a mask."""
    count = 0
    for module in model.modules():
        if module._buffers.pop(MASK_BUFFER, None) is not None:
            count += 1
        handle = _GRAD_HOOKS.pop(module, None)
        if handle is not None:
            handle.remove()
    return count


def masked_modules(model: nn.Module) -> list[nn.Module]:
    """Modules of `model` that carry a `sparse_mask` buffer."""
    return [module for module in model.modules() if module._buffers.get(MASK_BUFFER) is not None]


def buffer_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: bool (out, in) mask on the CPU} of the `sparse_mask` buffers on `model`."""
    masks = {}
    for name, module in model.named_modules():
        mask = module._buffers.get(MASK_BUFFER)
        if mask is not None:
            masks[name] = (mask.t() if is_transposed(module) else mask).detach().cpu()
    return masks


@torch.no_grad()
def apply_mask_buffers(modules: list[nn.Module] | nn.Module) -> int:
    """Zero the pruned weights of every masked module (a list, or all those inside a model)."""
    if isinstance(modules, nn.Module):
        modules = masked_modules(modules)
    for module in modules:
        module.weight.masked_fill_(~module._buffers[MASK_BUFFER], 0)
    return len(modules)
