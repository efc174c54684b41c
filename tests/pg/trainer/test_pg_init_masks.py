"""SparsityCallback(init_masks=...): mask learning that starts from a given mask (e.g. one learned block by block)."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ_LEN, build_model
from pg_helpers import Windows, make_trainer

from optimum_sparse import SparseModel, SparsityCallback, SparsityConfig
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.masks import is_valid_nm
from optimum_sparse.sequential import prune
from optimum_sparse.structured.unit_masks import unit_weight_masks


@pytest.fixture
def dataset(tokenizer, calibration_text) -> Windows:
    return Windows(sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0))


@pytest.fixture
def calibration(dataset) -> torch.Tensor:
    return dataset.ids[:8]


def _probe(config: SparsityConfig) -> SparsityCallback:
    """A callback prepared on a fresh tiny Llama (its space names the units)."""
    callback = SparsityCallback(config)
    callback.prepare(build_model("llama"))
    return callback


def _random_channel_mask(callback: SparsityCallback, seed: int) -> torch.Tensor:
    """A feasible channel keep-vector unrelated to the Wanda metric: the hard mask of random scores."""
    space = callback.space
    scores = torch.rand(space.num_units, generator=torch.Generator().manual_seed(seed))
    return space.harden(space.project(scores))


@pytest.mark.parametrize("init", ["wanda", "uniform"])
def test_channel_scores_start_at_the_given_mask(init, calibration):
    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, init=init)
    probe = _probe(config)
    keep = _random_channel_mask(probe, 0)
    masks = unit_weight_masks(probe.space.groups, keep)

    callback = SparsityCallback(config, calibration=calibration, init_masks=masks)
    callback.prepare(build_model("llama"))
    callback.initialise()
    scores = callback.learner.scores.detach()
    assert torch.equal(callback.space.harden(scores), keep)
    assert callback.space.expected_sparsity(scores) == pytest.approx(0.3, abs=1e-3)
    # the kept units are the more probable ones, yet sampling still explores
    assert float(scores[keep].min()) > float(scores[~keep].max())
    assert float(scores[keep].min()) < 0.99 and float(scores[~keep].max()) > 0.01
    if init == "wanda":  # the metric orders the units within each side: not all kept units are equal
        assert float(scores[keep].std()) > 1e-3


def test_unstructured_and_2_4_scores_start_at_a_pruned_models_masks(calibration):
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        wanda = SparsityConfig(method="wanda", sparsity=sparsity, pattern=None if sparsity else pattern)
        pruned = prune(build_model("llama"), wanda, calibration)
        config = SparsityConfig(method="pg", pattern=pattern, sparsity=sparsity, init_temperature=0.5)
        callback = SparsityCallback(config, calibration=calibration, init_masks=pruned.masks)
        callback.prepare(build_model("llama"))
        callback.initialise()
        hard = callback.space.weight_masks(callback.space.harden(callback.learner.scores.detach()))
        for name, mask in pruned.masks.items():
            assert torch.equal(hard[name], mask), (pattern, name)
            if pattern == "2:4":
                assert is_valid_nm(hard[name], 2, 4)


def test_trainer_refines_masks_read_from_a_saved_sparse_model(dataset, calibration, tmp_path):
    wanda_model = build_model("llama")
    pruned = prune(wanda_model, SparsityConfig(method="wanda", sparsity=0.5), calibration)
    SparseModel(wanda_model, masks=pruned.masks).save_pretrained(tmp_path / "wanda")

    model = build_model("llama")  # dense weights: sampled sub-models may put pruned weights back
    config = SparsityConfig(method="pg", pattern="unstructured", sparsity=0.5, init_temperature=0.25)
    callback = SparsityCallback(config, init_masks=tmp_path / "wanda")
    trainer = make_trainer(model, dataset, callback, tmp_path / "run", steps=3)
    trainer.train()
    assert len(callback.history) == 3
    agree = [float((callback.masks[name] == mask).float().mean()) for name, mask in pruned.masks.items()]
    assert min(agree) > 0.9  # three steps from a sharp start: close to the Wanda mask it started from
    kept = sum(int(mask.sum()) for mask in callback.masks.values())
    total = sum(mask.numel() for mask in callback.masks.values())
    assert kept == total - round(total * 0.5)


def test_init_masks_errors_name_the_fix(calibration, tmp_path):
    wanda = prune(build_model("llama"), SparsityConfig(method="wanda", sparsity=0.5), calibration).masks
    channels = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, init="uniform")
    callback = SparsityCallback(channels, init_masks=wanda)
    with pytest.raises(ValueError, match="do not remove whole channels"):
        callback.prepare(build_model("llama"))

    unstructured = SparsityConfig(method="pg", pattern="unstructured", sparsity=0.5, init="uniform")
    partial = {name: mask for name, mask in wanda.items() if "mlp" in name}
    callback = SparsityCallback(unstructured, init_masks=partial)
    with pytest.raises(ValueError, match="no mask for .*self_attn"):
        callback.prepare(build_model("llama"))

    nm = SparsityConfig(method="pg", pattern="2:4", init="uniform")
    callback = SparsityCallback(nm, init_masks=wanda)
    with pytest.raises(ValueError, match="not 2:4"):
        callback.prepare(build_model("llama"))

    with pytest.raises(FileNotFoundError, match="sparsity_masks.safetensors"):
        SparsityCallback(unstructured, init_masks=tmp_path / "missing")
