"""Turning importance scores into keep-masks, and packing masks into bits.

Convention everywhere in the library: a mask is a bool tensor shaped like the weight in
(out_features, in_features) layout, True where the weight is kept. Higher score = more important.
N:M groups run along the input dimension (consecutive columns of a row), which is what sparse
tensor cores (2:4) expect.
"""

from __future__ import annotations

import numpy as np
import torch


def num_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights are zeroed at `sparsity` (rounded to nearest)."""
    return int(round(numel * sparsity))


def topk_mask(scores: torch.Tensor, sparsity: float, scope: str = "row", prune_ties: bool = False) -> torch.Tensor:
    """Keep the highest scores, zeroing exactly `sparsity` of them per row or per whole tensor.

    The pruned entries are the first `k` of a stable ascending sort: among equal scores the one with
    the lower index goes first. That is the Wanda reference code's rule, and it makes the choice among
    the many equal |W| of quantised checkpoints (GGUF) deterministic.

    `prune_ties` instead zeroes every score <= the one at sorted position `k` (a threshold, the rule
    of the reference repositories' magnitude baseline): at least k + 1 entries, more when it is tied.
    """
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
    if prune_ties:
        return _threshold_mask(scores, sparsity, scope)
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if scope == "layer" or scores.dim() == 1:
        k = num_pruned(scores.numel(), sparsity)
        if k:
            idx = torch.sort(scores.flatten(), stable=True).indices[:k]
            mask.view(-1)[idx] = False
        return mask
    k = num_pruned(scores.shape[-1], sparsity)
    if k:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, False)
    return mask


def _threshold_mask(scores: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """`topk_mask(..., prune_ties=True)`: keep only scores above the (k + 1)-th smallest."""
    rows = scores.reshape(1, -1) if scope == "layer" or scores.dim() == 1 else scores
    k = num_pruned(rows.shape[-1], sparsity)
    if k == 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(rows.float(), min(k + 1, rows.shape[-1]), dim=-1, keepdim=True).values
    return (rows.float() > threshold).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive columns.

    Implemented as "prune the m - n lowest" so that ties at a group's boundary are broken the way
    the reference implementations break them: quantised checkpoints (GGUF) have many equal |W| and
    the choice among equals measurably moves magnitude 2:4 perplexity.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be divisible by {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    if m > n:
        keep.scatter_(-1, torch.topk(groups, m - n, dim=-1, largest=False).indices, False)
    return keep.reshape(rows, cols)


def select_mask(
    scores: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scope: str = "row",
    prune_ties: bool = False,
) -> torch.Tensor:
    """N:M mask when `nm` is given, else a top-k mask at `sparsity` within `scope`."""
    if nm is not None:
        return nm_mask(scores, *nm)
    return topk_mask(scores, sparsity, scope, prune_ties)


def is_valid_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive columns keeps at most `n` entries."""
    rows, cols = mask.shape
    if cols % m:
        return False
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((tensor == 0).sum().item()) / max(tensor.numel(), 1)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 entries per byte, little bit order); shape is kept apart."""
    bits = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1), bitorder="little")
    return torch.from_numpy(bits)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
