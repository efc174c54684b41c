"""Registers "pg": masks learned by policy gradients on stale sub-models (see `optimum_sparse.pg`).

With `pg_objective="lm"` (the default) masks are learned during training by
`optimum_sparse.pg.SparsityCallback` inside a `transformers.Trainer` (see docs/mask_learning.md); the
one-shot engine refuses it with directions. With `pg_objective="block"` the engine itself learns
masks block by block against the dense block's output (`optimum_sparse.pg.block_objective`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from optimum_sparse.config import SparsityConfig
from optimum_sparse.options import (
    Option,
    boolean,
    finite_positive,
    in_interval,
    non_negative_int,
    one_of,
    positive_int,
)
from optimum_sparse.pg.estimation.estimator import PRECONDITIONERS, RATIOS
from optimum_sparse.registry import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver
from optimum_sparse.structured.uniform import check_standard_shape_architecture


def _clip(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0:
        raise ValueError(f"{name} bounds importance ratios to [1/clip, clip]: a number >= 1 (or inf), got {value!r}")
    return float(value)


def _decay(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


PG_OPTIONS = (
    Option(
        "refresh_every",
        1,
        "a sampled sub-model is reused for this many optimizer steps, its gradient reweighted by the clipped "
        "importance ratio p_now(m) / p_sampled(m)",
        positive_int(),
    ),
    Option("clip", 2.0, "importance ratios are clipped to [1/clip, clip] (>= 1; inf: no clipping)", _clip),
    Option(
        "importance_ratio",
        "joint",
        "reweight a stale sample by its 'joint' ratio p_now(m) / p_then(m), or each unit's gradient by that "
        "unit's own factor of it ('unit')",
        one_of(RATIOS),
    ),
    Option(
        "layer_sharing",
        0.0,
        "(channels) in [0, 1]: each unit's score gradient mixed with its layer group's mean, "
        "g <- (1 - a) g + a mean_layer(g)",
        in_interval(0.0, 1.0, closed_high=True),
    ),
    Option(
        "preconditioner",
        "fisher",
        "'fisher' scales Bernoulli gradients by s(1 - s) (natural gradient; pair with optim='sgd'), 'adam' "
        "leaves the raw gradient to an adaptive optimizer",
        one_of(PRECONDITIONERS),
    ),
    Option(
        "samples_per_step",
        1,
        "sub-models evaluated per forward pass; with 2 or more each advantage uses the leave-one-out baseline",
        positive_int(),
    ),
    Option(
        "init",
        "wanda",
        "initial keep-probabilities: 'wanda' (sigmoid of the z-scored |W| * ||X|| metric, shifted to the "
        "budget, from num_samples calibration sequences) or 'uniform'",
        one_of(("wanda", "uniform")),
    ),
    Option(
        "init_temperature",
        1.0,
        "divides the z-scored metric before the sigmoid of the Wanda start: below 1 sampled sub-models stay "
        "near the initial hard mask",
        finite_positive(),
    ),
    Option(
        "final_weight_update",
        None,
        "None, or 'admm' to refit the kept weights after hardening",
        one_of((None, "admm")),
    ),
    Option(
        "pg_objective",
        "lm",
        "'lm': the sub-model's language-modelling loss, learned in a Trainer by SparsityCallback; 'block': "
        "masks learned one block at a time by prune() against the dense block's output",
        one_of(("lm", "block")),
    ),
    Option(
        "pg_block_steps",
        100,
        "(objective 'block') score updates per block (0: the Wanda-initialised mask itself)",
        non_negative_int("0: the Wanda start"),
    ),
    Option("pg_block_lr", 0.05, "(objective 'block') SGD step size of the score updates", finite_positive()),
    Option("pg_block_windows", 4, "(objective 'block') calibration windows evaluated per update", positive_int()),
    Option("baseline_decay", 0.9, "decay of the loss baseline's exponential moving average", _decay),
    Option(
        "normalize_advantage",
        None,
        "divide the gradient estimate by the running RMS of the advantages; None: on for channel masks with "
        "pg_objective 'block', off otherwise",
        boolean(allow_none=True),
    ),
    Option(
        "harden_scope",
        "global",
        "final masks keep the top keep-probabilities 'global'ly under the budget, within each 'layer', or "
        "(per-weight masks) within each output 'row' (Wanda's rule)",
        one_of(("global", "layer", "row")),
    ),
    Option(
        "uniform_widths",
        False,
        "(channels) every block keeps the same number of MLP channels and of KV groups, so the sliced model is "
        "a standard checkpoint that plain transformers and llama.cpp load (Llama, Mistral, Qwen2/3, Gemma)",
        boolean(),
    ),
    Option(
        "width_multiple",
        32,
        "(uniform_widths) round the MLP channels every block keeps down to a multiple of this, so that "
        "llama.cpp's quantization blocks (32 values) and fast matrix kernels apply to the sliced layers; "
        "1: exactly the budget. A width too small for one multiple is kept exact",
        positive_int(),
    ),
    Option(
        "pg_submodels",
        "sliced",
        "'sliced': each sampled sub-model built once and reused while stale (channels as smaller dense layers, "
        "2:4 as compressed semi-structured weights where torch supports them); 'masked': units zeroed in place",
        one_of(("sliced", "masked")),
    ),
)


@register_solver("pg")
class PolicyGradientSolver(Solver):
    """Block-level solver of pg_objective="block"; its per-layer step only applies the learned mask."""

    requires_calibration = True
    patterns = ("unstructured", "n:m", "channels")
    options = PG_OPTIONS
    #: the LM objective runs in a Trainer (SparsityCallback); prune() learns block by block
    smoke_settings = {"pg_objective": "block", "pg_block_steps": 4, "samples_per_step": 2}

    @classmethod
    def uses(cls, settings: dict[str, Any]) -> Sequence[str]:
        return ("admm",) if settings["final_weight_update"] == "admm" else ()

    @classmethod
    def check_settings(cls, config: SparsityConfig) -> None:
        if config.layer_sharing > 0 and config.pattern != "channels":
            raise ValueError("layer_sharing applies to pattern 'channels' (its layer groups); set it to 0")
        if config.harden_scope == "row" and config.pattern == "channels":
            raise ValueError("harden_scope='row' is for per-weight masks; channel masks harden 'global' or per 'layer'")
        if config.uniform_widths and config.pattern != "channels":
            raise ValueError("uniform_widths applies to pattern 'channels' (whole channels and KV groups)")

    def check_model(self, model: nn.Module) -> None:
        if self.config.uniform_widths:
            check_standard_shape_architecture(model)

    def __init__(self, config: SparsityConfig):
        if config.pg_objective != "block":
            raise ValueError(
                "method 'pg' learns masks during training: pass optimum_sparse.pg.SparsityCallback(config) to a "
                "transformers.Trainer instead of calling prune() (see docs/mask_learning.md), or set "
                "pg_objective='block' to learn per-weight masks block by block in prune()"
            )
        super().__init__(config)

    def prune_block(self, context) -> object:
        from optimum_sparse.pg.block_objective import learn_block_masks  # the spaces, loaded when used

        return learn_block_masks(context, self.config, self)

    def refit_layer(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        """The learned mask applied to the weights as they are (no weight update of its own)."""
        mask = mask.to(weight.device, torch.bool)
        return LayerResult(weight * mask, mask)
