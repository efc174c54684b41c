"""Resume: a run killed after block k and started again continues at block k+1, ending bit for bit where
an uninterrupted run ends; a resume directory of another run is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, method_config

from optimum_sparse import SparsityConfig, prune


class Killed(Exception):
    """Stands for the process dying between two blocks."""


def _kill_after(block: int):
    def on_block_done(index: int) -> None:
        if index == block:
            raise Killed

    return on_block_done


def _wanda_killed_after_block_0(model, windows, resume_dir) -> None:
    """A Wanda run recording into `resume_dir` that dies once block 0 is recorded."""
    with pytest.raises(Killed):
        prune(
            model,
            SparsityConfig(method="wanda"),
            windows,
            show_progress=False,
            resume_dir=resume_dir,
            on_block_done=_kill_after(0),
        )


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="sparsegpt", sparsity=0.5),
        dict(method="wanda", sparsity=0.6, sparsity_profile="owl", reconstruction="block", reconstruction_epochs=2),
        dict(method="pg", pattern="channels", sparsity=0.4, pg_objective="block", pg_block_steps=3, samples_per_step=2),
    ],
    ids=["sparsegpt", "owl+reconstruction", "pg-channels"],
)
def test_a_killed_run_resumes_and_ends_bit_for_bit_like_an_uninterrupted_one(settings, windows, tmp_path):
    config = method_config(device="cpu", **settings)
    reference = build_model("llama", num_hidden_layers=4)
    expected = prune(reference, config, windows, show_progress=False)

    model = build_model("llama", num_hidden_layers=4)
    with pytest.raises(Killed):
        prune(model, config, windows, show_progress=False, resume_dir=tmp_path, on_block_done=_kill_after(1))
    restarted = build_model("llama", num_hidden_layers=4)  # a new process: the dense model again
    seen = []
    result = prune(restarted, config, windows, show_progress=False, resume_dir=tmp_path, on_block_done=seen.append)
    assert seen == [2, 3]  # blocks 0 and 1 were not pruned again
    assert all(torch.equal(a, b) for a, b in zip(_state(reference).values(), _state(restarted).values()))
    assert set(result.masks) == set(expected.masks)
    assert all(torch.equal(result.masks[n], expected.masks[n]) for n in expected.masks)
    assert result.layer_sparsity == expected.layer_sparsity


def test_a_resume_directory_of_another_run_is_refused_before_any_work(windows, tmp_path):
    model = build_model("llama")
    _wanda_killed_after_block_0(model, windows, tmp_path)
    fresh = build_model("llama")
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"holds another run \(config.sparsity: 0.5 then, 0.6 now"):
        prune(fresh, SparsityConfig(method="wanda", sparsity=0.6), windows, show_progress=False, resume_dir=tmp_path)
    with pytest.raises(ValueError, match=r"holds another run \(model\."):
        prune(
            build_model("llama", seed=1),
            SparsityConfig(method="wanda"),
            windows,
            show_progress=False,
            resume_dir=tmp_path,
        )
    assert all(torch.equal(a, b) for a, b in zip(before.values(), _state(fresh).values()))


def test_the_cli_resumes_from_its_resume_dir(saved_llama, text_file, tmp_path, capsys):
    import json
    import os

    from safetensors.torch import load_file

    from optimum_sparse import cli

    def run(output: str) -> dict:
        args = ["prune", "--model", saved_llama, "--calibration-data", text_file, "--num-samples", "4"]
        args += ["--seq-len", "32", "--method", "sparsegpt", "--device", "cpu", "--no-progress", "--json"]
        args += ["--resume-dir", os.fspath(tmp_path / "resume"), "--output", os.fspath(tmp_path / output)]
        assert cli.main(args) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first, again = run("first"), run("again")  # the second run finds every block recorded
    assert again["measured_sparsity"] == first["measured_sparsity"]
    a, b = load_file(tmp_path / "first" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "resume" / "progress.json").read_text()) == {"done": 2}


def test_a_first_attempt_that_failed_early_does_not_lock_the_directory_but_other_data_is_refused(windows, tmp_path):
    model = build_model("llama")
    with pytest.raises(ValueError, match="match no"):  # refused before any block was pruned
        prune(model, SparsityConfig(method="wanda", layer_sparsity={"nope": 0.5}), windows, resume_dir=tmp_path)
    _wanda_killed_after_block_0(model, windows, tmp_path)
    with pytest.raises(ValueError, match="holds another run \\(calibration"):
        prune(
            build_model("llama"), SparsityConfig(method="wanda"), windows[:2], show_progress=False, resume_dir=tmp_path
        )
