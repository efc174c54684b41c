"""`SparsityCallback`: learn a sparsity mask inside a `transformers.Trainer`.

Policy gradients on stale sub-models (the method cited in `optimum_sparse.pg`): keep-probabilities s of the mask
units are the only trainable parameters; each step evaluates a sampled sub-model by forward passes
only and applies the score-function gradient, reweighted by clipped importance ratios while a
sub-model is reused for `refresh_every` steps; after every optimizer step s is projected back onto
the parameter budget; at the end the top of s becomes the hard mask. Usage::

    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, refresh_every=4)
    callback = SparsityCallback(config)
    trainer = Trainer(model=model, args=TrainingArguments(..., optim="sgd", learning_rate=0.05),
                      train_dataset=dataset, data_collator=collator, callbacks=[callback])
    trainer.train()          # the model ends pruned; callback.masks holds the (out, in) keep-masks

The callback prepares the model when the Trainer finishes its __init__ (`on_init_end`), before the
optimizer exists; call `callback.prepare(model)` yourself to prepare it earlier. Once the masks are
final, `trainer.save_model(d)` (and `trainer.push_to_hub()`) write a SparseModel checkpoint: the
weights with their zeros, the masks file, sparsity_config.json and the model card
(`optimum_sparse.callbacks.save_sparse_checkpoints`); checkpoints saved during training stay plain
Trainer checkpoints of the dense model and the scores, since the masks are not final then. Under
`accelerate launch` / `torchrun` each process samples its own sub-models and DDP averages the score
gradients (`distributed.py`). Checkpoints saved by the Trainer carry the learner's state
(`checkpointing.py`), and `trainer.train(resume_from_checkpoint=...)` continues exactly. See
docs/mask_learning.md for what each setting does.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from optimum_sparse.callbacks import save_sparse_checkpoints
from optimum_sparse.checkpoint import MASKS_NAME, read_masks
from optimum_sparse.config import SparsityConfig
from optimum_sparse.modeling import SparseModel
from optimum_sparse.pg.estimation.estimator import ScoreFunctionEstimator
from optimum_sparse.pg.learner import StaleSubModelLearner
from optimum_sparse.pg.spaces.channel_space import ChannelSpace
from optimum_sparse.pg.spaces.space import MaskSpace
from optimum_sparse.pg.spaces.wanda_init import input_norms, layers_of, wanda_metric
from optimum_sparse.pg.spaces.weight_space import NMSpace, UnstructuredSpace
from optimum_sparse.pg.trainer import checkpointing, distributed, wiring
from optimum_sparse.structured.sliced_checkpoint import record_sliced_units
from optimum_sparse.structured.uniform import check_standard_shape_architecture

logger = logging.getLogger(__name__)

CALIBRATION_KEYS = ("input_ids", "attention_mask")


def build_space(model: nn.Module, config: SparsityConfig) -> MaskSpace:
    """The mask space of `config.pattern`: channels, N:M, or unstructured."""
    if config.pattern == "channels":
        if config.uniform_widths:
            check_standard_shape_architecture(model)
        return ChannelSpace(
            model,
            config.sparsity,
            config.harden_scope,
            config.pg_submodels,
            capacity=config.samples_per_step + 1,
            uniform=config.uniform_widths,
            width_multiple=config.width_multiple,
        )
    if config.nm is not None:
        return NMSpace(model, config)
    return UnstructuredSpace(model, config, config.harden_scope)


def _read_init_masks(source: dict[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    """{module name: bool mask} from a dict, a saved SparseModel directory, or a masks file."""
    if isinstance(source, dict):
        return {name: mask.detach().cpu().bool() for name, mask in source.items()}
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, MASKS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"init_masks: no {MASKS_NAME} at {path}; pass the directory SparseModel.save_pretrained "
            f"(or `optimum-sparse prune --output`) wrote, or the masks as a dict"
        )
    return read_masks(path)


class SparsityCallback(TrainerCallback):
    """Learns the mask of `config` (method "pg") during `Trainer.train()`; see the module docstring.

    Args:
        config: a `SparsityConfig` with method "pg".
        calibration: token ids (a LongTensor, batch x length) for the Wanda initialisation; by default
            the first training batches (up to `config.num_samples` sequences) are used.
        init_masks: start from these masks instead ({module name: (out, in) keep-mask}, or a saved
            SparseModel directory / sparsity_masks.safetensors file), e.g. a mask `prune()` learned
            block by block, to refine it on the training loss. The model must hold the dense weights.
            Their hard mask is the starting mask; with `init="wanda"` the Wanda metric ranks the units
            within the kept and the removed ones (what sampling explores first), `init_temperature`
            sets how close samples stay to it.

    After training: `masks` ({module name: (out, in) bool keep-mask}), `hard_mask` (flat, in the
    space's unit order), `history` (per-step statistics), and for channels `slice_model()`.

    Saving: the model's saves (`trainer.save_model(d)`, `trainer.push_to_hub()`, `model.save_pretrained`)
    write a SparseModel checkpoint once the masks are final, i.e. after `on_train_end` (or `finalize()`):
    `SparseModel.from_pretrained(d)` then restores `masks`, and plain transformers loads the weights.
    Before that (the Trainer's checkpoints during training) they write a plain checkpoint of the dense
    model and the scores, which is what resuming needs, and no SparseModel record that would claim
    unfinished masks. After `slice_model()` the model saves as a sliced checkpoint (`load_sliced_model`).
    """

    def __init__(
        self,
        config: SparsityConfig,
        calibration: torch.Tensor | None = None,
        init_masks: dict[str, torch.Tensor] | str | os.PathLike | None = None,
    ):
        if config.method != "pg":
            raise ValueError(f"SparsityCallback learns masks with method 'pg', got method {config.method!r}")
        if config.pg_objective != "lm":
            raise ValueError(
                f"SparsityCallback learns masks from the training loss (pg_objective='lm'); pg_objective="
                f"{config.pg_objective!r} runs block by block in optimum_sparse.prune(model, config, calibration)"
            )
        self.config = config
        self.calibration = calibration
        self.init_masks = _read_init_masks(init_masks) if init_masks is not None else None
        self.model: nn.Module | None = None
        self.space: MaskSpace | None = None
        self.learner: StaleSubModelLearner | None = None
        self.masks: dict[str, torch.Tensor] | None = None
        self.hard_mask: torch.Tensor | None = None
        self._initialised = config.init == "uniform" and self.init_masks is None
        self._logged_upto = 0
        self._resume_from: str | None = None

    # ---------------------------------------------------------------- setup
    def prepare(self, model: nn.Module) -> nn.Module:
        """Freeze `model`, attach the scores, route its training forward through the estimator (idempotent)."""
        if self.model is model:
            return model
        if self.model is not None:
            raise ValueError("this SparsityCallback already prepared another model; create one per model")
        config = self.config
        device = next(model.parameters()).device
        self.space = build_space(model, config)
        if self.init_masks is not None:
            self.space.keep_from_masks(self.init_masks)  # masks of another pattern fail here, not at train()
        estimator = ScoreFunctionEstimator.from_config(config)
        self.learner = StaleSubModelLearner(
            self.space,
            estimator,
            config.refresh_every,
            config.samples_per_step,
            device=device,
            seed=config.seed,
            layer_sharing=config.layer_sharing,
        )
        wiring.install(model, self.learner)
        self.model = model
        save_sparse_checkpoints(model, self._saved_as)
        logger.info(
            "mask learning (%s): %d score parameters over %s, refresh every %d step(s), clip %g, %s",
            config.describe(),
            self.learner.scores.numel(),
            self.space.unit_name,
            config.refresh_every,
            config.clip,
            config.preconditioner,
        )
        return model

    def initialise(self, batches=None) -> None:
        """Initial scores: the Wanda metric from an iterable of batches (dicts with input_ids /
        attention_mask), and/or the `init_masks` given to the callback.

        Without `batches`, the `calibration` token ids given to the callback are used. Called by the
        Trainer at the start of training; call it earlier to inspect (or evaluate) the initial mask.
        """
        metric = None
        if self.config.init == "wanda":
            if batches is None:
                batches = self._calibration_batches(None, self.learner.scores.device)
            metric = self._wanda_metric(batches)
        temperature = self.config.init_temperature
        if self.init_masks is not None:
            keep = self.space.keep_from_masks(self.init_masks)
            scores = self.space.init_from_mask(keep, metric, temperature)
            source = f"the given masks ({self.space.sparsity_of(keep):.4f} sparse)"
        else:
            scores = self.space.init_from_metric(metric, temperature)
            source = "Wanda"
        with torch.no_grad():
            self.learner.scores.copy_(scores.to(self.learner.scores.device))
        self._initialised = True
        logger.info(
            "initialised from %s: expected sparsity %.4f", source, self.space.expected_sparsity(self.learner.scores)
        )

    def _wanda_metric(self, batches) -> torch.Tensor:
        model = self.model
        self.learner.deactivate()
        was_training = model.training
        model.eval()
        try:
            norms = input_norms(layers_of(self.space), lambda batch: wiring.dense_forward(model, **batch), batches)
        finally:
            model.train(was_training)
        return wanda_metric(self.space, norms)

    def _calibration_batches(self, train_dataloader, device: torch.device):
        if self.calibration is not None:
            ids = self.calibration.long()
            return [{"input_ids": ids[i : i + 8].to(device)} for i in range(0, ids.shape[0], 8)]
        if train_dataloader is None:
            raise ValueError("init='wanda' needs calibration token ids or a training dataloader")
        batches, sequences = [], 0
        for batch in itertools.islice(train_dataloader, max(1, self.config.num_samples)):
            batches.append({k: v.to(device) for k, v in batch.items() if k in CALIBRATION_KEYS})
            sequences += int(batch["input_ids"].shape[0])
            if sequences >= self.config.num_samples:
                break
        return batches

    def resume_from(self, checkpoint: str) -> None:
        """Read the learner state from `checkpoint` when training resumes (by default the Trainer's
        `output_dir/checkpoint-<global step>`; call this when resuming from a folder elsewhere)."""
        self._resume_from = checkpoint

    def _restore(self, args, state) -> None:
        directory = self._resume_from or checkpointing.checkpoint_dir(args.output_dir, state.global_step)
        saved = checkpointing.load_state(directory, distributed.rank())
        if saved is None:
            logger.warning(
                "resuming at step %d without a mask-learning state in %s: the scores come from the model "
                "checkpoint, the baseline and samples start afresh (call callback.resume_from(<checkpoint>))",
                state.global_step,
                directory,
            )
            self._initialised = True
            return
        self.learner.load_state_dict(saved)
        self._logged_upto = len(self.learner.history)
        self._initialised = True
        logger.info("restored the mask-learning state of step %d from %s", self.learner.step, directory)

    # ---------------------------------------------------------------- Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.prepare(model)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.model is None:
            raise RuntimeError("SparsityCallback was not given the model; call callback.prepare(model)")
        if self.config.preconditioner == "fisher" and "sgd" not in str(args.optim).lower():
            logger.info("preconditioner='fisher' is meant for optim='sgd'; %s adapts the step size itself", args.optim)
        # each process samples its own sub-models; DDP averages the score gradients
        self.learner.generator.manual_seed(self.config.seed + int(getattr(args, "process_index", 0)))
        if state.global_step > 0:
            self._restore(args, state)
        if not self._initialised:
            device = self.learner.scores.device
            batches = self._calibration_batches(train_dataloader, device) if self.config.init == "wanda" else None
            self.initialise(batches)
            distributed.synchronise(self.learner.scores)  # ranks calibrated on different batches
        self.model.train()

    def on_save(self, args, state, control, **kwargs):
        if self.learner is None or self.masks is not None:
            return
        directory = checkpointing.checkpoint_dir(args.output_dir, state.global_step)
        path = checkpointing.save_state(directory, distributed.rank(), self.learner.state_dict())
        logger.debug("saved the mask-learning state to %s", path)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.learner.project()

    def on_step_end(self, args, state, control, **kwargs):
        self.learner.end_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        entries = self.learner.history[self._logged_upto :] if self.learner else []
        if not entries:
            return
        self._logged_upto = len(self.learner.history)
        summary = _summarise(entries)
        if logs is not None:
            logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)
        logger.info("mask learning step %d: %s", state.global_step, summary)

    def on_train_end(self, args, state, control, **kwargs):
        self.finalize()

    # ---------------------------------------------------------------- results
    def finalize(self) -> dict[str, torch.Tensor]:
        """Harden the mask, write it into the model (zeros), and give the model its own forward back."""
        if self.masks is not None:
            return self.masks
        learner, model = self.learner, self.model
        self.hard_mask = learner.hard_mask()
        learner.deactivate()  # the dense model: what a weight refit starts from
        wiring.uninstall(model)
        if self.config.final_weight_update == "admm":
            self.refit_kept_weights(self.space.weight_masks(self.hard_mask))
        self.masks = self.space.finalize(self.hard_mask)
        sparsity = self.space.sparsity_of(self.hard_mask)
        logger.info(
            "hardened %s mask: sparsity %.4f (target %.4f)", self.config.describe(), sparsity, self.config.sparsity
        )
        return self.masks

    def _saved_as(self) -> SparseModel | None:
        """What the model's saves add the SparseModel files for: None until the masks are final."""
        if self.masks is None:
            return None
        sparse = SparseModel(self.model, masks=self.masks, config=self.config)
        sparse.calibration = f"the Trainer's training batches ({self.learner.step} steps of SparsityCallback)"
        return sparse

    def refit_kept_weights(self, masks: dict[str, torch.Tensor]) -> None:
        """ADMM weight update (Boza 2024) of the kept weights for `masks` (as `self.masks`).

        Starts from the weights the model holds now, which must be the dense ones: `final_weight_update=
        "admm"` calls it before the hard mask is written; after training, restore the dense weights
        first (the benchmark does, to measure a learned mask with and without the refit)."""
        if self.calibration is None:
            logger.warning("final_weight_update='admm' needs `calibration` token ids; skipping the refit")
            return
        from optimum_sparse.refit import refit_weights

        # per linear layer, a channel mask is a mask with whole rows / columns removed
        if self.config.pattern == "channels":
            config = self.config.replace(method="admm", pattern=None, targets=None, ignore=[])
        else:
            config = self.config.replace(method="admm")
        config.num_samples, config.seq_len = (int(n) for n in self.calibration.shape)
        refit_weights(self.model, self.calibration, masks=masks, config=config, show_progress=False)
        logger.info("refitted the kept weights by ADMM on %d calibration sequences", self.calibration.shape[0])

    def slice_model(self) -> dict[str, int]:
        """For pattern "channels": replace the layers by smaller dense ones without the pruned units.

        Returns the kept units per module, also recorded in `model.config.sliced_units`: save the
        sliced model with `save_sliced_model` (or `model.save_pretrained`) and reload it with
        `load_sliced_model`.
        """
        if not isinstance(self.space, ChannelSpace):
            raise ValueError("only channel masks can be sliced into a smaller dense model")
        if self.hard_mask is None:
            self.finalize()
        kept = self.space.slice_model(self.hard_mask)
        record_sliced_units(self.model, kept, self.space.groups)  # save_pretrained then writes a reloadable checkpoint
        return kept

    @property
    def history(self) -> list[dict[str, float]]:
        return self.learner.history if self.learner else []


def _summarise(entries: list[dict[str, float]]) -> dict[str, Any]:
    last = entries[-1]

    def mean(key: str) -> float:
        return sum(e.get(key, math.nan) for e in entries) / len(entries)

    return {
        "pg_loss": mean("loss"),
        "pg_baseline": last.get("baseline", math.nan),
        "pg_ratio_mean": mean("ratio_mean"),
        "pg_ratio_min": min(e.get("ratio_min", math.nan) for e in entries),
        "pg_ratio_max": max(e.get("ratio_max", math.nan) for e in entries),
        "pg_clipped_fraction": mean("clipped_fraction"),
        "pg_expected_sparsity": last["expected_sparsity"],
        "pg_refreshes": last["refreshes"],
        **{f"pg_{key}": last[key] for key in ("instantiations", "instantiation_seconds") if key in last},
    }
