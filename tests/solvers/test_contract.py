"""The contract every registered method keeps, checked for each one from its declared capabilities.

Parametrised over `available_methods()` x the patterns each solver declares (`Solver.patterns`) x the
test architectures, running each method with its `smoke_settings`, so a new method is tested without
editing a list. `toy_method` (a file of this test tree) registers "toy" exactly as a user's own file
would, and is tested here like the built-in methods.
"""

from __future__ import annotations

import pytest
import torch
import toy_method  # noqa: F401  registers "toy" as docs/adding_a_method.md shows
from conftest import ARCHITECTURES, SEQ_LEN, build_model

from optimum_sparse import SparsityConfig, available_methods, prune, refit_weights
from optimum_sparse.architecture import get_weight
from optimum_sparse.masks import is_valid_nm
from optimum_sparse.registry import get_solver_class, methods_used, option_owners, options_of

#: how each declared pattern is asked for
PATTERNS = {"unstructured": {"sparsity": 0.5}, "n:m": {"pattern": "2:4"}, "channels": {"pattern": "channels", "sparsity": 0.3}}
CASES = [(method, pattern) for method in available_methods() for pattern in get_solver_class(method).patterns]


def _config(method: str, pattern: str) -> SparsityConfig:
    settings = get_solver_class(method).smoke_settings
    return SparsityConfig(method=method, num_samples=4, seq_len=SEQ_LEN, device="cpu", **PATTERNS[pattern], **settings)


def test_the_toy_method_from_the_test_tree_is_registered_with_its_setting():
    assert "toy" in available_methods()
    assert SparsityConfig(method="toy").toy_power == 1.0
    assert SparsityConfig(method="toy", toy_power=2).toy_power == 2.0
    with pytest.raises(ValueError, match="toy_power must be a finite number > 0"):
        SparsityConfig(method="toy", toy_power=0)


@pytest.mark.parametrize("method", available_methods())
def test_every_setting_has_a_doc_and_a_default_that_passes_its_own_check(method):
    for option in options_of(method):
        assert option.doc.strip(), f"{method}.{option.name} has no doc"
        assert option.validate(option.default) == option.default


@pytest.mark.parametrize("method, pattern", CASES)
def test_config_holds_exactly_the_used_methods_settings_and_round_trips(method, pattern):
    config = _config(method, pattern)
    used = methods_used(config.method, config.weight_update, config.settings)
    assert set(config.settings) == {option.name for name in used for option in options_of(name)}
    assert SparsityConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("method", available_methods())
def test_a_setting_of_a_method_the_run_does_not_use_is_refused_naming_its_method(method):
    used = set(methods_used(method, None, {}))
    name, owners = next((n, o) for n, o in option_owners().items() if not used & set(o))
    with pytest.raises(ValueError, match=rf"{name} is a setting of method '{owners[0]}'.*does not use"):
        SparsityConfig(method=method, **{name: _default(name)})


def _default(name: str):
    owner = option_owners()[name][0]
    return next(option.default for option in options_of(owner) if option.name == name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method, pattern", CASES)
def test_prune_meets_the_declared_pattern_with_zeros_outside_the_masks(method, pattern, arch, windows):
    model = build_model(arch)
    config = _config(method, pattern)
    result = prune(model, config, windows, show_progress=False)
    assert result.masks, "nothing was pruned"
    for name, mask in result.masks.items():
        weight = get_weight(model.get_submodule(name))
        assert weight.shape == mask.shape and bool(torch.isfinite(weight).all()), name
        assert bool((weight[~mask] == 0).all()), f"{name}: non-zero weight outside the mask"
        if pattern == "n:m":
            assert is_valid_nm(mask, 2, 4), name
        if pattern == "unstructured":
            assert result.layer_sparsity[name] == pytest.approx(0.5, abs=0.02), name
        if pattern == "channels":  # whole units: a kept weight's row and column are both kept
            rows, cols = mask.any(1), mask.any(0)
            assert torch.equal(mask, rows.unsqueeze(1) & cols.unsqueeze(0)), name
    if pattern == "channels":
        assert result.sparsity >= 0.3 - 1e-6
    with torch.no_grad():
        assert bool(torch.isfinite(model(windows[:1]).logits).all())


@pytest.mark.parametrize("method", [m for m in available_methods() if get_solver_class(m).can_refit])
def test_weight_update_methods_refit_any_mask_without_moving_it(method, windows):
    model = build_model("llama")
    masks = prune(model, SparsityConfig(method="wanda", num_samples=4, seq_len=SEQ_LEN), windows, show_progress=False).masks
    before = {name: get_weight(model.get_submodule(name)).clone() for name in masks}
    config = SparsityConfig(method=method, num_samples=4, seq_len=SEQ_LEN, **get_solver_class(method).smoke_settings)
    result = refit_weights(model, windows, method=method, masks=masks, config=config, show_progress=False)
    assert all(torch.equal(result.masks[name], masks[name]) for name in masks)
    moved = [name for name in masks if not torch.equal(get_weight(model.get_submodule(name)), before[name])]
    assert moved, "the refit changed no weight"
    assert all(bool((get_weight(model.get_submodule(n))[~masks[n]] == 0).all()) for n in masks)


def test_a_solver_must_prune_a_layer_or_a_block():
    from optimum_sparse.solvers import Solver

    with pytest.raises(TypeError, match="must implement prune_layer .* or prune_block"):

        class Nothing(Solver):  # noqa: F841 - the class statement itself fails
            pass
