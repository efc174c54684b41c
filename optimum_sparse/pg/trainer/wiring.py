"""Making an ordinary `transformers.Trainer` train mask scores instead of weights.

`install(model, learner)` (called by `SparsityCallback.prepare`):
- freezes every parameter of the model (remembering which were trainable);
- attaches the scores as the submodule `model.pg_mask_scores`, so `model.parameters()` (what the
  Trainer's optimizer is built from) yields them and only them as trainable;
- replaces `model.forward` by one that, in training mode, evaluates the sampled sub-model(s) under
  `torch.no_grad()` and returns the outputs with `loss` replaced by the learner's surrogate: its
  value is the sampled loss (what the Trainer logs) and its gradient flows to the scores only, so
  no backward graph through the LLM is ever built. In eval mode the hardened mask is used and the
  outputs are the ordinary ones (the Trainer's `evaluate()` reports the current hard sub-model).
  The replacement keeps the original signature (`functools.wraps`), which the Trainer inspects to
  decide which dataset columns to keep.

Checkpoints: a state-dict pre-hook puts the dense layers / weights back before the model's state dict
is taken, so a Trainer checkpoint holds the dense model (not the sliced or masked sample of the moment)
plus `pg_mask_scores.scores`; the next training forward re-activates the stale sample.

Several processes: DistributedDataParallel wraps the prepared model; its only trainable parameters
are the scores, which the surrogate loss always reaches, so DDP all-reduces (averages) the score
gradients of the ranks' different sub-models whether or not `find_unused_parameters` is set.

Gradient accumulation: when the Trainer passes `num_items_in_batch` it does not divide the loss by
the accumulation steps itself; the surrogate is then scaled by this micro-batch's share of the
label tokens, so the accumulated gradient is the token-weighted mean of the micro-batch estimates.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from optimum_sparse.pg.learner import StaleSubModelLearner

SCORES_ATTRIBUTE = "pg_mask_scores"


def _label_tokens(labels: torch.Tensor) -> torch.Tensor:
    return labels[..., 1:].ne(-100).sum()


def install(model: nn.Module, learner: StaleSubModelLearner) -> None:
    if SCORES_ATTRIBUTE in model._modules:
        raise ValueError("this model is already prepared for mask learning")
    model._pg_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.add_module(SCORES_ATTRIBUTE, learner.module)
    original = model.forward  # bound method of the class

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        if not model.training:
            return _evaluate(model, learner, original, args, kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError(
                "mask learning needs `labels` in every training batch (e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False))"
            )
        outputs: list[Any] = []

        def run() -> torch.Tensor:
            out = original(*args, **kwargs)
            outputs.append(out)
            return out["loss"] if isinstance(out, dict) else out[0]

        loss = learner.training_loss(run)
        if num_items is not None:
            loss = loss * (_label_tokens(labels).to(loss.device, loss.dtype) / num_items)
        result = outputs[-1]
        if isinstance(result, dict):
            result["loss"] = loss
            return result
        return (loss, *result[1:])

    model.forward = forward
    model._pg_original_forward = original
    model._pg_state_dict_hook = model.register_state_dict_pre_hook(lambda *_: learner.deactivate())


def _evaluate(model: nn.Module, learner: StaleSubModelLearner, original, args: tuple, kwargs: dict):
    kwargs.pop("num_items_in_batch", None)
    learner.space.activate(learner.hard_mask())
    learner._active = None  # the next training forward re-instantiates its sample
    with torch.no_grad():
        return original(*args, **kwargs)


def dense_forward(model: nn.Module, **kwargs: Any):
    """The dense model's outputs (no mask), whether or not the model is prepared."""
    original = getattr(model, "_pg_original_forward", model.forward)
    with torch.no_grad():
        return original(**kwargs)


def uninstall(model: nn.Module) -> None:
    """Undo `install`: original forward, scores detached, trainable flags restored."""
    if "forward" in model.__dict__:
        del model.forward
    model.__dict__.pop("_pg_original_forward", None)
    hook = model.__dict__.pop("_pg_state_dict_hook", None)
    if hook is not None:
        hook.remove()
    model._modules.pop(SCORES_ATTRIBUTE, None)
    trainable = model.__dict__.pop("_pg_trainable", set())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
