"""Saving the mask-learning state with the Trainer's checkpoints and resuming from it exactly.

The Trainer checkpoints the model (dense weights and `pg_mask_scores.scores`), the optimizer, the
scheduler and its own RNG states; what else policy gradients on stale sub-models (the method of
`optimum_sparse.pg`) carry from one step to the next is the learner's: the loss baseline, the stale
samples and their log-probabilities when drawn, the step counters and the sampler's RNG state. Each
process writes its own (`pg_mask_learning_rank{r}.pt`, ranks sample different sub-models) into the
checkpoint folder from `on_save`, and `on_train_begin` of a resumed run reads it back.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STATE_FILE = "pg_mask_learning_rank{rank}.pt"


def checkpoint_dir(output_dir: str, global_step: int) -> str:
    """The folder the Trainer saves step `global_step`'s checkpoint into."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}")


def state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, STATE_FILE.format(rank=rank))


def save_state(directory: str, rank: int, state: dict[str, Any]) -> str:
    os.makedirs(directory, exist_ok=True)
    path = state_path(directory, rank)
    torch.save(state, path)
    return path


def load_state(directory: str, rank: int) -> dict[str, Any] | None:
    """This rank's saved state; None if there is none.

    A rank the saved run did not have (more processes now) takes rank 0's scores, baseline and
    counters but keeps its own sampler and draws fresh samples.
    """
    path = state_path(directory, rank)
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    path = state_path(directory, 0)
    if not os.path.isfile(path):
        return None
    logger.warning(
        "no mask-learning state of rank %d in %s; starting from rank 0's with fresh samples", rank, directory
    )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {**state, "generator": None, "samples": None, "log_prob_then": None}
