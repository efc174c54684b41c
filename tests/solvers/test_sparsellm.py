"""SparseLLM (Bai et al. 2024, arXiv 2402.17946): the joint MLP objective decreases, the MLP output beats
the inner solver alone, masks are exact (unstructured and N:M), degenerate calibration stays finite,
and the engine integration works on OPT (ReLU), Llama (gated SiLU) and GPT-2 (GELU, Conv1D)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import SEQ_LEN, build_model

from optimum_sparse.architecture import find_blocks, find_prunable_layers, get_weight
from optimum_sparse.blocks import BlockContext, capture_block_inputs
from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import is_valid_nm, num_pruned
from optimum_sparse.sequential import PruningResult, prune
from optimum_sparse.solvers import LayerStatistics, available_methods, get_solver_class
from optimum_sparse.solvers import sparsellm as sparsellm_module
from optimum_sparse.solvers.sparsellm import (
    MlpProblem,
    SparseLLMSolver,
    estimate_memory,
    output_error,
    relu_pre_activation_step,
    smooth_pre_activation_step,
    solve_mlp,
)


def _mlp(kind: str, d: int = 32, width: int = 96, tokens: int = 512, seed: int = 0) -> MlpProblem:
    """A random MLP with LLM-like inputs: correlated features, heavy tails, four outlier features."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / d**0.5
    x = (torch.randn(tokens, d, generator=generator) ** 3) @ mixing
    x[:, torch.randperm(d, generator=generator)[:4]] *= 10.0
    up = torch.randn(width, d, generator=generator) / d**0.5
    down = torch.randn(d, width, generator=generator) / width**0.5
    if kind == "gated":
        gate = torch.randn(width, d, generator=generator) / d**0.5
        act = torch.nn.functional.silu
        y = (act(x @ gate.T) * (x @ up.T)) @ down.T
        return MlpProblem(x, y, up, down, act, gate=gate)
    act = torch.relu if kind == "relu" else torch.nn.functional.gelu
    up_bias, down_bias = 0.1 * torch.randn(width, generator=generator), 0.1 * torch.randn(d, generator=generator)
    y = act(x @ up.T + up_bias) @ down.T + down_bias
    return MlpProblem(x, y, up, down, act, up_bias=up_bias, down_bias=down_bias)


def _inner(method: str = "admm", **kwargs):
    config = SparsityConfig(method=method, device="cpu", **kwargs)
    solver = get_solver_class(method)(config)
    return lambda weight, stats: solver.prune_layer(weight.clone(), stats)


def _stats(inputs: torch.Tensor) -> LayerStatistics:
    stats = LayerStatistics(inputs.shape[1], with_hessian=True)
    stats.update(inputs)
    return stats


def _layerwise_error(problem: MlpProblem, prune_fn) -> float:
    """Output error of the MLP with each layer pruned alone by the inner solver, computed independently."""
    x = problem.x
    gate = prune_fn(problem.gate, _stats(x)).weight if problem.gated else None
    up = prune_fn(problem.up, _stats(x)).weight
    u = x @ problem.up.T + (problem.up_bias if problem.up_bias is not None else 0)
    hidden = problem.act(x @ problem.gate.T) * u if problem.gated else problem.act(u)
    down = prune_fn(problem.down, _stats(hidden)).weight
    return output_error(problem, up, down, gate)


def _layers(solution):
    return [r for r in (solution.gate, solution.up, solution.down) if r is not None]


# ----------------------------------------------------------------------------------------------- the core


@pytest.mark.parametrize("kind", ["relu", "gated", "smooth"])
def test_objective_decreases_over_iterations(kind):
    problem = _mlp(kind)
    solution = solve_mlp(problem, _inner(sparsity=0.7), iterations=4)
    objective = solution.objective
    assert len(objective) == 5 and all(math.isfinite(v) for v in objective)
    # every round lowers the objective, and the rounds together by a large factor
    assert all(later < earlier for earlier, later in zip(objective, objective[1:])), objective
    assert objective[-1] < 0.5 * objective[0], objective


@pytest.mark.parametrize("sparsity", [0.7, 0.8])
@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_mlp_output_error_is_below_the_inner_solver_alone(kind, sparsity):
    problem = _mlp(kind)
    prune_fn = _inner(sparsity=sparsity)
    layerwise = _layerwise_error(problem, prune_fn)
    solution = solve_mlp(problem, prune_fn)
    achieved = output_error(
        problem, solution.up.weight, solution.down.weight, solution.gate.weight if solution.gate else None
    )
    assert solution.layerwise_error == pytest.approx(layerwise, rel=1e-4)
    assert achieved == pytest.approx(solution.error, rel=1e-4)
    assert solution.used_joint
    assert achieved < 0.9 * layerwise, (achieved, layerwise)


def test_sparsegpt_as_inner_solver_also_improves():
    problem = _mlp("gated")
    prune_fn = _inner("sparsegpt", sparsity=0.7, block_size=32)
    layerwise = _layerwise_error(problem, prune_fn)
    solution = solve_mlp(problem, prune_fn)
    assert solution.error < 0.9 * layerwise


