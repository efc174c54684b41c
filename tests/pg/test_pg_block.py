"""pg_objective="block": per-weight and channel masks learned block by block inside prune()."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, SEQ_LEN, build_model

from optimum_sparse import SparsityCallback, SparsityConfig, prune
from optimum_sparse.architecture import get_weight
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.masks import is_valid_nm
from optimum_sparse.structured.sliced_checkpoint import slice_pruned_channels
from optimum_sparse.structured.unit_masks import channel_keep_from_masks, unit_weight_masks
from optimum_sparse.structured.units import find_channel_groups, unit_costs


def _config(**kwargs) -> SparsityConfig:
    settings = dict(
        method="pg", pg_objective="block", sparsity=0.5, num_samples=4, seq_len=SEQ_LEN, device="cpu", pg_block_steps=12
    )
    settings.update(kwargs)
    return SparsityConfig(**settings)


def test_block_objective_gives_exact_sparsity_and_lowers_the_block_error_of_its_wanda_start(
    tokenizer, calibration_text
):
    """100 score updates per block lower the blocks' output error below the Wanda mask's (fixed seeds)."""
    windows = sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0)
    model = build_model("llama")
    config = _config(num_samples=16, pg_block_steps=100, refresh_every=2)
    result = prune(model, config, windows, show_progress=False)
    assert result.masks and all(s == pytest.approx(0.5, abs=1e-3) for s in result.layer_sparsity.values())
    for name, mask in result.masks.items():
        weight = get_weight(model.get_submodule(name))
        assert torch.isfinite(weight).all()
        assert bool((weight[~mask] == 0).all())
    assert set(result.block_reports) == {0, 1}
    for report in result.block_reports.values():
        assert report.steps == 100 and report.refreshes == 50  # each sample reused for 2 steps
        assert report.used_learned == (report.learned_error <= report.initial_error)
    assert any(r.learned_error < r.initial_error for r in result.block_reports.values())


def test_block_objective_learns_valid_nm_masks_and_takes_the_admm_refit(windows):
    plain = build_model("llama")
    refitted = build_model("llama")
    nm = prune(plain, _config(sparsity=None, pattern="2:4"), windows, show_progress=False)
    both = prune(refitted, _config(sparsity=None, pattern="2:4", weight_update="admm"), windows, show_progress=False)
    assert all(is_valid_nm(mask, 2, 4) for mask in nm.masks.values())
    assert all(is_valid_nm(mask, 2, 4) for mask in both.masks.values())
    # block 0 sees the same inputs in both runs, so it learns the same masks; the refit then changes the
    # kept weights (and only those) and records the layer errors it reached
    first = [name for name in both.masks if ".layers.0." in name]
    assert first and all(torch.equal(nm.masks[n], both.masks[n]) for n in first)
    for name in first:
        kept = both.masks[name]
        before = get_weight(plain.get_submodule(name))[kept]
        after = get_weight(refitted.get_submodule(name))[kept]
        assert not torch.allclose(before, after)
        assert 0 < both.layer_errors[name] < 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_objective_channels_remove_whole_units_at_each_blocks_budget(arch, tokenizer, calibration_text):
    """Channel masks learned per block: whole rows/columns, the block's budget, the guard's promise."""
    windows = sample_windows(tokenize(calibration_text, tokenizer), 8, SEQ_LEN, seed=0)
    model = build_model(arch)
    config = _config(pattern="channels", sparsity=0.4, num_samples=8, pg_block_steps=30, samples_per_step=2)
    result = prune(model, config, windows, show_progress=False)
    groups = find_channel_groups(model)
    assert len(result.masks) == sum(len(g.slices) for g in groups)
    keep = channel_keep_from_masks(groups, result.masks)  # the unit mask must explain every layer's mask
    expected = unit_weight_masks(groups, keep)
    assert all(torch.equal(result.masks[name], expected[name]) for name in result.masks)
    costs = unit_costs(groups)
    for block in range(2):  # each block removes >= 40% of its parameters, less than one more unit beyond
        units = slice(groups[2 * block].offset, groups[2 * block + 1].offset + groups[2 * block + 1].num_units)
        removed = float(costs[units][~keep[units]].sum()) / float(costs[units].sum())
        assert 0.4 <= removed < 0.4 + float(costs[units].max()) / float(costs[units].sum())
    for report in result.block_reports.values():
        assert report.used_learned == (report.learned_error <= report.initial_error)
    # the pruned model computes what its sliced version computes (removed units' biases are zero too)
    ids = windows[:2, :12]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        kept = slice_pruned_channels(model, result.masks)
        assert torch.allclose(model(input_ids=ids).logits, masked, atol=1e-5)
    assert model.config.sliced_units == kept
    assert sum(kept.values()) == int(keep.sum())


def test_block_objective_channels_take_the_admm_refit_and_stay_whole_units(windows):
    """The refit changes kept weights of the output projections only; removed units stay removed."""
    plain, refitted = build_model("llama"), build_model("llama")
    config = dict(pattern="channels", sparsity=0.4, samples_per_step=2, pg_block_steps=5)
    masks = prune(plain, _config(**config), windows, show_progress=False).masks
    both = prune(refitted, _config(**config, weight_update="admm"), windows, show_progress=False)
    first = [name for name in masks if ".layers.0." in name]  # same inputs in both runs: same masks
    assert first and all(torch.equal(masks[n], both.masks[n]) for n in first)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.allclose(get_weight(plain.get_submodule(down)), get_weight(refitted.get_submodule(down)))
    ids = windows[:2, :12]
    with torch.no_grad():
        before = refitted(input_ids=ids).logits
        slice_pruned_channels(refitted, both.masks)
        assert torch.allclose(refitted(input_ids=ids).logits, before, atol=1e-5)


def test_block_objective_channels_need_every_projection_as_a_target(windows):
    config = _config(pattern="channels", sparsity=0.3, ignore=["down_proj"])
    with pytest.raises(ValueError, match="not targets"):
        prune(build_model("llama"), config, windows, show_progress=False)


def test_the_trainer_callback_refuses_the_block_objective():
    with pytest.raises(ValueError, match="block by block in optimum_sparse.prune"):
        SparsityCallback(SparsityConfig(method="pg", sparsity=0.5, pg_objective="block"))
    with pytest.raises(ValueError, match="pg_objective='block'"):
        prune(build_model("llama"), SparsityConfig(method="pg", sparsity=0.5), None, show_progress=False)


def test_block_objective_starts_from_wanda_row_masks(windows):
    """Without learning (pg_block_steps=0) the hard mask of block 0 is Wanda's (per-row top of |W| ||X||)."""
    wanda = prune(
        build_model("llama"),
        SparsityConfig(method="wanda", sparsity=0.5, num_samples=4, seq_len=SEQ_LEN, device="cpu"),
        windows,
        show_progress=False,
    )
    still = prune(build_model("llama"), _config(pg_block_steps=0), windows, show_progress=False)
    first = [name for name in wanda.masks if ".layers.0." in name]
    assert first and all(torch.equal(wanda.masks[n], still.masks[n]) for n in first)
