"""Score-function (REINFORCE) gradient of the expected loss, with stale samples reweighted.

For a mask distribution p_s and a loss L(m) of the sub-model with mask m,

    grad_s E_{m ~ p_s}[L(m)] = E_{m ~ p_s}[(L(m) - b) grad_s log p_s(m)]

for any baseline b that does not depend on m (Williams 1992). A sub-model sampled at step t0 and
reused at step t (stale sub-models, see `optimum_sparse.pg`) is drawn from p_{s_t0}, so its term is
reweighted by the importance ratio w = p_{s_t}(m) / p_{s_t0}(m), which keeps the estimate unbiased.
The ratio is a product over thousands of units, so it is computed in log space and clipped to
[1/clip, clip] (truncated importance sampling, in the spirit of PPO's clipped ratio): a clipped
estimate is biased but every sample's weight is bounded, so one stale sample cannot dominate.

Per-unit ratios (`ratio="unit"`): with many units the joint ratio leaves [1/clip, clip] after a
single step (SmolLM2 channels, 46k units: 70% of the K=4 ratios clipped, 90% at K=16), and a clipped
ratio no longer tracks which units moved. Since the policy factorises, the gradient coordinate of
unit i is (L - b) d log p(m_i) / d s_i; weighting it by that unit's own factor
p_now(m_i) / p_then(m_i) of the joint ratio (clipped the same way) keeps the correction exactly where
the score moved. It drops the other units' factors, so it is biased for K > 1 like any truncation,
but its variance does not grow with the number of units (the per-coordinate analogue of PPO's
per-token ratio). For K = 1 both rules give weight 1 and the unbiased estimate.

Preconditioning: "fisher" multiplies the Bernoulli gradient by the inverse Fisher information
s (1 - s) (the natural gradient, which turns (m - s) / (s (1 - s)) into the bounded (m - s));
"adam" leaves the raw gradient to an adaptive optimizer. For the N:M categorical family the
gradient w.r.t. the logits, onehot - softmax, is already bounded and equals the natural gradient in
the mean parameters, so both settings leave it unchanged.

Advantage normalisation (`normalize=True`): the estimate is divided by the root mean square of the
advantages L - b seen so far (an exponential moving average with the baseline's decay, taken before
this step, so it does not depend on the current samples and only rescales the step). The loss scale
then no longer sets the step size: a block whose relative output error is 0.02 and one whose error is
0.1 move their scores equally fast for one learning rate, where the raw estimate moved the first by
1e-5 per step at `pg_block_lr=0.05`. The first step, with no history, uses its own advantages.

The Trainer applies the estimate through `surrogate_loss`: a scalar whose value is the sampled
model's loss (what gets logged) and whose autograd gradient w.r.t. the scores is the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from optimum_sparse.config import SparsityConfig

#: "fisher": natural-gradient scaling of Bernoulli gradients; "adam": the raw gradient for an adaptive optimizer
PRECONDITIONERS = ("fisher", "adam")
#: a stale sample's gradient reweighted by its "joint" ratio, or each unit's by that unit's own factor
RATIOS = ("joint", "unit")


class MaskFamily(Protocol):
    def log_prob(self, scores: torch.Tensor, samples: torch.Tensor) -> torch.Tensor: ...

    def log_prob_units(self, scores: torch.Tensor, samples: torch.Tensor) -> torch.Tensor: ...

    def grad_log_prob(self, scores: torch.Tensor, samples: torch.Tensor) -> torch.Tensor: ...


def importance_weights(
    log_prob_now: torch.Tensor, log_prob_then: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """w = exp(clamp(log p_now - log p_then, -log clip, log clip)) and which samples were clipped.

    `clip` >= 1 bounds the ratio to [1/clip, clip]; `clip=inf` gives the exact (unbiased) ratio,
    `clip=1` ignores staleness altogether (w = 1).
    """
    if not clip >= 1.0:
        raise ValueError(f"clip must be >= 1 (the ratio is clipped to [1/clip, clip]), got {clip}")
    delta = (log_prob_now.double() - log_prob_then.double()).float()
    if math.isinf(clip):
        return delta.exp(), torch.zeros_like(delta, dtype=torch.bool)
    bound = math.log(clip)
    return delta.clamp(-bound, bound).exp(), delta.abs() > bound


def score_function_gradient(
    losses: torch.Tensor,
    grad_log_probs: torch.Tensor,
    baseline: float | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_j w_j (L_j - b_j) grad log p(m_j): the estimate from samples j (first dimension).

    `baseline` is one number, or one per sample (leave-one-out). `weights` is one per sample (joint
    ratios) or one per unit of each sample (per-unit ratios, broadcast over trailing dimensions of
    the gradient such as the N:M pattern logits)."""
    advantage = losses.detach().float() - baseline
    shape = (-1,) + (1,) * (grad_log_probs.dim() - 1)
    terms = advantage.reshape(shape) * grad_log_probs
    if weights is not None:
        weights = weights.float()
        terms = terms * weights.reshape(weights.shape + (1,) * (grad_log_probs.dim() - weights.dim()))
    return terms.mean(0)


