"""Half-precision checkpoints: `--dtype auto` (the CLI's default) keeps the checkpoint's dtype; blocks run
in it while statistics and solvers work in float32, and the result stays close to a float32 run."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_model, build_tokenizer
from safetensors import safe_open

from optimum_sparse import cli


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    build_model("llama").to(torch.bfloat16).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return os.fspath(path)


def _prune(model: str, text_file: str, output, *extra: str) -> list[str]:
    args = ["prune", "--model", model, "--calibration-data", text_file, "--num-samples", "4", "--seq-len", "32"]
    args += ["--eval-data", text_file, "--eval-seq-len", "64", "--eval-max-windows", "2", "--device", "cpu"]
    return args + ["--no-progress", "--json", "--output", os.fspath(output), *extra]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "admm", "sparsellm"])
def test_auto_dtype_prunes_a_bfloat16_checkpoint_in_bfloat16_close_to_a_float32_run(
    method, bf16_llama, text_file, tmp_path, capsys
):
    settings = ["--set", "admm_iterations=6", "admm_gradual_steps=3"] if method in ("admm", "sparsellm") else []
    if method == "sparsellm":
        settings += ["sparsellm_iterations=1"]
    assert cli.main(_prune(bf16_llama, text_file, tmp_path / "auto", "--method", method, *settings)) == 0
    auto = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        cli.main(_prune(bf16_llama, text_file, tmp_path / "f32", "--method", method, "--dtype", "float32", *settings))
        == 0
    )
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    with safe_open(os.fspath(tmp_path / "auto" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # saved as it came
    assert auto["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert auto["ppl_dense"] == pytest.approx(full["ppl_dense"], rel=0.02)
    assert auto["ppl"] == pytest.approx(full["ppl"], rel=0.05)  # stated tolerance: 5% of the float32 run
