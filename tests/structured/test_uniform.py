"""Uniform widths: every block keeps the same channels and KV groups, and the sliced model is a
standard checkpoint that plain transformers loads with no code of ours."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ_LEN, build_model
from pg_helpers import Windows, make_trainer
from transformers import AutoModelForCausalLM

from optimum_sparse import SparsityCallback, SparsityConfig, load_sliced_model, prune, save_sliced_model
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.structured import find_channel_groups, slice_pruned_channels
from optimum_sparse.structured.uniform import uniform_counts
from optimum_sparse.structured.units import unit_costs

STANDARD = ("llama", "qwen2", "gemma", "mistral")


def _config(**kwargs) -> SparsityConfig:
    settings = dict(
        method="pg",
        pattern="channels",
        sparsity=0.4,
        pg_objective="block",
        pg_block_steps=10,
        samples_per_step=2,
        num_samples=8,
        seq_len=SEQ_LEN,
        device="cpu",
        uniform_widths=True,
    )
    return SparsityConfig(**{**settings, **kwargs})


@pytest.fixture
def eight_windows(tokenizer, calibration_text) -> torch.Tensor:
    return sample_windows(tokenize(calibration_text, tokenizer), 8, SEQ_LEN, seed=0)


@pytest.mark.parametrize("sparsity", [0.2, 0.4, 0.6])
def test_uniform_counts_meet_the_parameter_budget_within_one_channel_per_block(sparsity):
    groups = find_channel_groups(build_model("llama"))
    counts = uniform_counts(groups, sparsity, width_multiple=1)
    costs = unit_costs(groups)
    kept = sum(counts[g.kind] * g.unit_cost for g in groups)
    removed = 1.0 - kept / float(costs.sum())
    mlp_cost = next(g.unit_cost for g in groups if g.kind == "mlp")
    assert sparsity <= removed < sparsity + 2 * mlp_cost / float(costs.sum())  # 2 blocks
    assert counts["attention"] >= 1


def test_uniform_counts_round_the_mlp_channels_down_to_the_width_multiple():
    groups = find_channel_groups(build_model("llama"))  # 64 MLP channels, 2 KV groups per block
    exact = uniform_counts(groups, 0.3, width_multiple=1)["mlp"]
    assert exact > 32
    assert uniform_counts(groups, 0.3, width_multiple=32)["mlp"] == 32
    assert uniform_counts(groups, 0.3, width_multiple=16)["mlp"] == exact - exact % 16
    assert uniform_counts(groups, 0.3, width_multiple=128)["mlp"] == exact  # no multiple fits: kept exact


@pytest.mark.parametrize("arch", STANDARD)
def test_sliced_uniform_model_is_a_checkpoint_plain_transformers_loads_with_the_same_logits(
    arch, eight_windows, tmp_path
):
    model = build_model(arch)
    result = prune(model, _config(), eight_windows, show_progress=False)
    assert result.sparsity >= 0.4
    ids = eight_windows[:2, :12]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    kept = slice_pruned_channels(model, result.masks)
    assert len({kept[g] for g in kept if g.endswith("mlp")}) == 1  # one width for every block
    assert len({kept[g] for g in kept if not g.endswith("mlp")}) == 1
    save_sliced_model(model, tmp_path / "sliced")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")  # no code of ours
    config = plain.config.get_text_config()
    assert config.intermediate_size == kept["model.layers.0.mlp"]
    assert config.num_key_value_heads == kept["model.layers.0.self_attn"]
    assert config.num_attention_heads == config.num_key_value_heads * 2  # 4 query heads over 2 KV groups
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, masked, atol=1e-5)
        assert torch.allclose(load_sliced_model(tmp_path / "sliced")(input_ids=ids).logits, masked, atol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_other_architectures_are_refused_before_any_work_naming_the_supported_ones(arch, eight_windows):
    model = build_model(arch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"uniform_widths writes a standard checkpoint for the model types \['llama'"):
        prune(model, _config(), eight_windows, show_progress=False)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_uniform_widths_is_a_channel_setting():
    with pytest.raises(ValueError, match="uniform_widths applies to pattern 'channels'"):
        SparsityConfig(method="pg", sparsity=0.5, uniform_widths=True)


def test_the_trainer_callback_hardens_to_uniform_widths_and_slices_to_a_standard_checkpoint(eight_windows, tmp_path):
    model = build_model("llama")
    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.4, num_samples=8, uniform_widths=True)
    callback = SparsityCallback(config)
    make_trainer(model, Windows(eight_windows), callback, tmp_path / "run", steps=3).train()
    kept = callback.slice_model()
    assert len(set(kept.values())) == 2  # one MLP width, one KV-group count
    save_sliced_model(model, tmp_path / "sliced")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")
    ids = eight_windows[:1, :12]
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