def leave_one_out(losses: torch.Tensor) -> torch.Tensor:
    """b_j = mean of the other samples' losses on the same batch.

    With several sub-models evaluated on one batch, this baseline removes the batch's own difficulty
    from every advantage (the EMA baseline mixes batches) and, not depending on sample j, keeps the
    estimate unbiased.
    """
    count = losses.numel()
    return (losses.sum() - losses) / (count - 1)


def surrogate_loss(scores: torch.Tensor, gradient: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `value` whose gradient w.r.t. `scores` is `gradient` (and nothing else)."""
    linear = (gradient.detach().to(scores.dtype) * scores).sum()
    return value.detach() + (linear - linear.detach())


@dataclass
class Estimate:
    """One step's estimate and the statistics worth logging."""

    gradient: torch.Tensor
    baseline: float
    loss: float
    advantages: torch.Tensor  # (samples,) L - b, before any normalisation
    weights: torch.Tensor  # (samples,) or (samples, *units) importance weights after clipping
    log_ratios: torch.Tensor  # same shape, unclipped log p_now - log p_then
    clipped: torch.Tensor  # same shape, bool


class ScoreFunctionEstimator:
    """Stateful estimator: EMA baseline, clipped importance weights, preconditioning.

    Args:
        preconditioner: "fisher" (natural gradient of Bernoulli scores) or "adam" (raw gradient).
        clip: importance ratios are clipped to [1/clip, clip]; `inf` disables clipping.
        ratio: "joint" (one ratio per sample) or "unit" (each unit's own factor; then `estimate`
            expects per-unit `log_prob_then`, as `MaskSpace.log_prob(..., per_unit=True)` gives).
        baseline_decay: b <- decay * b + (1 - decay) * mean loss after each step. The first step,
            with no history, uses the mean of its own losses (for one sample: no update that step).
        normalize: divide the estimate by the running root mean square of the advantages.
    """

    def __init__(
        self,
        preconditioner: str = "fisher",
        clip: float = 2.0,
        baseline_decay: float = 0.9,
        ratio: str = "joint",
        normalize: bool = False,
    ):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")
        if ratio not in RATIOS:
            raise ValueError(f"ratio must be one of {RATIOS}, got {ratio!r}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        self.ratio = ratio
        self.preconditioner = preconditioner
        self.clip = float(clip)
        self.baseline_decay = baseline_decay
        self.baseline: float | None = None
        self.normalize = normalize
        self.advantage_rms: float | None = None

    @classmethod
    def from_config(cls, config: SparsityConfig) -> ScoreFunctionEstimator:
        """The estimator a `SparsityConfig` of method "pg" describes."""
        normalize = config.normalize_advantage
        if normalize is None:  # measured to help channel masks per block (each block's error has its own scale)
            normalize = config.pg_objective == "block" and config.pattern == "channels"
        return cls(config.preconditioner, config.clip, config.baseline_decay, config.importance_ratio, normalize)

    def estimate(
        self,
        family: MaskFamily,
        scores: torch.Tensor,
        samples: torch.Tensor,
        losses: torch.Tensor,
        log_prob_then: torch.Tensor,
    ) -> Estimate:
        """The reweighted, preconditioned gradient for samples drawn when log p was `log_prob_then`."""
        losses = losses.detach().float().reshape(-1)
        baseline = self.baseline if self.baseline is not None else float(losses.mean())
        log_prob_now = (family.log_prob_units if self.ratio == "unit" else family.log_prob)(scores, samples)
        weights, clipped = importance_weights(log_prob_now, log_prob_then.to(log_prob_now.device), self.clip)
        per_sample = leave_one_out(losses) if losses.numel() > 1 else baseline
        advantages = losses - per_sample
        gradient = score_function_gradient(losses, family.grad_log_prob(scores, samples), per_sample, weights)
        fisher = getattr(family, "fisher_diagonal", None)
        if self.preconditioner == "fisher" and fisher is not None:
            gradient = gradient / fisher(scores)
        if self.normalize:
            scale = self.advantage_rms or float(advantages.pow(2).mean().sqrt())
            if scale > 0:  # else every advantage so far is 0, and so is the gradient
                gradient = gradient / scale
        return Estimate(
            gradient=gradient,
            baseline=baseline,
            loss=float(losses.mean()),
            advantages=advantages,
            weights=weights,
            log_ratios=(log_prob_now - log_prob_then.to(log_prob_now.device)).float(),
            clipped=clipped,
        )

    def update_baseline(self, losses: torch.Tensor, advantages: torch.Tensor | None = None) -> None:
        """Fold one step's losses into the baseline (and its advantages into their running scale)."""
        self.baseline = self._average(self.baseline, float(losses.detach().float().mean()))
        square = 0.0 if advantages is None else float(advantages.detach().double().pow(2).mean())
        if square > 0:  # a step with no spread (one sample on the first step) says nothing of the scale
            self.advantage_rms = (
                self._average(None if self.advantage_rms is None else self.advantage_rms**2, square) ** 0.5
            )

    def _average(self, old: float | None, value: float) -> float:
        return value if old is None else self.baseline_decay * old + (1.0 - self.baseline_decay) * value

    def state_dict(self) -> dict[str, float | None]:
        return {"baseline": self.baseline, "advantage_rms": self.advantage_rms}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.baseline = state.get("baseline")
        self.advantage_rms = state.get("advantage_rms")
