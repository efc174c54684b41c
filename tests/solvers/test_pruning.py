"""Exact sparsity, valid N:M masks, and the expected quality order of the one-shot methods."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, SEQ_LEN, build_model, method_config

from optimum_sparse.architecture import get_weight, is_transposed
from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import is_valid_nm, nm_mask, num_pruned, topk_mask
from optimum_sparse.sequential import prune
from optimum_sparse.solvers import LayerStatistics, get_solver_class

METHODS = ("magnitude", "wanda", "sparsegpt")


def _config(method: str, **kwargs) -> SparsityConfig:
    # block_size 16 < every input width: SparseGPT works on several column blocks per layer
    return method_config(method, num_samples=4, seq_len=SEQ_LEN, block_size=16, device="cpu", **kwargs)


def _assert_weights_follow_masks(model, result) -> None:
    assert result.masks, "nothing was pruned"
    for name, mask in result.masks.items():
        weight = get_weight(model.get_submodule(name))
        assert weight.shape == mask.shape, name
        assert torch.all(weight[~mask] == 0), f"{name}: non-zero weight outside the mask"


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_masks_prune_exactly_the_requested_count(method, scope, sparsity, windows):
    model = build_model("llama")
    result = prune(model, _config(method, sparsity=sparsity, mask_scope=scope), windows, show_progress=False)
    assert len(result.masks) == 2 * 7  # q k v o gate up down in each of 2 blocks
    for name, mask in result.masks.items():
        zeros = (~mask).sum(dim=None if scope == "layer" else 1)
        if scope == "layer":
            assert int(zeros) == num_pruned(mask.numel(), sparsity), name
        else:
            assert torch.all(zeros == num_pruned(mask.shape[1], sparsity)), name
        assert result.layer_sparsity[name] == pytest.approx(1 - mask.sum().item() / mask.numel())
    _assert_weights_follow_masks(model, result)


@pytest.mark.parametrize("method", METHODS)
def test_default_scope_of_each_method(method, windows):
    """magnitude and sparsegpt compare across the layer, wanda within each row (rows then agree exactly)."""
    model = build_model("llama")
    result = prune(model, _config(method, sparsity=0.5), windows, show_progress=False)
    per_row = torch.cat([(~m).sum(1) for m in result.masks.values() if m.shape[1] == 32])
    if method == "wanda":
        assert torch.all(per_row == 16)
    else:
        assert per_row.unique().numel() > 1
    assert result.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_nm_masks_are_valid_in_every_group(arch, method, pattern, windows):
    n, m = map(int, pattern.split(":"))
    model = build_model(arch)
    result = prune(model, _config(method, pattern=pattern), windows, show_progress=False)
    for name, mask in result.masks.items():
        assert is_valid_nm(mask, n, m), name
        # exactly N kept per group (no group keeps fewer: the pattern is also the sparsity)
        assert torch.all(mask.reshape(mask.shape[0], -1, m).sum(-1) == n), name
    assert result.sparsity == pytest.approx(1 - n / m)
    _assert_weights_follow_masks(model, result)
    logits = model(input_ids=windows[:1]).logits
    assert torch.isfinite(logits).all()


def test_mask_helpers_count_exactly():
    scores = torch.randn(6, 16)
    assert (~topk_mask(scores, 0.7, "layer")).sum() == round(96 * 0.7)
    assert torch.all((~topk_mask(scores, 0.7, "row")).sum(1) == round(16 * 0.7))
    mask = nm_mask(scores, 2, 4)
    assert is_valid_nm(mask, 2, 4) and mask.sum() == 48
    assert not is_valid_nm(torch.ones(6, 16, dtype=torch.bool), 2, 4)
    assert not is_valid_nm(torch.ones(6, 10, dtype=torch.bool), 2, 4)  # width not divisible by M
    # kept entries are the largest of each group
    group_min_kept = torch.where(mask, scores, torch.inf).reshape(6, 4, 4).amin(-1)
    group_max_pruned = torch.where(~mask, scores, -torch.inf).reshape(6, 4, 4).amax(-1)
    assert torch.all(group_min_kept >= group_max_pruned)


# ---------------------------------------------------------------------------- quality order on one layer


def _outlier_inputs(tokens: int = 1024, features: int = 64, seed: int = 0) -> torch.Tensor:
    """LLM-like activations: correlated features (a rank-16 signal plus noise), four of them with a scale of
    20 (the "massive activations" of LLMs)."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(tokens, 16, generator=generator) @ torch.randn(16, features, generator=generator) / 4
    x = signal + 0.5 * torch.randn(tokens, features, generator=generator)
    x[:, [3, 17, 40, 58]] *= 20.0
    return x


