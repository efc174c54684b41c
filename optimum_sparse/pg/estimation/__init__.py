"""The mathematics of mask learning, with no model in sight: mask distributions, the gradient estimate, the budget.

distributions (Bernoulli and N:M categorical masks: sampling, log-probabilities and their
gradients), estimator (score-function gradient, clipped importance weights of stale samples, baseline,
preconditioning, surrogate loss), projection (keeping scores on the parameter budget, hardening).

The bottom layer of `optimum_sparse.pg`: it imports nothing else from it, so it can be tested on plain
tensors and reused by every mask space.
"""
