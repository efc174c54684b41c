"""Distributed calibration: `torchrun --nproc_per_node=2 -m optimum_sparse.cli prune` (gloo, CPU) splits the
windows over two processes, sums the statistics, and ends with the masks and weights of one process, bit
for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _prune(launcher: list[str], model: str, data: str, output, *extra: str) -> dict:
    args = ["prune", "--model", model, "--calibration-data", data, "--num-samples", "8", "--seq-len", "32"]
    args += ["--device", "cpu", "--no-progress", "--json", "--output", os.fspath(output), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "optimum_sparse.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, [
        line for line in proc.stderr.splitlines() if "optimum-sparse" in line or "Error" in line
    ]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints the record
    return json.loads(lines[0])


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "wanda"],
        ["--method", "sparsegpt", "--weight-update", "admm", "--set", "admm_iterations=8", "admm_gradual_steps=4"],
    ],
)
def test_two_processes_give_the_masks_and_weights_of_one(extra, saved_llama, text_file, tmp_path):
    two = _prune([TORCHRUN, "--standalone", "--nproc_per_node=2"], saved_llama, text_file, tmp_path / "two", *extra)
    one = _prune([sys.executable], saved_llama, text_file, tmp_path / "one", *extra)
    assert two["world_size"] == 2 and one["world_size"] == 1
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in a:
        # bit for bit: the statistics are float64 sums, so splitting the windows does not change them
        assert torch.equal(a[name], b[name]), name
    assert two["measured_sparsity"] == one["measured_sparsity"]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize(
    "extra", [["--method", "sparsellm"], ["--method", "wanda", "--resume-dir", "RESUME"]], ids=["block-level", "resume"]
)
def test_what_cannot_be_shared_refuses_a_distributed_launch_before_any_work(extra, saved_llama, text_file, tmp_path):
    extra = [os.fspath(tmp_path / "resume") if e == "RESUME" else e for e in extra]
    args = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "optimum_sparse.cli", "prune", "--model", saved_llama]
    args += ["--calibration-data", text_file, *extra, "--output", os.fspath(tmp_path / "out")]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "runs in one process: launch it without torchrun" in proc.stderr
    assert not (tmp_path / "out").exists()
