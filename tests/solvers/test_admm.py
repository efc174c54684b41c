"""The ADMM solver (Boža 2024, arXiv 2401.02938): quality against SparseGPT and Wanda, the refit's
no-worse guarantee, exact sparsity and N:M validity, and robustness to degenerate calibration."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import SEQ_LEN, build_model, method_config

from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import is_valid_nm, num_pruned
from optimum_sparse.sequential import prune
from optimum_sparse.solvers import LayerStatistics, available_methods, get_solver_class
from optimum_sparse.solvers import admm as admm_module
from optimum_sparse.solvers.admm import AdmmSolver, admm_refit


def _correlated_layer(out_features: int = 64, in_features: int = 128, tokens: int = 2048, seed: int = 0):
    """Inputs X = randn @ randn (strongly correlated features), four features scaled by 20 (LLM outliers)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    x = torch.randn(tokens, in_features, generator=generator) @ mixing
    x[:, torch.randperm(in_features, generator=generator)[:4]] *= 20.0
    weight = torch.randn(out_features, in_features, generator=generator)
    stats = LayerStatistics(in_features, with_hessian=True)
    for chunk in x.split(512):  # accumulated window by window, as the engine does
        stats.update(chunk)
    return x, weight, stats


def _output_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    """||X W^T - X W'^T||^2 computed from the inputs themselves (not from the solver's Hessian)."""
    return float((x @ weight.T - x @ pruned.T).pow(2).sum())


def _prune(method: str, weight: torch.Tensor, stats: LayerStatistics, **kwargs):
    config = method_config(method, block_size=32, **kwargs)
    return get_solver_class(method)(config).prune_layer(weight.clone(), stats)


def _assert_exactly_sparse(result) -> None:
    assert result.mask.dtype == torch.bool and result.mask.shape == result.weight.shape
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[~result.mask] == 0), "non-zero weight outside the mask"


def test_admm_is_registered_and_needs_the_hessian():
    assert "admm" in available_methods()
    assert get_solver_class("admm") is AdmmSolver
    assert AdmmSolver.requires_hessian and AdmmSolver.default_scope == "row"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
def test_admm_reconstruction_error_is_below_sparsegpt_and_wanda(amount, seed):
    x, weight, stats = _correlated_layer(seed=seed)
    errors = {
        m: _output_error(x, weight, _prune(m, weight, stats, **amount).weight) for m in ("admm", "sparsegpt", "wanda")
    }
    # measured margins are ~0.55-0.7x SparseGPT and ~0.35x Wanda; the bounds leave room for noise only
    assert errors["admm"] < 0.85 * errors["sparsegpt"], errors
    assert errors["admm"] < 0.6 * errors["wanda"], errors