def _layer_errors(pattern: str | None, sparsity: float | None, seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(100 + seed)
    x = _outlier_inputs(seed=seed)
    weight = torch.randn(48, 64, generator=generator)
    stats = LayerStatistics(64, with_hessian=True)
    for chunk in x.split(256):  # accumulated in pieces, as the engine does window by window
        stats.update(chunk)
    errors = {}
    for method in METHODS:
        config = method_config(method, sparsity=sparsity, pattern=pattern, block_size=16)
        outcome = get_solver_class(method)(config).prune_layer(weight.clone(), stats)
        assert torch.all(outcome.weight[~outcome.mask] == 0)
        errors[method] = float((x @ weight.T - x @ outcome.weight.T).pow(2).sum())
    return errors


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern, sparsity", [(None, 0.5), ("2:4", None)], ids=["50%", "2:4"])
def test_reconstruction_error_order_sparsegpt_wanda_magnitude(pattern, sparsity, seed):
    errors = _layer_errors(pattern, sparsity, seed)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    # by clear margins, not by noise: wanda keeps the weights of the outlier features, sparsegpt also
    # compensates the pruned weights through the correlated inputs
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors


def test_layer_statistics_match_direct_computation():
    x = _outlier_inputs(tokens=300)
    stats = LayerStatistics(64, with_hessian=True)
    for chunk in (x[:100], x[100:250], x[250:]):
        stats.update(chunk)
    assert stats.num_tokens == 300
    torch.testing.assert_close(stats.norms, x.norm(dim=0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.hessian, x.T @ x / 300, rtol=1e-4, atol=1e-3)


def test_layer_statistics_do_not_depend_on_window_order():
    """The float64 sums make the float32 results independent of how windows are grouped and ordered,
    which is what lets one process and several (each summing its own share) agree."""
    generator = torch.Generator().manual_seed(5)
    windows = [torch.randn(128, 96, generator=generator) * (1 + 10 * i) for i in range(12)]
    forward = LayerStatistics(96, with_hessian=True)
    for window in windows:
        forward.update(window)
    backward = LayerStatistics(96, with_hessian=True)
    for window in reversed(windows):
        backward.update(window)
    assert torch.equal(forward.hessian, backward.hessian)
    assert torch.equal(forward.sq_norms, backward.sq_norms)
    backward.update(windows[0])  # updating after a read continues the sum
    assert backward.num_tokens == 13 * 128
    expected = sum(w.double().T @ w.double() for w in windows + windows[:1]) / (13 * 128)
    scale = float(expected.abs().max())
    torch.testing.assert_close(backward.hessian, expected.float(), rtol=1e-5, atol=1e-6 * scale)


def test_layer_statistics_chunked_products_match_one_product(monkeypatch):
    monkeypatch.setattr(LayerStatistics, "CHUNK_ELEMENTS", 5 * 64)  # 5 rows of X^T X at a time
    x = _outlier_inputs(tokens=200)
    chunked = LayerStatistics(64, with_hessian=True)
    chunked.update(x)
    torch.testing.assert_close(chunked.hessian, x.T @ x / 200, rtol=1e-5, atol=1e-4)


def test_conv1d_helpers_report_input_dimension():
    model = build_model("gpt2")
    attn = model.transformer.h[0].attn.c_attn
    assert is_transposed(attn)
    assert attn.weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert get_weight(attn).shape == (96, 32)


def test_topk_mask_prunes_the_lower_index_first_among_equal_scores():
    """Ties (quantised weights have many equal |W|) go by index, as in the Wanda reference code."""
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    assert topk_mask(scores, 0.5, "row").tolist() == [[True, False, False, False, True, True]]
    flat = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    assert topk_mask(flat, 0.5, "layer").tolist() == [[False, True], [False, True]]


def test_prune_ties_zeroes_every_score_up_to_the_threshold_like_the_reference_baseline():
    """The reference magnitude rule prunes all |W| <= the (k+1)-th smallest: k + 1 or more when tied."""
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    # k = 3; the 4th smallest is 1.0, so all four 1.0 go (one more than exactly 50%)
    assert topk_mask(scores, 0.5, "row", prune_ties=True).tolist() == [[True, False, False, False, True, False]]
    distinct = torch.tensor([[4.0, 1.0, 2.0, 3.0]])
    assert topk_mask(distinct, 0.25, "layer", prune_ties=True).tolist() == [[True, False, False, True]]
    assert topk_mask(distinct, 0.0, "layer", prune_ties=True).all()


def test_prune_ties_is_refused_with_an_nm_pattern():
    with pytest.raises(ValueError, match="prune_ties applies to unstructured"):
        SparsityConfig(method="magnitude", pattern="2:4", prune_ties=True)
    with pytest.raises(TypeError, match="prune_ties must be true or false"):
        SparsityConfig(method="magnitude", prune_ties="yes")


def test_sparsegpt_float32_factorisation_of_wide_layers_matches_float64(monkeypatch):
    """Above FLOAT64_MAX_FEATURES inputs the inverse Cholesky runs in float32 (memory on 7B shapes)."""
    import optimum_sparse.solvers.sparsegpt as sparsegpt

    x = _outlier_inputs(tokens=400)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    stats = LayerStatistics(64, with_hessian=True)
    stats.update(x)
    solver = get_solver_class("sparsegpt")(method_config("sparsegpt", sparsity=0.5, block_size=16))
    wide = sparsegpt.inverse_cholesky_upper(stats.hessian, weight.clone(), 0.01)
    reference = solver.prune_layer(weight.clone(), stats)
    monkeypatch.setattr(sparsegpt, "FLOAT64_MAX_FEATURES", 32)
    assert sparsegpt.inverse_cholesky_upper(stats.hessian, weight.clone(), 0.01).dtype == torch.float32
    torch.testing.assert_close(
        sparsegpt.inverse_cholesky_upper(stats.hessian, weight.clone(), 0.01), wide, rtol=1e-4, atol=1e-5
    )
    in_float32 = solver.prune_layer(weight.clone(), stats)
    assert (in_float32.mask == reference.mask).float().mean() > 0.99
    torch.testing.assert_close(in_float32.weight, reference.weight, rtol=1e-3, atol=1e-3)
