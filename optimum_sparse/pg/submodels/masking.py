"""Instantiating a sampled sub-model by masking the dense one in place.

- `ChannelMasker`: forward pre-hooks multiply the input of each output projection (down / fc2 /
  c_proj, o_proj / out_proj) by the unit mask expanded over the unit's features. A removed channel
  or KV group then contributes nothing, exactly as if it had been sliced out (see `optimum_sparse.structured.slicing`).
- `WeightMasker`: writes W0 * m into the weights of the masked linears, keeping the dense W0 aside
  (one extra copy of the masked weights) so that the next sub-model starts from the dense weights.

Both hold one active sub-model at a time; `activate(mask)` switches, `deactivate()` restores the
dense model, `remove()` detaches for good.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from optimum_sparse.architecture import get_weight
from optimum_sparse.structured.units import ChannelGroup


def sample_digest(sample: torch.Tensor) -> bytes:
    """A short key identifying one sampled mask (unit bits or N:M pattern indices), for sub-model caches."""
    flat = sample.detach().reshape(-1)
    if flat.dtype == torch.bool or (flat.numel() and 0 <= int(flat.min()) and int(flat.max()) < 256):
        flat = flat.to(torch.uint8)  # pattern indices of 2:4 groups (< 6) or bits: 8x less to copy and hash
    data = flat.cpu().contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest() + flat.numel().to_bytes(8, "little")


class ChannelMasker:
    """Masks units through forward pre-hooks; the active mask is a flat float vector over all units."""

    def __init__(self, groups: Sequence[ChannelGroup]):
        self.groups = list(groups)
        self.active: torch.Tensor | None = None
        self._handles = []
        for group in self.groups:
            consumer = group.consumer
            feature_units = torch.arange(group.num_units).repeat_interleave(consumer.width) + group.offset
            self._handles.append(consumer.layer.register_forward_pre_hook(self._hook(feature_units)))

    def _hook(self, feature_units: torch.Tensor):
        cache: dict[torch.device, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple):
            if self.active is None:
                return None
            hidden = args[0]
            index = cache.get(hidden.device)
            if index is None:
                index = cache[hidden.device] = feature_units.to(hidden.device)
            feature_mask = self.active.to(hidden.device)[index].to(hidden.dtype)
            return (hidden * feature_mask, *args[1:])

        return hook

    def activate(self, unit_mask: torch.Tensor) -> None:
        self.active = unit_mask.detach().reshape(-1).float()

    def deactivate(self) -> None:
        self.active = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = None


class WeightMasker:
    """Masks weights in place from a kept dense copy; masks are (out, in) bool tensors per module."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.dense = {name: get_weight(module).detach().clone() for name, module in modules.items()}
        self.is_active = False

    @torch.no_grad()
    def activate(self, masks: dict[str, torch.Tensor]) -> None:
        for name, module in self.modules.items():
            weight = get_weight(module)
            dense = self.dense[name]
            weight.copy_(dense * masks[name].to(dense.device, dense.dtype))
        self.is_active = True

    @torch.no_grad()
    def deactivate(self) -> None:
        if not self.is_active:
            return
        for name, module in self.modules.items():
            get_weight(module).copy_(self.dense[name])
        self.is_active = False

    def remove(self) -> None:
        """Forget the dense copy (the weights keep whatever is active now)."""
        self.dense.clear()
        self.is_active = False
