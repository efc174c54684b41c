"""Sliced models (layers of different widths) saved as transformers checkpoints and loaded back."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB_SIZE, build_model, build_tokenizer

from optimum_sparse import load_sliced_model, save_sliced_model
from optimum_sparse.auto_loading import load_model_and_tokenizer
from optimum_sparse.structured.sliced_checkpoint import (
    SLICED_UNITS_KEY,
    is_sliced_checkpoint,
    record_sliced_units,
    slice_pruned_channels,
)
from optimum_sparse.structured.slicing import slice_channels
from optimum_sparse.structured.units import find_channel_groups


def _sliced(arch: str, seed: int = 1) -> tuple[torch.nn.Module, dict[str, int]]:
    """A tiny model with about half its MLP channels and some KV groups removed, widths recorded."""
    model = build_model(arch)
    groups = find_channel_groups(model)
    keep = torch.rand(sum(g.num_units for g in groups), generator=torch.Generator().manual_seed(seed)) < 0.5
    for group in groups:
        if group.kind == "attention":
            keep[group.offset] = True
    kept = slice_channels(groups, keep)
    record_sliced_units(model, kept)
    return model, kept


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliced_model_reloads_with_identical_logits(arch, tmp_path):
    model, kept = _sliced(arch)
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    save_sliced_model(model, tmp_path / "sliced")
    with open(tmp_path / "sliced" / "config.json") as handle:
        assert json.load(handle)[SLICED_UNITS_KEY] == kept
    loaded = load_sliced_model(tmp_path / "sliced")
    assert not loaded.training
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    # the recorded widths survive a second save of the loaded model
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(_logits(load_sliced_model(tmp_path / "again"), ids), _logits(model, ids))


def test_plain_transformers_cannot_read_a_sliced_checkpoint_but_the_loader_routes_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _sliced("llama")
    model.generation_config.max_new_tokens = 77
    save_sliced_model(model, tmp_path / "sliced", tokenizer=build_tokenizer())
    assert is_sliced_checkpoint(tmp_path / "sliced")
    assert load_sliced_model(tmp_path / "sliced").generation_config.max_new_tokens == 77
    with pytest.raises((RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sliced")
    loaded, tokenizer = load_model_and_tokenizer(str(tmp_path / "sliced"))
    ids = tokenizer("a sliced model", return_tensors="pt").input_ids
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_bfloat16_load(tmp_path):
    model, _ = _sliced("qwen2")
    save_sliced_model(model, tmp_path / "sliced")
    loaded = load_sliced_model(tmp_path / "sliced", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_saving_an_unsliced_model_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="slice_model"):
        save_sliced_model(build_model("llama"), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_sliced_model(tmp_path / "missing")
    build_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="from_pretrained"):
        load_sliced_model(tmp_path / "plain")
    model, kept = _sliced("llama")
    save_sliced_model(model, tmp_path / "sliced")
    config_file = tmp_path / "sliced" / "config.json"
    config = json.loads(config_file.read_text())
    mlp = next(name for name in kept if name.endswith("mlp"))
    config[SLICED_UNITS_KEY][mlp] += 1  # a width the saved tensors do not have
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit"):
        load_sliced_model(tmp_path / "sliced")
    config[SLICED_UNITS_KEY]["model.layers.7.mlp"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not have"):
        load_sliced_model(tmp_path / "sliced")


def test_slicing_refuses_masks_that_do_not_remove_whole_units():
    model = build_model("llama")
    masks = {
        name: torch.ones_like(module.weight, dtype=torch.bool)
        for name, module in model.named_modules()
        if name.endswith(("proj",))
    }
    masks["model.layers.0.mlp.gate_proj"][0, 0] = False  # one weight, not a channel
    with pytest.raises(ValueError, match="whole channels"):
        slice_pruned_channels(model, masks)
    del masks["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no mask for model.layers.1.mlp.down_proj"):
        slice_pruned_channels(model, masks)
