"""Pruning from disk, one block in memory at a time: the output equals the in-memory run's."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_model, build_tokenizer, method_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_sparse import prune
from optimum_sparse.streaming import prune_checkpoint


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sharded") / "tiny"
    build_model("llama", num_hidden_layers=3).save_pretrained(path, max_shard_size="20KB")  # several shards
    build_tokenizer().save_pretrained(path)
    return os.fspath(path)


def _weights(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(directory / file))
    return tensors


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="sparsegpt", sparsity=0.5),
        dict(method="wanda", sparsity=0.6, sparsity_profile="owl", reconstruction="block", reconstruction_epochs=2),
        dict(method="magnitude", sparsity=0.5),
    ],
    ids=["sparsegpt", "wanda+owl+reconstruction", "magnitude"],
)
def test_streamed_pruning_equals_the_in_memory_run(settings, sharded_llama, windows, tmp_path):
    assert len(os.listdir(sharded_llama)) > 4  # the source really is sharded
    config = method_config(device="cpu", **settings)
    in_memory = AutoModelForCausalLM.from_pretrained(sharded_llama)
    expected = prune(in_memory, config, windows, show_progress=False)

    result = prune_checkpoint(sharded_llama, os.fspath(tmp_path / "out"), config, windows, show_progress=False)
    streamed = _weights(tmp_path / "out")
    for name, tensor in in_memory.state_dict().items():
        if name in streamed:
            assert torch.equal(streamed[name], tensor), name
    # no mask outlives its block (a byte per weight: 6.5 GB on a 7B model); the counts do
    assert result.masks == {} and set(result.layer_counts) == set(expected.masks)
    assert result.sparsity == pytest.approx(expected.sparsity) and result.layer_sparsity == expected.layer_sparsity
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # an ordinary checkpoint
    with torch.no_grad():
        assert torch.equal(plain(input_ids=windows[:1]).logits, in_memory(input_ids=windows[:1]).logits)
    saved = json.loads((tmp_path / "out" / "sparsity_config.json").read_text())
    assert saved["measured_sparsity"] == pytest.approx(expected.sparsity)


def test_a_directory_without_safetensors_fails_before_any_work(tmp_path, windows):
    from optimum_sparse import SparsityConfig

    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        prune_checkpoint(os.fspath(tmp_path), os.fspath(tmp_path / "out"), SparsityConfig(method="wanda"), windows)
    assert not (tmp_path / "out").exists()


def test_only_one_block_holds_weights_at_a_time(sharded_llama, windows, tmp_path, monkeypatch):
    from optimum_sparse import SparsityConfig
    from optimum_sparse.streaming import BlockStreamer

    materialised = []
    original = BlockStreamer.load

    def load(self, index):
        blocks = self.model.get_submodule(self.blocks_name)
        materialised.append(sum(any(not p.is_meta for p in block.parameters()) for block in blocks))
        original(self, index)

    monkeypatch.setattr(BlockStreamer, "load", load)
    prune_checkpoint(sharded_llama, os.fspath(tmp_path / "out"), SparsityConfig(method="wanda"), windows)
    assert len(materialised) >= 3 and max(materialised) == 0  # every other block is empty when one loads


def test_the_cli_low_memory_flag_writes_the_same_checkpoint(sharded_llama, text_file, tmp_path, capsys):
    from optimum_sparse import cli

    common = ["prune", "--model", sharded_llama, "--calibration-data", text_file, "--num-samples", "4"]
    common += ["--seq-len", "32", "--method", "sparsegpt", "--device", "cpu", "--no-progress", "--json"]
    assert cli.main([*common, "--low-memory", "--output", os.fspath(tmp_path / "disk")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["low_memory"] is True and record["peak_rss_mb"] > 0
    assert cli.main([*common, "--output", os.fspath(tmp_path / "memory")]) == 0
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert all(torch.equal(streamed[k], loaded[k]) for k in loaded)
    assert cli.main([*common, "--low-memory", "--eval-data", text_file, "--output", os.fspath(tmp_path / "x")]) == 2
    assert "--low-memory writes the pruned checkpoint without holding the model" in capsys.readouterr().err


def test_max_memory_refuses_a_run_that_would_not_fit_and_names_the_fix(sharded_llama, text_file, tmp_path, capsys):
    from optimum_sparse import cli

    common = ["prune", "--model", sharded_llama, "--calibration-data", text_file, "--num-samples", "4"]
    common += ["--seq-len", "32", "--method", "wanda", "--device", "cpu", "--no-progress", "--json"]
    assert cli.main([*common, "--max-memory", "20KB", "--output", os.fspath(tmp_path / "a")]) == 2
    assert "add --low-memory" in capsys.readouterr().err
    assert cli.main([*common, "--max-memory", "1GiB", "--low-memory", "--output", os.fspath(tmp_path / "b")]) == 0
    assert cli.main([*common, "--max-memory", "four", "--output", os.fspath(tmp_path / "c")]) == 2
    assert "--max-memory takes a size such as 4GiB" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_the_memory_estimate_of_low_memory_holds_one_block_of_the_weights(sharded_llama):
    from optimum_sparse import SparsityConfig
    from optimum_sparse.streaming import estimate_peak_bytes

    config = SparsityConfig(method="wanda", num_samples=4, seq_len=32)
    whole, streamed = (
        estimate_peak_bytes(sharded_llama, config, False),
        estimate_peak_bytes(sharded_llama, config, True),
    )
    assert streamed["weights"] < whole["weights"]
    block = (whole["weights"] - streamed["weights"]) / 2  # 3 blocks in the model, 1 held
    assert block > 0 and streamed["activations"] == 2 * 4 * 32 * 32 * 4  # in + out windows, hidden 32, float32


def test_a_bfloat16_checkpoint_streams_in_float32_when_asked_and_tied_heads_are_written_once(tmp_path, windows):
    from optimum_sparse import SparsityConfig

    source = tmp_path / "bf16"
    model = build_model("llama", num_hidden_layers=2, tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(source)
    build_tokenizer().save_pretrained(source)
    config = SparsityConfig(method="wanda", device="cpu")
    prune_checkpoint(os.fspath(source), os.fspath(tmp_path / "out"), config, windows, dtype="float32")
    saved = _weights(tmp_path / "out")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert "lm_head.weight" not in saved  # tied to the embeddings, as the source stored it
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").lm_head.weight.abs().sum() > 0


@pytest.mark.parametrize("dtype, per_weight, copies", [(torch.float32, 24, 0), (torch.bfloat16, 26, 2)])
def test_the_memory_estimate_counts_block_reconstruction_after_the_solve(dtype, per_weight, copies, tmp_path):
    from optimum_sparse import SparsityConfig
    from optimum_sparse.streaming import estimate_peak_bytes

    source = tmp_path / "model"
    build_model("llama", num_hidden_layers=3).to(dtype).save_pretrained(source, max_shard_size="20KB")
    build_tokenizer().save_pretrained(source)
    plain = estimate_peak_bytes(os.fspath(source), SparsityConfig(method="wanda", num_samples=4, seq_len=32), True)
    config = SparsityConfig(method="wanda", num_samples=4, seq_len=32, reconstruction="block")
    rebuilt = estimate_peak_bytes(os.fspath(source), config, True)
    assert plain["reconstruction"] == 0
    assert rebuilt["activations"] == 2 * plain["activations"]  # the dense stream beside the pruned one
    model = build_model("llama", num_hidden_layers=3)
    block_weights = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    hidden, inter, heads, tokens = 32, model.config.intermediate_size, model.config.num_attention_heads, 32
    window = tokens * (12 * hidden + 4 * inter) * 4 + 3 * heads * tokens**2 * 4
    float32_windows = copies * 4 * tokens * hidden * 4  # fit inputs and dense targets, 4 windows of 32 tokens
    assert rebuilt["reconstruction"] == per_weight * block_weights + float32_windows + window
    assert rebuilt["total"] == rebuilt["weights"] + rebuilt["masks"] + rebuilt["activations"] + max(
        rebuilt["solver"], rebuilt["reconstruction"]
    )
