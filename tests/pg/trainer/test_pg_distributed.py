"""Mask learning with two processes (torchrun, gloo on the CPU): different samples, identical scores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("pg_ddp_train.py")


def test_two_processes_sample_differently_and_keep_identical_scores(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(rank["world_size"] == 2 for rank in ranks)
    assert all(rank["wrapped"] == "DistributedDataParallel" for rank in ranks)
    # the Wanda initialisation (on each rank's own batches) was averaged: identical from the first step
    assert torch.equal(ranks[0]["initial"], ranks[1]["initial"])
    # each rank drew its own sub-models ...
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["samples"], ranks[1]["samples"]))
    # ... and the averaged score gradients kept the scores identical while they moved
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])
    assert not torch.equal(ranks[0]["scores"], ranks[0]["initial"])