@pytest.mark.parametrize("kind", ["relu", "gated"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_every_mlp_layer_is_exactly_sparse(kind, sparsity):
    problem = _mlp(kind)
    solution = solve_mlp(problem, _inner(sparsity=sparsity), iterations=2)
    for result in _layers(solution):
        assert torch.all((~result.mask).sum(1) == num_pruned(result.mask.shape[1], sparsity))
        assert bool((result.weight[~result.mask] == 0).all())


@pytest.mark.parametrize("inner", ["admm", "sparsegpt"])
def test_nm_masks_are_valid(inner):
    problem = _mlp("gated")
    solution = solve_mlp(problem, _inner(inner, pattern="2:4"), iterations=2)
    for result in _layers(solution):
        assert is_valid_nm(result.mask, 2, 4)
        assert int(result.mask.sum()) == result.mask.numel() // 2  # exactly 2 kept in every group of 4
        assert bool((result.weight[~result.mask] == 0).all())
    assert solution.error <= solution.layerwise_error


@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_degenerate_block_stays_finite_and_exactly_sparse(kind):
    """Dead and duplicated input features, a dead hidden unit and fewer tokens than features."""
    problem = _mlp(kind, tokens=12)
    problem.x[:, :4] = 0.0  # dead inputs
    problem.x[:, 4:8] = problem.x[:, 8:12]  # exact duplicates
    problem.up[0] = 0.0  # a hidden unit that never fires
    if problem.up_bias is not None:
        problem.up_bias[0] = 0.0
    u = problem.x @ problem.up.T + (problem.up_bias if problem.up_bias is not None else 0)
    hidden = problem.act(problem.x @ problem.gate.T) * u if problem.gated else problem.act(u)
    problem.y = hidden @ problem.down.T + (problem.down_bias if problem.down_bias is not None else 0)
    solution = solve_mlp(problem, _inner(sparsity=0.7))
    assert math.isfinite(solution.error) and solution.error <= solution.layerwise_error
    assert all(math.isfinite(v) for v in solution.objective)
    for result in _layers(solution):
        assert bool(torch.isfinite(result.weight).all())
        assert torch.all((~result.mask).sum(1) == num_pruned(result.mask.shape[1], 0.7))
        assert bool((result.weight[~result.mask] == 0).all())


def test_non_finite_iterations_fall_back_to_the_layerwise_result(monkeypatch, caplog):
    problem = _mlp("relu")
    monkeypatch.setattr(
        sparsellm_module,
        "_activation_step_inverse",
        lambda down, beta, gamma: torch.full((down.shape[1], down.shape[1]), float("nan")),
    )
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.solvers.sparsellm"):
        solution = solve_mlp(problem, _inner(sparsity=0.7))
    assert "abandoned" in caplog.text
    assert solution.joint_error == math.inf and not solution.used_joint
    assert solution.error == pytest.approx(_layerwise_error(problem, _inner(sparsity=0.7)), rel=1e-4)


def test_a_worse_joint_result_is_never_kept(monkeypatch):
    """Sabotaged z updates make the joint result bad: the layer-wise one is returned instead."""
    problem = _mlp("relu")
    monkeypatch.setattr(
        sparsellm_module, "relu_pre_activation_step", lambda m, p, alpha, gamma: 50.0 * torch.randn_like(m)
    )
    solution = solve_mlp(problem, _inner(sparsity=0.7))
    assert solution.joint_error > solution.layerwise_error
    achieved = output_error(problem, solution.up.weight, solution.down.weight)
    assert achieved == pytest.approx(solution.layerwise_error, rel=1e-4)


def test_relu_pre_activation_step_is_the_exact_minimiser():
    generator = torch.Generator().manual_seed(1)
    m, p = torch.randn(200, generator=generator), torch.randn(200, generator=generator).abs()
    alpha, gamma = 0.7, 2.0
    z = relu_pre_activation_step(m, p, alpha, gamma)
    grid = torch.linspace(-5, 5, 20001).unsqueeze(1)
    cost = alpha * (grid - m).pow(2) + gamma * (p - grid.clamp_min(0)).pow(2)
    best = cost.min(0).values
    achieved = alpha * (z - m).pow(2) + gamma * (p - z.clamp_min(0)).pow(2)
    assert torch.all(achieved <= best + 1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_smooth_pre_activation_step_never_increases_the_elementwise_cost(gated):
    generator = torch.Generator().manual_seed(2)
    z, m, p = (torch.randn(500, generator=generator) * 3 for _ in range(3))
    scale = torch.randn(500, generator=generator) if gated else None
    act = torch.nn.functional.silu

    def cost(point):
        value = act(point) * (scale if scale is not None else 1.0)
        return 1.0 * (point - m).pow(2) + 5.0 * (p - value).pow(2)

    new = smooth_pre_activation_step(act, z, m, p, 1.0, 5.0, scale=scale)
    assert torch.all(cost(new) <= torch.minimum(cost(z), cost(m)) + 1e-6)
    assert float(cost(new).sum()) < 0.9 * float(torch.minimum(cost(z), cost(m)).sum())


# ----------------------------------------------------------------------------------------------- config


def test_sparsellm_is_registered_with_documented_defaults():
    assert "sparsellm" in available_methods()
    config = SparsityConfig(method="sparsellm")
    assert (config.sparsellm_iterations, config.alpha, config.beta, config.gamma) == (4, 1.0, 100.0, 10.0)
    assert config.inner_solver == "admm"
    solver = get_solver_class("sparsellm")(config)
    assert isinstance(solver, SparseLLMSolver) and solver.requires_hessian


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"inner_solver": "wanda"}, "inner_solver must be one of"),
        ({"alpha": 0.0}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"gamma": float("nan")}, "gamma"),
        ({"sparsellm_iterations": 0}, "sparsellm_iterations must be a positive integer"),
        ({"sparsellm_max_memory_gb": 0}, "sparsellm_max_memory_gb"),
    ],
)
def test_invalid_sparsellm_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(method="sparsellm", **fields)