@pytest.mark.parametrize("amount", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
@pytest.mark.parametrize("source", ["wanda", "magnitude", "sparsegpt"])
def test_refit_on_a_fixed_mask_lowers_the_error_of_the_masked_weights(source, amount):
    x, weight, stats = _correlated_layer(seed=2)
    mask = _prune(source, weight, stats, **amount).mask
    refit = AdmmSolver(SparsityConfig(method="admm", **amount)).refit_layer(weight.clone(), mask, stats)
    assert torch.equal(refit.mask, mask), "the refit must not change the mask"
    _assert_exactly_sparse(refit)
    masked_error = _output_error(x, weight, weight * mask)
    refit_error = _output_error(x, weight, refit.weight)
    assert refit_error <= masked_error
    # not just "no worse": on correlated inputs the kept weights absorb a large part of the error
    assert refit_error < 0.7 * masked_error, (refit_error, masked_error)


def test_refit_of_sparsegpt_weights_is_no_worse_than_sparsegpt():
    """Refitting SparseGPT's own mask solves its least-squares problem better than its OBS sweep."""
    x, weight, stats = _correlated_layer(seed=3)
    sparsegpt = _prune("sparsegpt", weight, stats, sparsity=0.5)
    refit = AdmmSolver(SparsityConfig(method="admm")).refit_layer(weight.clone(), sparsegpt.mask, stats)
    assert _output_error(x, weight, refit.weight) < _output_error(x, weight, sparsegpt.weight)


def test_refit_guard_keeps_the_masked_weights_when_the_update_is_worse(monkeypatch, caplog):
    x, weight, stats = _correlated_layer(seed=4)
    mask = _prune("wanda", weight, stats, sparsity=0.5).mask

    def sabotaged(wn, problem, config, scope, keep=None, init_scores=None):
        return (wn * keep) * 3.0, keep  # a wrong "solution" with a much larger error

    monkeypatch.setattr(admm_module, "_run_admm", sabotaged)
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.solvers.admm"):
        refit = AdmmSolver(SparsityConfig(method="admm")).refit_layer(weight.clone(), mask, stats)
    assert torch.equal(refit.weight, weight * mask)
    assert "keeping the masked weights" in caplog.text


def test_admm_refit_function_matches_the_solver_method():
    x, weight, stats = _correlated_layer(seed=5)
    mask = _prune("wanda", weight, stats, pattern="2:4").mask
    config = SparsityConfig(method="admm")
    direct = admm_refit(weight.clone(), mask, stats.hessian, config, num_tokens=stats.num_tokens)
    via_solver = AdmmSolver(config).refit_layer(weight.clone(), mask, stats).weight
    torch.testing.assert_close(direct, via_solver)
    assert torch.all(direct[~mask] == 0)
    assert _output_error(x, weight, direct) < _output_error(x, weight, weight * mask)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("scope", ["row", "layer"])
def test_unstructured_admm_prunes_exactly_the_requested_count(scope, sparsity):
    _, weight, stats = _correlated_layer(out_features=48, in_features=96, seed=6)
    result = _prune("admm", weight, stats, sparsity=sparsity, mask_scope=scope)
    _assert_exactly_sparse(result)
    pruned = ~result.mask
    if scope == "layer":
        assert int(pruned.sum()) == num_pruned(pruned.numel(), sparsity)
        assert pruned.sum(1).unique().numel() > 1, "layer scope should not be per-row uniform here"
    else:
        assert torch.all(pruned.sum(1) == num_pruned(pruned.shape[1], sparsity))


def test_admm_default_scope_is_row():
    _, weight, stats = _correlated_layer(out_features=32, in_features=64, seed=7)
    result = _prune("admm", weight, stats, sparsity=0.6)
    assert torch.all((~result.mask).sum(1) == num_pruned(64, 0.6))


@pytest.mark.parametrize("gradual", [True, False])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_admm_nm_masks_keep_exactly_n_in_every_group(pattern, gradual):
    n, m = map(int, pattern.split(":"))
    _, weight, stats = _correlated_layer(out_features=40, in_features=128, seed=8)
    result = _prune("admm", weight, stats, pattern=pattern, gradual=gradual)
    _assert_exactly_sparse(result)
    assert is_valid_nm(result.mask, n, m)
    assert torch.all(result.mask.reshape(40, -1, m).sum(-1) == n)


def test_rank_deficient_calibration_gives_finite_exactly_sparse_weights(caplog):
    """8 tokens for 64 features, one input that never fires and one duplicated input: H is singular."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(8, 64, generator=generator)
    x[:, 5] = 0.0  # dead input: zero Hessian diagonal
    x[:, 7] = x[:, 6]  # duplicated input
    weight = torch.randn(32, 64, generator=generator)
    stats = LayerStatistics(64, with_hessian=True)
    stats.update(x)
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.solvers.admm"):
        for amount in ({"sparsity": 0.5}, {"pattern": "2:4"}):
            result = _prune("admm", weight, stats, **amount)
            _assert_exactly_sparse(result)
            assert int((~result.mask).sum()) == 32 * 32
            assert not result.mask[:, 5].any(), "the dead input carries no signal and goes first"
            refit = AdmmSolver(SparsityConfig(method="admm")).refit_layer(weight.clone(), result.mask, stats)
            _assert_exactly_sparse(refit)
            assert _output_error(x, weight, refit.weight) <= _output_error(x, weight, weight * result.mask)
    assert "raising the dampening" in caplog.text
    assert "only 8 calibration tokens" in caplog.text
    assert "duplicate" in caplog.text
    assert "never fired" in caplog.text


def test_kept_weights_of_dead_inputs_are_left_unchanged():
    x, weight, stats = _correlated_layer(out_features=16, in_features=32, seed=10)
    x[:, 3] = 0.0
    stats = LayerStatistics(32, with_hessian=True)
    stats.update(x)
    mask = torch.ones(16, 32, dtype=torch.bool)
    mask[:, ::2] = False  # keeps column 3
    refit = AdmmSolver(SparsityConfig(method="admm")).refit_layer(weight.clone(), mask, stats)
    torch.testing.assert_close(refit.weight[:, 3], weight[:, 3])


def test_non_finite_hessian_is_rejected_with_a_clear_error():
    _, weight, stats = _correlated_layer(out_features=8, in_features=16, tokens=64, seed=11)
    stats.hessian[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _prune("admm", weight, stats, sparsity=0.5)


def test_non_gradual_admm_updates_the_wanda_like_mask():
    """gradual=False: the mask is chosen once from |W| of the normalised weights (Wanda's ranking), then
    only the weights move, so the error is far below Wanda's with (nearly) the same mask."""
    x, weight, stats = _correlated_layer(seed=12)
    wanda = _prune("wanda", weight, stats, sparsity=0.5)
    result = _prune("admm", weight, stats, sparsity=0.5, gradual=False)
    _assert_exactly_sparse(result)
    assert (result.mask == wanda.mask).float().mean() > 0.99
    assert _output_error(x, weight, result.weight) < 0.5 * _output_error(x, weight, wanda.weight)


@pytest.mark.parametrize("gradual", [False, True])
def test_wanda_mask_init(gradual):
    x, weight, stats = _correlated_layer(seed=13)
    wanda = _prune("wanda", weight, stats, pattern="2:4")
    result = _prune("admm", weight, stats, pattern="2:4", mask_init="wanda", gradual=gradual)
    _assert_exactly_sparse(result)
    assert is_valid_nm(result.mask, 2, 4)
    if not gradual:  # the mask is exactly Wanda's; only the weights are updated
        assert torch.equal(result.mask, wanda.mask)
    assert _output_error(x, weight, result.weight) < 0.6 * _output_error(x, weight, wanda.weight)


def test_more_iterations_do_not_hurt():
    x, weight, stats = _correlated_layer(seed=14)
    short = _prune("admm", weight, stats, sparsity=0.5, admm_iterations=2, admm_gradual_steps=2, admm_cg_steps=0)
    default = _prune("admm", weight, stats, sparsity=0.5)
    assert _output_error(x, weight, default.weight) < _output_error(x, weight, short.weight)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"admm_gradual_steps": 8, "admm_iterations": 4}, "admm_gradual_steps=8 exceeds"),
        ({"admm_cg_steps": -1}, "admm_cg_steps must be a non-negative integer"),
        ({"admm_gradual_steps": 0}, "admm_gradual_steps must be a positive integer"),
        ({"admm_rho": 0.0}, "admm_rho must be > 0"),
    ],
)
def test_invalid_admm_fields_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(method="admm", **fields)


