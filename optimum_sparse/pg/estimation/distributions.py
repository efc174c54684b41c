"""Mask distributions of policy-gradient mask learning.

Two families, both factorised over independent units so that log-probabilities are sums:

- `BernoulliMasks`: one keep-probability s_i in [0, 1] per unit (a weight, an MLP channel, an
  attention head / KV group). The scores *are* the probabilities, as in the paper this method
  follows (cited in `optimum_sparse.pg`; see docs/mask_learning.md), so that the budget constraint
  sum_i c_i s_i = B is linear.
- `NMCategorical`: for N:M sparsity, one categorical distribution per group of M consecutive
  weights over the C(M, N) admissible keep-patterns, parametrised by logits.

Every function takes a batch of masks (samples first) and returns per-sample values, so that an
estimator can average many samples without Python loops.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

#: probabilities are clamped to [EPS, 1 - EPS] inside logs and divisions (projection may hit 0 or 1)
EPS = 1e-6


class BernoulliMasks:
    """Independent Bernoulli keep-variables: p_s(m) = prod_i s_i^m_i (1 - s_i)^(1 - m_i)."""

    @staticmethod
    def sample(probs: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool masks of shape (num_samples, *probs.shape), True = kept."""
        p = probs.detach().clamp(0.0, 1.0)
        uniform = torch.rand((num_samples, *p.shape), device=p.device, generator=generator)
        return uniform < p.unsqueeze(0)

    @staticmethod
    def log_prob_units(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """log p(m_i) of every unit of every sample, float64, shape of `masks`."""
        s = probs.detach().double().clamp(EPS, 1.0 - EPS)
        m = masks.double()
        return m * s.log() + (1.0 - m) * (-s).log1p()

    @classmethod
    def log_prob(cls, probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """log p_s(m) for each sample: shape (num_samples,), summed over units in float64."""
        return cls.log_prob_units(probs, masks).reshape(masks.shape[0], -1).sum(-1)

    @staticmethod
    def grad_log_prob(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """d log p_s(m) / d s = (m - s) / (s (1 - s)) per sample and unit, shape of `masks`."""
        s = probs.detach().float().clamp(EPS, 1.0 - EPS)
        return (masks.float() - s) / (s * (1.0 - s))

    @staticmethod
    def fisher_diagonal(probs: torch.Tensor) -> torch.Tensor:
        """Fisher information of s: 1 / (s (1 - s)); natural gradient = s (1 - s) * gradient."""
        s = probs.detach().float().clamp(EPS, 1.0 - EPS)
        return 1.0 / (s * (1.0 - s))

    @staticmethod
    def mean(probs: torch.Tensor) -> torch.Tensor:
        """E[m] = s (the expected number of kept units is sum(s))."""
        return probs.detach()


@cache
def nm_patterns(n: int, m: int) -> torch.Tensor:
    """All C(m, n) keep-patterns of a group, as a bool tensor (num_patterns, m), lexicographic."""
    rows = []
    for kept in itertools.combinations(range(m), n):
        row = [False] * m
        for index in kept:
            row[index] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


class NMCategorical:
    """One categorical variable per N:M group over its C(M, N) keep-patterns.

    `logits` has shape (..., num_patterns); a sample is the index of the chosen pattern per group
    (shape (num_samples, ...)), turned into weights by `to_mask`. Every sample is exactly N:M, so no
    budget projection is needed for this family.
    """

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.patterns = nm_patterns(n, m)

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[0]

    def sample(
        self, logits: torch.Tensor, num_samples: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pattern indices, shape (num_samples, *logits.shape[:-1]), by the Gumbel-max trick."""
        z = logits.detach().float()
        uniform = torch.rand((num_samples, *z.shape), device=z.device, generator=generator)
        gumbel = -(-(uniform.clamp_min(1e-20)).log()).log()
        return (z.unsqueeze(0) + gumbel).argmax(-1)

    def log_prob_units(self, logits: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """log p of every group's chosen pattern, float64, shape of `choices` (a group is the unit)."""
        logp = torch.log_softmax(logits.detach().double(), dim=-1)
        return logp.unsqueeze(0).expand(choices.shape[0], *logp.shape).gather(-1, choices.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, logits: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """log p(choices) per sample, shape (num_samples,), summed over groups in float64."""
        return self.log_prob_units(logits, choices).reshape(choices.shape[0], -1).sum(-1)

    def grad_log_prob(self, logits: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """d log p / d logits = onehot(choice) - softmax(logits), shape (num_samples, *logits.shape)."""
        probs = torch.softmax(logits.detach().float(), dim=-1)
        onehot = torch.nn.functional.one_hot(choices, self.num_patterns).float()
        return onehot - probs.unsqueeze(0)

    def to_mask(self, choices: torch.Tensor) -> torch.Tensor:
        """Bool weight masks: pattern rows laid out over each group, shape (*choices.shape, m)."""
        return self.patterns.to(choices.device)[choices]

    def mode(self, logits: torch.Tensor) -> torch.Tensor:
        """The most likely pattern of every group (the hardened N:M choice)."""
        return logits.detach().argmax(-1)

    def keep_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Marginal keep-probability of each weight, shape (*logits.shape[:-1], m)."""
        probs = torch.softmax(logits.detach().float(), dim=-1)
        return probs @ self.patterns.to(probs.device).float()
