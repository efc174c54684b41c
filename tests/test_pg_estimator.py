"""Mask distributions and the score-function estimator, checked against exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optimum_sparse.pg.distributions import BernoulliMasks, NMCategorical, nm_patterns
from optimum_sparse.pg.estimator import (
    ScoreFunctionEstimator,
    importance_weights,
    score_function_gradient,
    surrogate_loss,
)

UNITS = 6
NUM_SAMPLES = 200_000


def _all_masks(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.bool)


def _index(masks: torch.Tensor) -> torch.Tensor:
    powers = 2 ** torch.arange(masks.shape[-1] - 1, -1, -1)
    return (masks.long() * powers).sum(-1)


def _exact_bernoulli_gradient(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    s = probs.detach().double().clone().requires_grad_(True)
    m = _all_masks(probs.numel()).double()
    expected = ((s**m * (1 - s) ** (1 - m)).prod(-1) * table.double()).sum()
    (grad,) = torch.autograd.grad(expected, s)
    return grad.float()


def _per_sample(losses, grads, baseline, weights=None):
    advantage = losses - baseline if weights is None else (losses - baseline) * weights
    return advantage.unsqueeze(-1) * grads


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    probs = 0.2 + 0.6 * torch.rand(UNITS, generator=generator)
    table = torch.randn(2**UNITS, generator=generator)  # L(m) for every one of the 64 masks
    return probs, table, generator


def test_bernoulli_log_prob_matches_enumeration(problem):
    probs, _, _ = problem
    masks = _all_masks(UNITS)
    total = BernoulliMasks.log_prob(probs, masks).exp().sum()
    assert abs(float(total) - 1.0) < 1e-9
    assert BernoulliMasks.sample(probs, 5).shape == (5, UNITS)


@pytest.mark.parametrize("preconditioner", ["adam", "fisher"])
def test_estimator_is_unbiased_with_fresh_samples(problem, preconditioner):
    probs, table, generator = problem
    samples = BernoulliMasks.sample(probs, NUM_SAMPLES, generator=generator)
    losses = table[_index(samples)]
    estimator = ScoreFunctionEstimator(preconditioner=preconditioner, clip=2.0)
    estimator.baseline = 0.3  # any constant baseline leaves the estimate unbiased
    fresh = BernoulliMasks.log_prob(probs, samples)  # K = 1: the sampling scores are the current ones
    estimate = estimator.estimate(BernoulliMasks, probs, samples, losses, fresh)
    exact = _exact_bernoulli_gradient(probs, table)
    scale = probs * (1 - probs) if preconditioner == "fisher" else torch.ones_like(probs)
    per_sample = _per_sample(losses, BernoulliMasks.grad_log_prob(probs, samples), 0.3) * scale
    tolerance = 5 * per_sample.std(0) / math.sqrt(NUM_SAMPLES)
    assert torch.all((estimate.gradient - exact * scale).abs() <= tolerance), (estimate.gradient, exact * scale)
    assert torch.all(estimate.weights == 1) and not estimate.clipped.any()


def test_stale_samples_reweighted_unbiased_and_clipping_bounds_bias(problem):
    _, table, generator = problem
    then = torch.full((UNITS,), 0.5)
    now = then + 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])  # a few steps of drift
    samples = BernoulliMasks.sample(then, NUM_SAMPLES, generator=generator)
    losses = table[_index(samples)]
    log_then = BernoulliMasks.log_prob(then, samples)
    exact = _exact_bernoulli_gradient(now, table)
    grads = BernoulliMasks.grad_log_prob(now, samples)
    baseline = float(table.mean())

    def estimate(clip: float):
        estimator = ScoreFunctionEstimator("adam", clip=clip)
        estimator.baseline = baseline
        return estimator.estimate(BernoulliMasks, now, samples, losses, log_then)

    exact_ratio = estimate(math.inf)  # unclipped importance weights: unbiased for the current scores
    per_sample = _per_sample(losses, grads, baseline, exact_ratio.weights)
    tolerance = 5 * per_sample.std(0) / math.sqrt(NUM_SAMPLES)
    assert torch.all((exact_ratio.gradient - exact).abs() <= tolerance)

    clip = 2.0
    result = estimate(clip)
    assert float(result.weights.max()) <= clip + 1e-6 and float(result.weights.min()) >= 1 / clip - 1e-6
    assert 0 < float(result.clipped.float().mean()) < 1
    # every weight lies in [1/c, c]: the clipped estimate stays within (c - 1) of the unweighted stale one
    stale = score_function_gradient(losses, grads, baseline)
    bound = (clip - 1) * _per_sample(losses, grads, baseline).abs().mean(0)
    assert torch.all((result.gradient - stale).abs() <= bound)
    # the bias is bounded, shrinks as the clip widens, and clipping lowers the variance
    biases = [float((estimate(c).gradient - exact).norm()) for c in (1.0, 1.5, 2.0, math.inf)]
    assert biases == sorted(biases, reverse=True) and biases[2] < 0.25 * float(exact.norm())
    clipped_var = _per_sample(losses, grads, baseline, result.weights).var(0).sum()
    assert float(clipped_var) < float(per_sample.var(0).sum())


def test_importance_weights_in_log_space():
    weights, clipped = importance_weights(torch.tensor([0.0, 3.0, -3.0]), torch.zeros(3), clip=2.0)
    assert torch.allclose(weights, torch.tensor([1.0, 2.0, 0.5]))
    assert clipped.tolist() == [False, True, True]
    # huge log-probabilities (sums over millions of units) do not overflow
    weights, _ = importance_weights(
        torch.tensor([-1e6 + 0.1], dtype=torch.float64), torch.tensor([-1e6], dtype=torch.float64), math.inf
    )
    assert abs(float(weights[0]) - math.exp(0.1)) < 1e-4
    with pytest.raises(ValueError):
        importance_weights(torch.zeros(1), torch.zeros(1), clip=0.5)


def test_nm_categorical_unbiased():
    family = NMCategorical(2, 4)
    assert family.patterns.shape == (6, 4) and bool((nm_patterns(2, 4).sum(-1) == 2).all())
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, generator=generator)
    table = torch.randn(6, 6, generator=generator)  # L for every pair of group patterns
    theta = logits.double().clone().requires_grad_(True)
    probs = torch.softmax(theta, -1)
    exact = torch.autograd.grad((probs[0].unsqueeze(1) * probs[1].unsqueeze(0) * table.double()).sum(), theta)[0]
    choices = family.sample(logits, NUM_SAMPLES, generator=generator)
    assert choices.shape == (NUM_SAMPLES, 2)
    losses = table[choices[:, 0], choices[:, 1]]
    estimator = ScoreFunctionEstimator("fisher")
    estimator.baseline = 0.1
    estimate = estimator.estimate(family, logits, choices, losses, family.log_prob(logits, choices))
    grads = family.grad_log_prob(logits, choices)
    per_sample = (losses - 0.1).reshape(-1, 1, 1) * grads
    tolerance = 5 * per_sample.std(0) / math.sqrt(NUM_SAMPLES)
    assert torch.all((estimate.gradient - exact.float()).abs() <= tolerance)
    masks = family.to_mask(family.mode(logits))
    assert masks.shape == (2, 4) and bool((masks.sum(-1) == 2).all())
    assert torch.allclose(family.keep_probabilities(logits).sum(-1), torch.full((2,), 2.0))


def test_surrogate_loss_value_and_gradient():
    scores = torch.rand(5, requires_grad=True)
    gradient = torch.randn(5)
    loss = surrogate_loss(scores, gradient, torch.tensor(3.25))
    assert float(loss.detach()) == pytest.approx(3.25)
    loss.backward()
    assert torch.allclose(scores.grad, gradient)


def test_baseline_is_an_ema():
    estimator = ScoreFunctionEstimator(baseline_decay=0.5)
    estimator.update_baseline(torch.tensor([2.0]))
    estimator.update_baseline(torch.tensor([4.0]))
    assert estimator.baseline == pytest.approx(3.0)
    with pytest.raises(ValueError):
        ScoreFunctionEstimator(preconditioner="newton")


def test_leave_one_out_baseline_ignores_the_batch_difficulty_and_stays_unbiased(problem):
    """With several samples per batch, a loss offset shared by the batch cancels exactly; the mean of
    many two-sample estimates still matches the enumerated gradient."""
    probs, table, generator = problem
    fresh_estimator = ScoreFunctionEstimator(preconditioner="adam", clip=2.0)
    pairs = BernoulliMasks.sample(probs, 2 * 50_000, generator=generator).reshape(50_000, 2, UNITS)
    one = pairs[0]
    losses = table[_index(one)]
    log_p = BernoulliMasks.log_prob(probs, one)
    easy = fresh_estimator.estimate(BernoulliMasks, probs, one, losses, log_p).gradient
    hard = fresh_estimator.estimate(BernoulliMasks, probs, one, losses + 5.0, log_p).gradient
    torch.testing.assert_close(easy, hard)
    grads = BernoulliMasks.grad_log_prob(probs, pairs.reshape(-1, UNITS)).reshape(50_000, 2, UNITS)
    pair_losses = table[_index(pairs)]
    baseline = pair_losses.flip(1)  # leave-one-out with two samples: the other sample's loss
    per_pair = ((pair_losses - baseline).unsqueeze(-1) * grads).mean(1)
    exact = _exact_bernoulli_gradient(probs, table)
    tolerance = 5 * per_pair.std(0) / math.sqrt(per_pair.shape[0])
    assert torch.all((per_pair.mean(0) - exact).abs() <= tolerance)
    seventh = BernoulliMasks.log_prob(probs, pairs[7])  # fresh samples: importance weights 1
    estimate = fresh_estimator.estimate(BernoulliMasks, probs, pairs[7], pair_losses[7], seventh)
    torch.testing.assert_close(estimate.gradient, per_pair[7], rtol=1e-4, atol=1e-5)