def test_gradual_steps_may_exceed_iterations_when_not_gradual():
    config = SparsityConfig(method="admm", gradual=False, admm_iterations=2, admm_gradual_steps=4)
    assert config.admm_iterations == 2


def test_admm_and_admm_refit_through_the_engine(windows):
    """End to end on a tiny Llama: exact sparsity and finite logits; Wanda + ADMM refit keeps Wanda's masks."""
    common = dict(sparsity=0.5, num_samples=4, seq_len=SEQ_LEN, device="cpu")
    model = build_model("llama")
    result = prune(model, SparsityConfig(method="admm", **common), windows, show_progress=False)
    assert result.sparsity == pytest.approx(0.5)
    assert all(0.0 < error < 1.0 for error in result.layer_errors.values()), result.layer_errors
    assert torch.isfinite(model(input_ids=windows[:1]).logits).all()

    plain = prune(build_model("llama"), SparsityConfig(method="wanda", **common), windows, show_progress=False)
    refit_model = build_model("llama")
    config = SparsityConfig(method="wanda", weight_update="admm", **common)
    refit = prune(refit_model, config, windows, show_progress=False)
    # the first block sees the same calibration inputs in both runs (later ones see refitted outputs)
    first_block = [name for name in plain.masks if ".layers.0." in name]
    assert len(first_block) == 7
    for name in first_block:
        assert torch.equal(refit.masks[name], plain.masks[name]), "the refit keeps Wanda's masks"
    assert refit.sparsity == pytest.approx(0.5)
    assert torch.isfinite(refit_model(input_ids=windows[:1]).logits).all()


def test_dampening_and_rho_default_per_method_unless_set():
    """None means each method's tuned default; an explicit value reaches every solver unchanged."""

    def solver(method: str, **kwargs):
        return get_solver_class(method)(SparsityConfig(method=method, sparsity=0.5, **kwargs))

    assert solver("sparsegpt").dampening == 0.01
    assert solver("admm").dampening == 0.1
    sparsellm = solver("sparsellm")
    assert sparsellm.dampening == 0.01
    assert (sparsellm.inner.dampening, sparsellm.inner.config.admm_rho) == (0.01, 0.25)
    assert solver("admm", dampening=0.03).dampening == 0.03
    explicit = solver("sparsellm", dampening=0.2, admm_rho=2.0)
    assert (explicit.inner.dampening, explicit.inner.config.admm_rho) == (0.2, 2.0)
    with pytest.raises(ValueError, match="dampening must be > 0"):
        SparsityConfig(method="admm", dampening=0.0)
