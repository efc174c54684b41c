"""Mask distributions and the score-function estimator, checked against exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from optimum_sparse.pg.estimation.distributions import BernoulliMasks, NMCategorical, nm_patterns
from optimum_sparse.pg.estimation.estimator import (
    ScoreFunctionEstimator,
    importance_weights,
    leave_one_out,
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


def test_normalized_estimate_is_the_raw_one_divided_by_the_running_advantage_rms(problem):
    """The scale comes from earlier steps only; a loss scaled by 1000 gives the same normalized steps."""
    probs, table, generator = problem
    batches = [BernoulliMasks.sample(probs, 2, generator=generator) for _ in range(4)]
    log_ps = [BernoulliMasks.log_prob(probs, batch) for batch in batches]

    def run(normalize: bool, scale: float) -> list[torch.Tensor]:
        estimator = ScoreFunctionEstimator(preconditioner="adam", baseline_decay=0.5, normalize=normalize)
        gradients = []
        for batch, log_p in zip(batches, log_ps):
            estimate = estimator.estimate(BernoulliMasks, probs, batch, scale * table[_index(batch)], log_p)
            estimator.update_baseline(scale * table[_index(batch)], estimate.advantages)
            gradients.append(estimate.gradient)
        return gradients

    raw, normalized, scaled = run(False, 1.0), run(True, 1.0), run(True, 1000.0)
    mean_square = None  # what the estimator should track: an EMA of (L1 - L2)^2 over the steps so far
    for step, batch in enumerate(batches):
        losses = table[_index(batch)]
        square = float((losses[0] - losses[1]) ** 2)  # leave-one-out advantages of a pair: +-(L1 - L2)
        scale = math.sqrt(mean_square if mean_square is not None else square)
        torch.testing.assert_close(normalized[step], raw[step] / scale if scale > 0 else raw[step])
        if square > 0:
            mean_square = square if mean_square is None else 0.5 * mean_square + 0.5 * square
        torch.testing.assert_close(scaled[step], normalized[step])


def test_advantage_scale_survives_a_checkpoint_and_ignores_steps_without_spread():
    estimator = ScoreFunctionEstimator(normalize=True, baseline_decay=0.5)
    estimator.update_baseline(torch.tensor([3.0]), torch.tensor([0.0]))  # one sample, first step
    assert estimator.advantage_rms is None
    estimator.update_baseline(torch.tensor([3.0, 5.0]), torch.tensor([-2.0, 2.0]))
    estimator.update_baseline(torch.tensor([3.0, 3.0]), torch.tensor([1.0, -1.0]))
    assert estimator.advantage_rms == pytest.approx(math.sqrt(0.5 * 4.0 + 0.5 * 1.0))
    restored = ScoreFunctionEstimator(normalize=True)
    restored.load_state_dict(estimator.state_dict())
    assert restored.advantage_rms == estimator.advantage_rms and restored.baseline == estimator.baseline


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


def _unit_ratio_estimator(clip: float, baseline: float) -> ScoreFunctionEstimator:
    estimator = ScoreFunctionEstimator("adam", clip=clip, ratio="unit")
    estimator.baseline = baseline
    return estimator


def test_unit_ratios_equal_joint_ratios_for_fresh_samples(problem):
    probs, table, generator = problem
    samples = BernoulliMasks.sample(probs, 64, generator=generator)
    losses = table[_index(samples)]
    joint = ScoreFunctionEstimator("fisher", clip=2.0)
    joint.baseline = 0.2
    unit = ScoreFunctionEstimator("fisher", clip=2.0, ratio="unit")
    unit.baseline = 0.2
    a = joint.estimate(BernoulliMasks, probs, samples, losses, BernoulliMasks.log_prob(probs, samples))
    b = unit.estimate(BernoulliMasks, probs, samples, losses, BernoulliMasks.log_prob_units(probs, samples))
    assert b.weights.shape == samples.shape and torch.all(b.weights == 1)
    torch.testing.assert_close(a.gradient, b.gradient)


def test_unit_ratios_weight_each_coordinate_by_its_own_factor_and_are_unbiased_for_separable_losses():
    """For L(m) = sum_i f_i(m_i) the other units' factors average out, so the unclipped per-unit
    estimate of stale samples is unbiased; each coordinate carries exactly its own ratio."""
    generator = torch.Generator().manual_seed(3)
    units = 6
    then = torch.full((units,), 0.5)
    now = then + 0.15 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    effects = torch.randn(units, 2, generator=generator)  # f_i(0), f_i(1)
    samples = BernoulliMasks.sample(then, NUM_SAMPLES, generator=generator)
    losses = effects.gather(1, samples.long().T).T.sum(-1)
    log_then = BernoulliMasks.log_prob_units(then, samples)
    estimate = _unit_ratio_estimator(math.inf, 0.0).estimate(BernoulliMasks, now, samples, losses, log_then)
    ratios = BernoulliMasks.log_prob_units(now, samples).exp() / log_then.exp()
    torch.testing.assert_close(estimate.weights, ratios.float())
    grads = BernoulliMasks.grad_log_prob(now, samples)
    advantage = losses - leave_one_out(losses)  # several samples of one batch: leave-one-out baseline
    manual = (advantage.unsqueeze(-1) * ratios.float() * grads).mean(0)
    torch.testing.assert_close(estimate.gradient, manual, rtol=1e-4, atol=1e-5)
    exact = effects[:, 1] - effects[:, 0]  # d/ds_i E[L] = f_i(1) - f_i(0)
    per_sample = losses.unsqueeze(-1) * ratios.float() * grads
    tolerance = 5 * per_sample.std(0) / math.sqrt(NUM_SAMPLES)
    assert torch.all((estimate.gradient - exact).abs() <= tolerance)


def test_unit_ratios_rarely_clip_where_joint_ratios_of_many_units_always_do():
    generator = torch.Generator().manual_seed(4)
    units = 20_000
    then = 0.2 + 0.6 * torch.rand(units, generator=generator)
    now = (then + 0.02 * torch.randn(units, generator=generator)).clamp(0.01, 0.99)
    samples = BernoulliMasks.sample(then, 8, generator=generator)
    losses = torch.randn(8, generator=generator)
    joint = ScoreFunctionEstimator("adam", clip=2.0)
    joint.baseline = 0.0
    joint_estimate = joint.estimate(BernoulliMasks, now, samples, losses, BernoulliMasks.log_prob(then, samples))
    unit_estimate = _unit_ratio_estimator(2.0, 0.0).estimate(
        BernoulliMasks, now, samples, losses, BernoulliMasks.log_prob_units(then, samples)
    )
    assert float(joint_estimate.clipped.float().mean()) > 0.5
    assert float(unit_estimate.clipped.float().mean()) < 0.01


def test_nm_unit_log_probs_sum_to_the_joint_and_weight_every_pattern_logit():
    family = NMCategorical(2, 4)
    generator = torch.Generator().manual_seed(5)
    then, now = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    choices = family.sample(then, 10, generator=generator)
    per_unit = family.log_prob_units(then, choices)
    assert per_unit.shape == (10, 3)
    torch.testing.assert_close(per_unit.sum(-1), family.log_prob(then, choices))
    estimator = ScoreFunctionEstimator("fisher", clip=math.inf, ratio="unit")
    estimator.baseline = 0.0
    losses = torch.randn(10, generator=generator)
    estimate = estimator.estimate(family, now, choices, losses, per_unit)
    ratios = (family.log_prob_units(now, choices) - per_unit).exp().float()
    advantage = losses - leave_one_out(losses)
    manual = (advantage.reshape(-1, 1, 1) * ratios.unsqueeze(-1) * family.grad_log_prob(now, choices)).mean(0)
    torch.testing.assert_close(estimate.gradient, manual)
    with pytest.raises(ValueError, match="ratio must be one of"):
        ScoreFunctionEstimator(ratio="per-sample")


def test_advantage_normalization_defaults_to_block_channels_only():
    from optimum_sparse import SparsityConfig

    def normalize(**kwargs) -> bool:
        return ScoreFunctionEstimator.from_config(SparsityConfig(method="pg", sparsity=0.3, **kwargs)).normalize

    assert normalize(pattern="channels", pg_objective="block")
    assert not normalize(pattern="channels") and not normalize(pg_objective="block")
    assert normalize(pg_objective="block", normalize_advantage=True)
    assert not normalize(pattern="channels", pg_objective="block", normalize_advantage=False)
    with pytest.raises(ValueError, match="normalize_advantage"):
        SparsityConfig(method="pg", sparsity=0.3, normalize_advantage="yes")
