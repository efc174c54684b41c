"""Mask learning over several processes (`accelerate launch`, `torchrun`): what must agree across ranks.

Each rank samples its own sub-models (its sampler is seeded with `seed + rank`), so one optimizer step
averages `world_size` independent score-function estimates: DistributedDataParallel all-reduces the
gradient of the only trainable parameters, the scores (policy gradients on stale sub-models, see
`optimum_sparse.pg`, with one stale sample per rank). The scores then stay identical on every rank as long
as they start identical, which the Wanda initialisation does not guarantee (each rank sees its own
calibration batches): `synchronise` averages them across ranks right after it. The average of scores
that all lie on the budget hyperplane, inside [0, 1], lies there too (the feasible set is convex).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def synchronise(tensor: torch.Tensor) -> None:
    """Replace `tensor` (in place) by its mean over the ranks, bit-identical everywhere (no-op alone)."""
    size = world_size()
    if size == 1:
        return
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    tensor.copy_(total / size)
    dist.broadcast(tensor, src=0)  # whatever the reduction order, every rank ends with rank 0's bits
    logger.info("averaged %d scores over %d processes", tensor.numel(), size)
