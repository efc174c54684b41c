"""Calibration sources (file, strings, tensors, model-generated) and perplexity / sparsity reports."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, VOCAB_SIZE, build_model

from optimum_sparse.architecture import PRUNABLE_TYPES, find_blocks, get_weight
from optimum_sparse.calibration import get_calibration_data, load_text, sample_windows, tokenize
from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import eval_windows, format_sparsity_report, perplexity, sparsity_report
from optimum_sparse.sequential import prune

# ---------------------------------------------------------------------------- calibration


def _is_window_of(window: torch.Tensor, ids: torch.Tensor) -> bool:
    return any(torch.equal(ids[s : s + window.numel()], window) for s in range(ids.numel() - window.numel() + 1))


def test_file_windows_are_seeded_and_reproducible(text_file, tokenizer):
    first = get_calibration_data(text_file, tokenizer, num_samples=4, seq_len=SEQ_LEN, seed=0)
    again = get_calibration_data(text_file, tokenizer, num_samples=4, seq_len=SEQ_LEN, seed=0)
    other = get_calibration_data(text_file, tokenizer, num_samples=4, seq_len=SEQ_LEN, seed=1)
    assert first.shape == (4, SEQ_LEN) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    ids = tokenize(load_text(text_file), tokenizer)
    assert all(_is_window_of(window, ids) for window in first)


def test_load_text_strips_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello world".encode())
    assert load_text(path) == "hello world"


def test_list_of_strings_is_joined_and_windowed(tokenizer, calibration_text):
    texts = [calibration_text[:3000], calibration_text[3000:6000]]
    windows = get_calibration_data(texts, tokenizer, num_samples=3, seq_len=SEQ_LEN, seed=5)
    assert windows.shape == (3, SEQ_LEN)
    expected = sample_windows(tokenize("\n\n".join(texts), tokenizer), 3, SEQ_LEN, seed=5)
    assert torch.equal(windows, expected)


def test_token_tensor_is_used_as_given(tokenizer):
    ids = torch.randint(0, VOCAB_SIZE, (3, 17), dtype=torch.int32)
    out = get_calibration_data(ids, tokenizer, num_samples=128, seq_len=2048, seed=0)
    assert out.dtype == torch.long and torch.equal(out, ids.long())
    rows = [torch.arange(10), torch.arange(10, 20)]
    assert torch.equal(get_calibration_data(rows), torch.stack(rows))
    with pytest.raises(ValueError, match=r"share one sequence length, got \[5, 10\]"):
        get_calibration_data([torch.arange(10), torch.arange(5)])


def test_no_calibration_data_falls_back_to_model_generated_text(tokenizer, caplog):
    model = build_model("llama")
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.calibration"):
        windows = get_calibration_data(None, tokenizer, model, num_samples=3, seq_len=20, seed=0)
    assert "no calibration data: sampling 3 x 20 tokens from the model itself" in caplog.text
    assert windows.shape == (3, 20) and windows.dtype == torch.long
    assert windows.min() >= 0 and windows.max() < VOCAB_SIZE
    assert torch.all(windows[:, 0] == tokenizer.bos_token_id)
    again = get_calibration_data(None, tokenizer, model, num_samples=3, seq_len=20, seed=0)
    assert torch.equal(windows, again)  # seeded


def test_prune_without_calibration_data_generates_it(tokenizer, caplog):
    model = build_model("llama")
    config = SparsityConfig(method="wanda", num_samples=2, seq_len=16, device="cpu")
    with caplog.at_level(logging.WARNING):
        result = prune(model, config, None, tokenizer, show_progress=False)
    assert "no calibration data" in caplog.text
    assert result.sparsity == pytest.approx(0.5)


def test_calibration_text_needs_a_tokenizer_and_none_needs_a_model(calibration_text):
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        get_calibration_data([calibration_text], None)
    with pytest.raises(ValueError, match="no calibration data and no model"):
        get_calibration_data(None, None, None)


# ---------------------------------------------------------------------------- evaluation


def test_perplexity_equals_exp_of_mean_window_loss(windows):
    model = build_model("opt")
    ids = windows.reshape(-1)  # 4 windows of 32 tokens, concatenated
    losses = []
    with torch.no_grad():
        for window in ids[:96].reshape(3, 32):
            logits = model(input_ids=window.unsqueeze(0)).logits[0]
            losses.append(F.cross_entropy(logits[:-1], window[1:]).item())
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, data=ids, seq_len=32, max_windows=3, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert 1 < got < 10 * VOCAB_SIZE  # a random model is close to uniform, not wildly off
    all_four = perplexity(model, data=ids, seq_len=32, show_progress=False)
    assert all_four != pytest.approx(got, rel=1e-9)
    assert model.training is False


def test_perplexity_of_a_file_equals_perplexity_of_its_tokens(text_file, tokenizer):
    model = build_model("gpt2")
    ids = tokenize(load_text(text_file), tokenizer)
    from_file = perplexity(model, tokenizer, text_file, seq_len=64, max_windows=2, show_progress=False)
    from_ids = perplexity(model, data=ids, seq_len=64, max_windows=2, show_progress=False)
    assert from_file == pytest.approx(from_ids, rel=1e-6)


def test_eval_windows_drop_the_tail():
    ids = torch.arange(100)
    windows = eval_windows(ids, 32)
    assert windows.shape == (3, 32)
    assert torch.equal(windows, ids[:96].reshape(3, 32))
    assert torch.equal(eval_windows(ids, 32, max_windows=2), ids[:64].reshape(2, 32))
    assert eval_windows(ids, 100).shape == (1, 100)


def test_sparsity_report_total_matches_the_pruning_result(windows):
    model = build_model("qwen2")
    dense = sparsity_report(model)
    assert dense["total"] == 0.0 and len(dense["layers"]) == 14
    result = prune(model, SparsityConfig(method="magnitude", sparsity=0.7), show_progress=False)
    report = sparsity_report(model)
    assert report["total"] == pytest.approx(result.sparsity, abs=1e-9)
    for name, value in result.layer_sparsity.items():
        assert report["layers"][name] == pytest.approx(value, abs=1e-9)
    # by hand, over every linear in the blocks
    _, blocks = find_blocks(model)
    weights = [get_weight(m) for m in blocks.modules() if isinstance(m, PRUNABLE_TYPES)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert report["total"] == pytest.approx(zeros / sum(w.numel() for w in weights))
    text = format_sparsity_report(report)
    assert text.splitlines()[-1].split() == ["total", f"{report['total']:.4f}"]


def test_sparsity_report_counts_unpruned_layers_too():
    model = build_model("llama")
    result = prune(model, SparsityConfig(method="magnitude", targets=[r"mlp"]), show_progress=False)
    report = sparsity_report(model)
    pruned = sum(m.numel() for m in result.masks.values())
    total = sum(get_weight(model.get_submodule(n)).numel() for n in report["layers"])
    assert report["total"] == pytest.approx(0.5 * pruned / total)
    assert report["layers"]["model.layers.0.self_attn.q_proj"] == 0.0
