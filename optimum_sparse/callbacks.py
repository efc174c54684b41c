"""Keeping a pruned model's zeros while it trains.

`register_mask_buffers` stores each mask on its module as a non-persistent buffer `sparse_mask` (in the
weight's own layout, so it follows `.to(device)` and never enters a state dict or checkpoint) and adds a
gradient hook that zeroes the gradient of pruned weights. `SparseFineTuneCallback` re-zeroes the pruned
weights when training begins and after every optimizer step, so `Trainer.train()` ends with exactly the
pruned zeros whatever the optimizer (weight decay, momentum) does.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from optimum_sparse.architecture import get_weight, is_transposed

logger = logging.getLogger(__name__)

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


def _mask_gradient(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
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


@torch.no_grad()
def apply_mask_buffers(modules: list[nn.Module] | nn.Module) -> int:
    """Zero the pruned weights of every masked module (a list, or all those inside a model)."""
    if isinstance(modules, nn.Module):
        modules = masked_modules(modules)
    for module in modules:
        module.weight.masked_fill_(~module._buffers[MASK_BUFFER], 0)
    return len(modules)


class SparseFineTuneCallback(TrainerCallback):
    """Trainer callback that keeps pruned weights at exactly zero during fine-tuning.

    Args:
        masks: where the masks come from: a `SparseModel` (its `keep_masks()` is switched on), a dict
            {module name: bool (out, in) mask} (names as in the plain model; a PeftModel or SparseModel
            wrapping it is fine), or None: the `sparse_mask` buffers already on the trained model.

    ```python
    sparse = SparseModel.from_pretrained("pruned-dir")
    trainer = Trainer(model=sparse.model, args=args, train_dataset=data, callbacks=[SparseFineTuneCallback(sparse)])
    trainer.train()   # sparse.model keeps its zeros; sparse.save_pretrained(...) afterwards
    ```
    """

    def __init__(self, masks=None) -> None:
        self.source = masks
        self._modules: list[nn.Module] = []

    def _attach(self, model: nn.Module | None) -> None:
        from optimum_sparse.modeling import SparseModel

        if model is None:
            raise ValueError("SparseFineTuneCallback needs the Trainer's model (it passes it to callbacks)")
        if isinstance(self.source, SparseModel):
            self.source.keep_masks(True)
        elif isinstance(self.source, Mapping):
            register_mask_buffers(model, self.source)
        elif self.source is not None:
            raise TypeError(f"masks must be a SparseModel, a dict of masks or None, got {type(self.source).__name__}")
        self._modules = masked_modules(model)
        if not self._modules:
            raise ValueError(
                "SparseFineTuneCallback found no masks on the Trainer's model: pass the SparseModel (or its masks) "
                "to the callback, or call SparseModel.keep_masks() on the model being trained"
            )
        logger.info("keeping the masks of %d pruned layers during training", len(self._modules))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)
        apply_mask_buffers(self._modules)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._modules:
            self._attach(model)
        apply_mask_buffers(self._modules)