# ----------------------------------------------------------------------------------------------- engine


def _config(**kwargs) -> SparsityConfig:
    kwargs.setdefault("sparsity", 0.7)
    return SparsityConfig(method="sparsellm", num_samples=4, seq_len=SEQ_LEN, device="cpu", **kwargs)


@pytest.mark.parametrize("arch, kind", [("opt", "relu"), ("llama", "gated"), ("gpt2", "smooth")])
def test_end_to_end_exact_sparsity_and_finite_logits(arch, kind, windows, monkeypatch):
    model = build_model(arch)
    layers = [layer for group in find_prunable_layers(model, _config()).values() for layer in group]
    reports = {}
    original = SparseLLMSolver.prune_block

    def spy(self, context):
        report = original(self, context)
        reports[context.index] = report
        return report

    monkeypatch.setattr(SparseLLMSolver, "prune_block", spy)
    result = prune(model, _config(), windows, show_progress=False)
    assert set(result.masks) == {layer.name for layer in layers}
    for layer in layers:
        mask = result.masks[layer.name]
        # admm's default scope is the row: every row loses exactly round(0.7 * in) weights
        assert torch.all((~mask).sum(1) == num_pruned(mask.shape[1], 0.7)), layer.name
        assert torch.equal(get_weight(layer.module) != 0, mask), layer.name
    with torch.no_grad():
        logits = model(windows).logits
    assert bool(torch.isfinite(logits).all())
    assert sorted(reports) == [0, 1]
    for report in reports.values():
        assert report.kind == kind
        assert report.used_joint and report.joint_error < report.layerwise_error
        assert len(report.layers) == (3 if kind == "gated" else 2)
    if kind == "gated":
        assert reports[0].layers[0].endswith("gate_proj")


def test_end_to_end_nm(windows):
    model = build_model("llama")
    result = prune(model, _config(sparsity=None, pattern="2:4"), windows, show_progress=False)
    for name, mask in result.masks.items():
        assert is_valid_nm(mask, 2, 4) and int(mask.sum()) == mask.numel() // 2, name


def test_unknown_mlp_falls_back_to_the_inner_solver_with_a_warning(windows, caplog):
    """Without up_proj, gate -> down looks like fc1 -> fc2, but down's input is not act(gate x)."""
    model = build_model("llama")
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.solvers.sparsellm"):
        result = prune(model, _config(ignore=[r"up_proj"]), windows, show_progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "optimum_sparse.solvers.sparsellm"]
    assert any("block 0" in m and "is not act(fc1 x)" in m for m in messages), messages
    assert any("block 1" in m for m in messages)
    assert not any("up_proj" in name for name in result.masks)
    for name, mask in result.masks.items():
        assert torch.all((~mask).sum(1) == num_pruned(mask.shape[1], 0.7)), name


def test_memory_limit_fails_before_any_weight_changes(windows):
    model = build_model("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lower num_samples x seq_len \(now 4 x 32\)"):
        prune(model, _config(sparsellm_max_memory_gb=1e-6), windows, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_memory_estimate_counts_tokens_times_width():
    small = estimate_memory(1000, 64, 256, 64, gated=True)
    large = estimate_memory(2000, 64, 256, 64, gated=True)
    assert large - small == 4 * 1000 * (64 + 64 + 3 * 256) + 4 * 1000 * 6 * 256
    assert estimate_memory(1000, 64, 256, 64, gated=False) < small


def test_capture_keeps_only_the_requested_parts_and_windows(windows):
    model = build_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    layers = find_prunable_layers(model, _config())[0]
    context = BlockContext(blocks[0], 0, layers, inputs, torch.device("cpu"), True, PruningResult())
    mlp = blocks[0].mlp
    assert context.num_tokens == windows.numel()
    full = context.capture({"down": mlp.down_proj})
    part = context.capture({"down": mlp.down_proj}, parts={"down": "inputs"}, max_windows=1)
    assert part["down"][1] is None and part["down"][0].shape == (SEQ_LEN, mlp.down_proj.in_features)
    assert torch.equal(part["down"][0], full["down"][0][:SEQ_LEN])
    with pytest.raises(ValueError, match="parts"):
        context.capture({"down": mlp.down_proj}, parts={"down": "weights"})
