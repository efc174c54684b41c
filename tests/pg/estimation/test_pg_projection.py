"""Budget projection, sigmoid shifting and hardening of keep-probabilities."""

from __future__ import annotations

import pytest
import torch

from optimum_sparse.pg.estimation.projection import (
    budget_of,
    harden_per_group,
    harden_to_budget,
    project_to_budget,
    sigmoid_to_budget,
)


@pytest.fixture
def units():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(50, generator=generator) * 0.7 + 0.5
    costs = torch.randint(1, 20, (50,), generator=generator).float()
    return scores, costs


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_projection_hits_budget_and_box(units, sparsity):
    scores, costs = units
    budget = budget_of(costs, sparsity)
    x = project_to_budget(scores, costs, budget)
    assert float((x.double() * costs.double()).sum()) == pytest.approx(budget, rel=1e-6, abs=1e-6)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # idempotent, and the cost-weighted projection: no other feasible point is closer
    assert torch.allclose(project_to_budget(x, costs, budget), x, atol=1e-6)
    distance = float((costs * (x - scores) ** 2).sum())
    for seed in range(20):
        other = project_to_budget(torch.rand(50, generator=torch.Generator().manual_seed(seed)), costs, budget)
        assert float((costs * (other - scores) ** 2).sum()) >= distance - 1e-6


def test_projection_rejects_impossible_budget(units):
    scores, costs = units
    with pytest.raises(ValueError, match="budget"):
        project_to_budget(scores, costs, float(costs.sum()) + 1.0)


def test_sigmoid_to_budget(units):
    scores, costs = units
    budget = budget_of(costs, 0.6)
    probs = sigmoid_to_budget(scores, costs, budget)
    assert float((probs.double() * costs.double()).sum()) == pytest.approx(budget, rel=1e-6)
    order = torch.argsort(scores)
    assert bool((probs[order].diff() >= 0).all())  # monotone in the metric
    assert float(probs.min()) > 0.0 and float(probs.max()) < 1.0


def test_hardening_fills_budget_greedily(units):
    scores, costs = units
    budget = budget_of(costs, 0.5)
    keep = harden_to_budget(scores, costs, budget)
    kept = float(costs[keep].sum())
    assert kept <= budget and budget - kept < float(costs.max())
    # the highest-scoring unit is kept; a unit is dropped only if a better one is dropped or it did not fit
    assert bool(keep[scores.argmax()])
    required = torch.zeros(50, dtype=torch.bool)
    required[scores.argmin()] = True
    assert bool(harden_to_budget(scores, costs, budget, required)[scores.argmin()])


def test_hardening_equal_costs_is_exact_topk():
    scores = torch.randn(100)
    keep = harden_to_budget(scores, torch.ones(100), 40.0)
    assert int(keep.sum()) == 40 and bool(scores[keep].min() >= scores[~keep].max())


def test_hardening_per_group(units):
    scores, costs = units
    groups = [slice(0, 20), slice(20, 50)]
    keep = harden_per_group(scores, costs, 0.5, groups)
    for group in groups:
        c = costs[group]
        kept = float(c[keep[group]].sum())
        assert kept <= budget_of(c, 0.5) and budget_of(c, 0.5) - kept < float(c.max())


def test_projection_of_a_million_nudged_scores_lands_on_the_budget_within_eight_passes():
    """After an optimizer step the scores are near the budget: Newton steps need only a few passes."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(1_000_000, generator=generator, dtype=torch.float64)
    costs = torch.ones_like(scores)
    budget = 0.3 * scores.numel()
    on_budget = project_to_budget(scores, costs, budget)
    nudged = on_budget + 0.01 * torch.randn(scores.shape, generator=generator, dtype=torch.float64)
    projected = project_to_budget(nudged, costs, budget, iterations=8)
    assert float(projected.sum()) == pytest.approx(budget, rel=1e-10)
    assert float(projected.min()) >= 0.0 and float(projected.max()) <= 1.0
