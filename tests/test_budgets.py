"""Layer budgets: OWL's outlier-weighed profile and explicit per-block / per-regex sparsities."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import build_model

from optimum_sparse import SparsityConfig, prune
from optimum_sparse.budgets import outlier_ratio, owl_sparsities
from optimum_sparse.evaluation import sparsity_report
from optimum_sparse.modeling import SparseModel


def _block_sparsity(result, block: int) -> float:
    masks = [m for name, m in result.masks.items() if f"layers.{block}." in name]
    return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 13.0])]  # mean 2.5
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 6.0) == 0.0


def test_owl_sparsities_fall_as_outliers_rise_and_keep_the_weighted_mean():
    budgets = owl_sparsities([0.01, 0.05, 0.03, 0.02], [1, 1, 2, 4], target=0.6, lam=0.08)
    weights = torch.tensor([1, 1, 2, 4], dtype=torch.float64) / 8
    assert float((torch.tensor(budgets, dtype=torch.float64) * weights).sum()) == pytest.approx(0.6, abs=1e-9)
    assert budgets[1] < budgets[2] < budgets[3] < budgets[0]  # most outliers -> fewest zeros
    assert max(budgets) - min(budgets) == pytest.approx(2 * 0.08)


def test_owl_sparsities_clip_at_zero_and_move_the_rest_to_other_blocks():
    budgets = owl_sparsities([0.0, 1.0, 0.5], [1, 1, 1], target=0.05, lam=0.2)
    assert min(budgets) == 0.0
    assert sum(budgets) / 3 == pytest.approx(0.05, abs=1e-9)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_profile_meets_the_requested_mean_with_different_block_budgets(method, windows):
    model = build_model("llama", num_hidden_layers=4)
    config = SparsityConfig(method=method, sparsity=0.6, sparsity_profile="owl", owl_m=3, owl_lambda=0.1, device="cpu")
    result = prune(model, config, windows, show_progress=False)
    assert result.sparsity == pytest.approx(0.6, abs=5e-3)  # the mean; each 32-wide row rounds its budget
    blocks = [_block_sparsity(result, b) for b in range(4)]
    assert max(blocks) - min(blocks) > 0.05  # the blocks really got different budgets
    assert sorted(set(result.budgets.values())) == pytest.approx(sorted(set(round(b, 6) for b in blocks)), abs=1e-2)


def test_explicit_budgets_per_block_and_per_regex(windows):
    model = build_model("llama", num_hidden_layers=3)
    result = prune(model, SparsityConfig(method="wanda", layer_sparsity=[0.3, 0.5, 0.7]), windows, show_progress=False)
    assert [_block_sparsity(result, b) for b in range(3)] == pytest.approx([0.3, 0.5, 0.7], abs=0.01)  # 32-wide rows

    model = build_model("llama", num_hidden_layers=3)
    config = SparsityConfig(
        method="sparsegpt", sparsity=0.5, layer_sparsity={r"mlp\.down_proj": 0.8, r"layers\.0\.": 0.2}
    )
    result = prune(model, config, windows, show_progress=False)
    assert result.layer_sparsity["model.layers.1.mlp.down_proj"] == pytest.approx(0.8, abs=0.01)
    assert result.layer_sparsity["model.layers.0.mlp.down_proj"] == pytest.approx(0.8, abs=0.01)  # first match wins
    assert result.layer_sparsity["model.layers.0.self_attn.q_proj"] == pytest.approx(0.2, abs=0.01)
    assert result.layer_sparsity["model.layers.2.self_attn.q_proj"] == pytest.approx(0.5, abs=0.01)  # unmatched


def test_block_solvers_take_one_budget_per_block(windows):
    model = build_model("llama", num_hidden_layers=2)
    config = SparsityConfig(method="sparsellm", layer_sparsity=[0.4, 0.6], sparsellm_iterations=1, device="cpu")
    result = prune(model, config, windows, show_progress=False)
    assert [_block_sparsity(result, b) for b in range(2)] == pytest.approx([0.4, 0.6], abs=0.01)
    mixed = SparsityConfig(method="sparsellm", layer_sparsity={"down_proj": 0.7}, sparsellm_iterations=1)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="prunes a block as a whole at one sparsity"):
        prune(model, mixed, windows, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))  # refused before any work


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(pattern="2:4", sparsity_profile="owl"), "prune unstructured"),
        (dict(sparsity_profile="owl", layer_sparsity=[0.5]), "not both"),
        (dict(sparsity_profile="spiky"), "sparsity_profile must be"),
        (dict(sparsity_profile="owl", owl_lambda=0.7), "owl_lambda must be a number in"),
        (dict(layer_sparsity=[0.5, 1.2]), "fractions in"),
        (dict(layer_sparsity={"(": 0.5}), "not a valid regular expression"),
    ],
)
def test_bad_budgets_are_refused_by_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(method="wanda", **settings)


@pytest.mark.parametrize(
    ("budgets", "message"), [([0.5, 0.5, 0.5], "has 3 values but the model has 2 blocks"), ({"nope": 0.5}, "match no")]
)
def test_budgets_that_do_not_fit_the_model_fail_before_any_work(budgets, message, windows):
    model = build_model("llama")
    with pytest.raises(ValueError, match=message):
        prune(model, SparsityConfig(method="wanda", layer_sparsity=budgets), windows, show_progress=False)
    assert sparsity_report(model)["total"] == 0.0


def test_budgets_are_saved_in_sparsity_config_and_reload(windows, tmp_path):
    model = build_model("llama", num_hidden_layers=3)
    config = SparsityConfig(method="wanda", sparsity=0.5, sparsity_profile="owl", owl_m=3)
    result = prune(model, config, windows, show_progress=False)
    SparseModel(model, masks=result.masks, config=config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "sparsity_config.json").read_text())
    assert saved["sparsity_profile"] == "owl" and saved["owl_m"] == 3
    assert [round(v, 4) for v in saved["block_sparsity"].values()] == [
        round(_block_sparsity(result, b), 4) for b in range(3)
    ]
    assert SparsityConfig.from_pretrained(tmp_path) == config


def test_a_checkpoint_from_before_layer_budgets_reads_its_measured_layer_sparsity_as_metadata(tmp_path, caplog):
    old = {"method": "wanda", "sparsity": 0.5, "measured_sparsity": 0.5, "layer_sparsity": {"model.layers.0.mlp": 0.5}}
    (tmp_path / "sparsity_config.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.config"):
        assert SparsityConfig.from_pretrained(tmp_path).layer_sparsity is None
    assert "written before layer budgets" in caplog.text  # said, so a hand-edited file's budgets are not lost silently


def test_a_block_without_pruned_layers_does_not_shrink_the_owl_spread():
    with_empty = owl_sparsities([0.02, 0.03, 0.0, 0.05], [1, 1, 0, 1], target=0.5, lam=0.08)
    without = owl_sparsities([0.02, 0.03, 0.05], [1, 1, 1], target=0.5, lam=0.08)
    assert [with_empty[i] for i in (0, 1, 3)] == pytest.approx(without)


def test_per_block_budgets_in_a_file_without_measured_layer_sparsity_are_kept(tmp_path):
    edited = {"method": "wanda", "sparsity": 0.5, "measured_sparsity": 0.5, "layer_sparsity": [0.4, 0.6]}
    (tmp_path / "sparsity_config.json").write_text(json.dumps(edited))  # old files never held a list there
    assert SparsityConfig.from_pretrained(tmp_path).layer_sparsity == [0.4, 0.6]


def test_an_empty_budget_list_is_refused():
    with pytest.raises(ValueError, match="layer_sparsity is an empty list"):
        SparsityConfig(method="wanda", layer_sparsity=[])
