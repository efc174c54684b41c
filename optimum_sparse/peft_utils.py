"""PEFT adapters on pruned models: merging without losing the zeros.

LoRA trains as usual on a pruned model (the pruned base weights are frozen), but its update
`delta = scaling * B @ A` is dense: `merge_and_unload()` alone would fill the pruned weights in. Merging
and then re-applying the masks gives `W + mask * delta` (W is zero where pruned), i.e. the LoRA delta
restricted to the kept weights, and exactly the pruned zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from optimum_sparse.architecture import get_weight
from optimum_sparse.mask_buffers import apply_mask_buffers, masked_modules, masked_target, weight_module
from optimum_sparse.modeling import SparseModel

logger = logging.getLogger(__name__)


def _lora_layer_masks(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: base weight != 0} for every adapter-wrapped layer of the base model (names as after merging)."""
    base = peft_model.get_base_model()
    masks = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_base_layer") and hasattr(module, "merge") and module is not base:
            inner = weight_module(module)
            if isinstance(getattr(inner, "weight", None), torch.Tensor) and inner.weight.dim() == 2:
                masks[name] = (get_weight(inner) != 0).detach().cpu()
    return masks


def merge_and_mask(peft_model: nn.Module, masks=None, **merge_kwargs) -> nn.Module:
    """`peft_model.merge_and_unload()`, then the pruned weights set back to zero.

    Args:
        peft_model: a `peft.PeftModel` (e.g. LoRA) whose base model was pruned.
        masks: a `SparseModel`, or {module name: bool (out, in) mask} with the plain model's names; default:
            the `sparse_mask` buffers left by `SparseModel.keep_masks()`, else the zeros of the base weights
            of the adapter-wrapped layers (read before merging).
        merge_kwargs: passed to `merge_and_unload` (progressbar, safe_merge, adapter_names).
    Returns:
        the merged plain transformers model, whose weights are `W + mask * delta`.
    """
    if isinstance(masks, SparseModel):
        masks = masks.masks
    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a SparseModel, a dict of masks or None, got {type(masks).__name__}")
    use_buffers = masks is None and bool(masked_modules(peft_model))
    if masks is None and not use_buffers:
        masks = _lora_layer_masks(peft_model)
        logger.info("merge_and_mask: masks taken from the zeros of %d adapter-wrapped layers", len(masks))
    merged = peft_model.merge_and_unload(**merge_kwargs)
    if use_buffers:
        count = apply_mask_buffers(merged)
        logger.info("merge_and_mask: re-applied the masks of %d layers", count)
        return merged
    with torch.no_grad():
        for name, mask in masks.items():
            _, weight = masked_target(merged, name, mask)
            weight.masked_fill_(~mask.to(weight.device, torch.bool), 0)
    return merged
