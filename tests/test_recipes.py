"""Recipes (`--recipe best`): the preset per sparsity, and explicit settings winning over it."""

from __future__ import annotations

import json

import pytest
from conftest import prune_args

from optimum_sparse import cli
from optimum_sparse.config import SparsityConfig
from optimum_sparse.recipes import RECIPES, recipe_rule


def test_best_recipe_picks_the_settings_of_each_sparsity():
    half = SparsityConfig.recipe("best", 0.5)
    assert (half.method, half.sparsity, half.sparsity_profile, half.reconstruction) == ("admm", 0.5, "owl", "block")
    two_four = SparsityConfig.recipe("best", "2:4")
    assert (two_four.method, two_four.pattern, two_four.nm, two_four.reconstruction) == ("sparsellm", "2:4", (2, 4), "block")
    assert two_four.sparsity_profile is None  # a layer profile cannot apply to N:M
    high = SparsityConfig.recipe("best", 0.7)
    assert (high.method, high.sparsity_profile, high.reconstruction) == ("sparsellm", "owl", "block")


def test_keywords_override_the_recipe():
    config = SparsityConfig.recipe("best", 0.5, reconstruction=None, reconstruction_epochs=3)
    assert config.method == "admm" and config.reconstruction is None and config.reconstruction_epochs == 3
    assert SparsityConfig.recipe("best", 0.7, method="wanda").method == "wanda"
    with pytest.raises(ValueError, match="recipe\\(\\)'s `sparsity` argument"):
        SparsityConfig.recipe("best", 0.5, pattern="2:4")


def test_every_rule_of_every_recipe_builds_a_valid_config():
    for name, rules in RECIPES.items():
        for rule in rules:
            amount = "2:4" if rule.kind == "n:m" else min(rule.max_sparsity, 0.9)
            chosen = recipe_rule(name, None if rule.kind == "n:m" else amount, "2:4" if rule.kind == "n:m" else None)
            assert chosen is rule  # every rule is reachable
            SparsityConfig.recipe(name, amount)
            assert rule.reason


def test_unknown_recipe_and_structured_pattern_are_refused():
    with pytest.raises(ValueError, match="unknown recipe 'fastest'; recipes are \\['best'\\]"):
        SparsityConfig.recipe("fastest", 0.5)
    with pytest.raises(ValueError, match="unstructured or N:M"):
        recipe_rule("best", 0.3, "channels")


def _config(*flags: str) -> SparsityConfig:
    return cli.config_from_args(cli.build_parser().parse_args(["prune", *flags]))


def test_cli_recipe_then_explicit_flags_win():
    config = _config("--recipe", "best", "--sparsity", "0.5")
    assert (config.method, config.sparsity, config.reconstruction) == ("admm", 0.5, "block")
    config = _config("--recipe", "best", "--sparsity", "0.5", "--method", "wanda", "--set", "reconstruction_epochs=2")
    assert (config.method, config.reconstruction, config.reconstruction_epochs) == ("wanda", "block", 2)
    assert _config("--recipe", "best", "--sparsity", "0.7").method == "sparsellm"
    assert _config("--recipe", "best", "--sparsity", "2:4").pattern == "2:4"
    # the rule follows the sparsity the run will have, also when --set gives it
    assert _config("--recipe", "best", "--set", "sparsity=0.7").method == "sparsellm"
    assert _config("--recipe", "best", "--set", "pattern=2:4").method == "sparsellm"
    with pytest.raises(ValueError, match="unstructured or N:M"):
        _config("--recipe", "best", "--set", "pattern=channels")


def test_cli_recipe_and_config_file_together_are_refused(tmp_path):
    SparsityConfig(method="wanda").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pass one of them"):
        _config("--recipe", "best", "--config", str(tmp_path))


def test_cli_prune_with_recipe_reports_it(saved_llama, text_file, capsys):
    settings = ["reconstruction_epochs=1", "admm_iterations=5", "admm_gradual_steps=2"]
    args = prune_args(saved_llama, text_file, "--recipe", "best", "--sparsity", "0.5", "--set", *settings, "--json")
    assert cli.main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["recipe"] == "best" and record["method"] == "admm"
    assert record["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
