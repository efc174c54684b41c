"""torch.distributed, as the pruning engine uses it: windows split over ranks, statistics summed.

Launched by `torchrun` or `accelerate launch`, every rank runs the same pruning with its own share of
the calibration windows. The per-layer statistics (column norms, Hessians) are summed over the ranks,
so every rank solves with the statistics of all the windows; each layer is solved on one rank and its
weights and mask broadcast, so the ranks share the solving work and end with identical models. Without
an initialised process group every function here is the single-process identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes for this run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_launcher(device: str = "cpu") -> None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA) unless already in one."""
    if launched_distributed() and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (at the end of a CLI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (on every rank)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """`source`'s `tensor` on every rank, in place."""
    if is_distributed():
        dist.broadcast(tensor, src=source)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every world-size-th one, starting at its rank."""
    rank, world = rank_and_world()
    if world == 1:
        return windows
    if windows.shape[0] < world:
        raise ValueError(f"{windows.shape[0]} calibration windows cannot be split over {world} processes; give more")
    return windows[rank::world]
