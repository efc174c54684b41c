"""The learning loop's state: scores, the stale sub-models in use, and per-step statistics.

`StaleSubModelLearner.training_loss(run)` is called once per forward pass (micro-batch). Every
`refresh_every` optimizer steps it samples `samples_per_step` masks from the current scores and
remembers log p at that moment; in between it reuses them (stale sub-models, the method of
`optimum_sparse.pg`). `run()` evaluates the active sub-model's loss without building a graph; the returned
surrogate has that loss as value and the reweighted score-function estimate as its gradient w.r.t.
the scores. The callback calls `end_step()` after each optimizer step and `project()` to put the
scores back on the budget. `state_dict()` / `load_state_dict()` carry everything the next steps depend
on (scores, baseline, stale samples and their log-probabilities, step counters, the sampler's RNG
state, history), so training resumed from a checkpoint continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optimum_sparse.pg.estimation.estimator import ScoreFunctionEstimator, surrogate_loss
from optimum_sparse.pg.spaces.space import MaskSpace

logger = logging.getLogger(__name__)


class MaskScores(nn.Module):
    """Holds the trainable scores, so that attaching it to a model exposes them to the optimizer."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = nn.Parameter(scores.float().clone())


class StaleSubModelLearner:
    def __init__(
        self,
        space: MaskSpace,
        estimator: ScoreFunctionEstimator,
        refresh_every: int = 1,
        samples_per_step: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
        layer_sharing: float = 0.0,
    ):
        self.space = space
        self.layer_sharing = layer_sharing
        self.estimator = estimator
        self.refresh_every = refresh_every
        self.samples_per_step = samples_per_step
        self.module = MaskScores(space.initial_scores()).to(device)
        self.generator = torch.Generator(device=torch.device(device).type).manual_seed(seed)
        self.step = 0
        self.refreshes = 0
        self.samples: torch.Tensor | None = None
        self.log_prob_then: torch.Tensor | None = None
        self.sampled_at = -1
        self._active: int | None = None  # which sample the model currently computes
        self._pending: list[dict[str, float]] = []  # statistics of the micro-batches of this step
        self.history: list[dict[str, float]] = []  # one entry per optimizer step

    @property
    def scores(self) -> nn.Parameter:
        return self.module.scores

    # ---------------------------------------------------------------- sampling
    def _refresh_if_stale(self) -> None:
        if self.samples is not None and self.step - self.sampled_at < self.refresh_every:
            return
        scores = self.scores.detach()
        self.samples = self.space.sample(scores, self.samples_per_step, generator=self.generator)
        per_unit = self.estimator.ratio == "unit"
        self.log_prob_then = self.space.log_prob(scores, self.samples, per_unit=per_unit)
        self.sampled_at = self.step
        self.refreshes += 1
        self._active = None

    def _activate(self, index: int) -> None:
        if self._active != index:
            self.space.activate(self.samples[index])
            self._active = index

    def deactivate(self) -> None:
        """Back to the dense model (e.g. before evaluation or calibration)."""
        self.space.deactivate()
        self._active = None

    # ---------------------------------------------------------------- estimation
    def training_loss(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Surrogate loss of one micro-batch: value = mean sampled loss, gradient = the estimate."""
        self._refresh_if_stale()
        losses = []
        for index in range(self.samples_per_step):
            self._activate(index)
            with torch.no_grad():
                losses.append(run().detach().float().reshape(()))
        losses_tensor = torch.stack(losses)
        estimate = self.estimator.estimate(
            self.space.family, self.scores.detach(), self.samples, losses_tensor, self.log_prob_then
        )
        self.estimator.update_baseline(losses_tensor, estimate.advantages)
        self._pending.append(
            {
                "loss": estimate.loss,
                "baseline": estimate.baseline,
                "ratio_mean": float(estimate.weights.mean()),
                "ratio_min": float(estimate.weights.min()),
                "ratio_max": float(estimate.weights.max()),
                "log_ratio_abs_max": float(estimate.log_ratios.abs().max()),
                "clipped_fraction": float(estimate.clipped.float().mean()),
                "staleness": float(self.step - self.sampled_at),
            }
        )
        gradient = estimate.gradient.to(self.scores.device)
        if self.layer_sharing > 0:
            shared = self.space.group_means(gradient)
            gradient = (1.0 - self.layer_sharing) * gradient + self.layer_sharing * shared
        return surrogate_loss(self.scores, gradient, losses_tensor.mean())

    @torch.no_grad()
    def project(self) -> None:
        """Scores back onto the feasible set (after each optimizer step)."""
        self.scores.copy_(self.space.project(self.scores.detach()))

    def end_step(self) -> dict[str, float]:
        """Close an optimizer step: average its micro-batch statistics into `history`."""
        entry: dict[str, float] = {}
        if self._pending:
            for key in self._pending[0]:
                values = [p[key] for p in self._pending]
                entry[key] = (
                    max(values)
                    if key.endswith("_max")
                    else (min(values) if key.endswith("_min") else sum(values) / len(values))
                )
        entry["expected_sparsity"] = self.space.expected_sparsity(self.scores.detach())
        entry["refreshes"] = float(self.refreshes)
        entry.update(self.space.instantiation_stats())
        entry["step"] = float(self.step)
        self.history.append(entry)
        self._pending.clear()
        self.step += 1
        return entry

    def hard_mask(self) -> torch.Tensor:
        return self.space.harden(self.scores.detach())

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the following steps depend on, on the CPU (for `torch.save`)."""

        def cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach().cpu().clone()

        return {
            "scores": cpu(self.scores),
            "estimator": self.estimator.state_dict(),
            "samples": cpu(self.samples),
            "log_prob_then": cpu(self.log_prob_then),
            "sampled_at": self.sampled_at,
            "step": self.step,
            "refreshes": self.refreshes,
            "generator": self.generator.get_state(),
            "history": [dict(entry) for entry in self.history],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the next forward re-activates the restored stale sample."""
        device = self.scores.device
        self.scores.copy_(state["scores"].to(device))
        self.estimator.load_state_dict(state["estimator"])
        samples, log_prob_then = state["samples"], state["log_prob_then"]
        self.samples = None if samples is None else samples.to(device)
        self.log_prob_then = None if log_prob_then is None else log_prob_then.to(device)
        self.sampled_at = int(state["sampled_at"])
        self.step = int(state["step"])
        self.refreshes = int(state["refreshes"])
        if state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self.history = [dict(entry) for entry in state["history"]]
        self._pending.clear()
        self.deactivate()
