"""Masks learned block by block against the dense block's output (pg_objective="block").

For unstructured and N:M masks the language-modelling loss of the whole model is one number for
millions of Bernoulli units, so its score-function gradient is mostly noise; for channel masks it is
one number for tens of thousands of units. The block-local objective of ../shared/DESIGN.md ("Mask
learning") narrows the problem: inside the one-shot engine (`optimum_sparse.prune`), for each decoder
block in turn, the keep-probabilities of that block's units are learned with the same machinery as
`SparsityCallback` (stale sub-models reused for `refresh_every` steps, clipped importance weights,
Fisher preconditioning, budget projection), with

    L(m) = sum ||block_m(X) - block_dense(X)||^2 / sum ||block_dense(X)||^2

on `pg_block_windows` calibration windows per step, X being the (already pruned) previous blocks'
outputs. The scores start from the Wanda metric, so the learned mask starts as a Wanda mask (per-weight:
Wanda's per-row mask; channels: the block's units ranked by sum |W| ||X|| over their weights, at the
sparsity of the block's own MLP + attention parameters). At the end the top of the scores (or the most
likely N:M pattern of each group) becomes the hard mask, kept only if it reconstructs the block at
least as well as the initial one; `weight_update="admm"` then refits the kept weights (Boza 2024).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from optimum_sparse.architecture import get_weight
from optimum_sparse.blocks import BlockContext, prune_and_write
from optimum_sparse.config import SparsityConfig
from optimum_sparse.pg.estimation.estimator import ScoreFunctionEstimator
from optimum_sparse.pg.learner import StaleSubModelLearner
from optimum_sparse.pg.spaces.channel_space import ChannelSpace
from optimum_sparse.pg.spaces.space import MaskSpace
from optimum_sparse.pg.spaces.wanda_init import layers_of, wanda_metric
from optimum_sparse.pg.spaces.weight_space import NMSpace, UnstructuredSpace
from optimum_sparse.solvers.base import Solver
from optimum_sparse.solvers.wanda import wanda_scores
from optimum_sparse.structured.units import block_channel_groups

logger = logging.getLogger(__name__)


@dataclass
class BlockLearningReport:
    """What learning did in one block: the objective of the initial and of the learned hard mask."""

    initial_error: float
    learned_error: float
    steps: int
    refreshes: int
    #: whether the learned mask was used (False: it did not beat the initial mask, which was kept)
    used_learned: bool


def _channel_space(context: BlockContext, config: SparsityConfig) -> ChannelSpace:
    """The block's MLP channels and KV groups, at the requested sparsity of the block's own parameters."""
    groups = block_channel_groups(context.block, context.name, context.model_config)
    targets = {layer.name for layer in context.layers}
    missing = sorted(f"{g.name}.{s.attr}" for g in groups for s in g.slices if f"{g.name}.{s.attr}" not in targets)
    if missing:
        raise ValueError(
            f"pattern 'channels' prunes whole units across their projections, but {missing[:3]} are not targets; "
            "leave `targets` / `ignore` at their defaults"
        )
    capacity = config.samples_per_step + 1
    return ChannelSpace(
        None,
        config.sparsity,
        "global",
        config.pg_submodels,
        capacity,
        groups=groups,
        uniform=config.uniform_widths,
        width_multiple=config.width_multiple,
    )


def _space(context: BlockContext, config: SparsityConfig) -> MaskSpace:
    if config.pattern == "channels":
        return _channel_space(context, config)
    if config.nm is not None:
        return NMSpace(context.block, config, layers=context.layers)
    # hardened per output row, like Wanda: the initial hard mask is then exactly Wanda's mask
    return UnstructuredSpace(context.block, config, harden_scope="row", layers=context.layers)


def _relative_error(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    error = sum(float((o.float() - t.float()).pow(2).sum()) for o, t in zip(outputs, targets))
    scale = sum(float(t.float().pow(2).sum()) for t in targets)
    return torch.tensor(error / max(scale, 1e-30))


def learn_block_masks(context: BlockContext, config: SparsityConfig, solver: Solver) -> BlockLearningReport:
    """Learn, harden and write the masks of one block's target layers (see the module docstring)."""
    inputs, block = context.inputs, context.block
    stats = context.statistics(context.groups())
    with torch.no_grad():
        targets = inputs.run_windows(block)  # the dense block's outputs
    space = _space(context, config)
    if isinstance(space, ChannelSpace):
        metric = wanda_metric(space, {name: stats[name].norms for name in layers_of(space)})
    else:
        metric = torch.cat(
            [
                wanda_scores(get_weight(module).detach().float(), stats[name]).reshape(-1)
                for name, module in space.layout.modules.items()
            ]
        )
    estimator = ScoreFunctionEstimator.from_config(config)
    learner = StaleSubModelLearner(
        space, estimator, config.refresh_every, config.samples_per_step, context.device, config.seed + context.index
    )
    with torch.no_grad():
        learner.scores.copy_(space.init_from_metric(metric, config.init_temperature).to(context.device))
    picker = torch.Generator().manual_seed(config.seed + context.index)
    count = len(inputs.hidden)

    def hard_error() -> float:
        space.activate(learner.hard_mask())
        with torch.no_grad():
            value = float(_relative_error(inputs.run_windows(block), targets))
        learner.deactivate()
        return value

    initial_mask = learner.hard_mask()
    initial = hard_error()
    for _ in range(config.pg_block_steps):
        chosen = torch.randperm(count, generator=picker)[: config.pg_block_windows].tolist()
        windows = [inputs.hidden[i] for i in chosen]

        def run(windows=windows, chosen=chosen) -> torch.Tensor:
            return _relative_error(inputs.run_windows(block, windows), [targets[i] for i in chosen])

        learner.scores.grad = None
        learner.training_loss(run).backward()
        with torch.no_grad():
            learner.scores.sub_(config.pg_block_lr * learner.scores.grad)
        learner.project()
        learner.end_step()
    learned = hard_error() if config.pg_block_steps else initial  # no step: the scores did not move
    # the guard: a learned mask that reconstructs the block worse than its initialisation is not used
    use_learned = learned <= initial
    hard = learner.hard_mask() if use_learned else initial_mask
    if not use_learned:
        logger.info(
            "block %d: the learned mask did not beat the Wanda initialisation; keeping the latter", context.index
        )
    masks = space.weight_masks(hard)
    space.masker.remove()  # the dense weights are back in the model (deactivated above)
    for layer in context.layers:
        prune_and_write(
            layer, stats.get(layer.name), solver, context.refit, masks[layer.name], context.device, context.result
        )
    if isinstance(space, ChannelSpace):
        space.zero_removed_biases(masks)  # a removed unit computes nothing, as in the sliced model
    report = BlockLearningReport(initial, learned, config.pg_block_steps, learner.refreshes, use_learned)
    logger.info(
        "block %d: relative output error %.4g (Wanda init) -> %.4g (learned, %d steps, %d samplings)",
        context.index,
        initial,
        learned,
        report.steps,
        report.refreshes,
    )
    return report
