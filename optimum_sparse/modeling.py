"""`SparseModel`: a pruned transformers model with its masks, in the shape of `peft.PeftModel`.

```python
from optimum_sparse import SparseModel, SparsityConfig

sparse = SparseModel.from_pretrained("HuggingFaceTB/SmolLM2-135M", sparsity_config=SparsityConfig(method="wanda"),
                                     calibration="wikitext2")          # load + prune one-shot
sparse.save_pretrained("smollm2-wanda")                               # plain transformers checkpoint + masks
sparse.save_pretrained("smollm2-wanda-compact", compact=True)          # kept values + bitmasks, smaller
sparse = SparseModel.from_pretrained("smollm2-wanda")                 # back, with masks and config
sparse.push_to_hub("me/smollm2-wanda")
```

The checkpoint format is described in docs/format.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from optimum_sparse.architecture import get_weight, is_transposed
from optimum_sparse.card import MODEL_CARD_NAME, build_model_card, describe_calibration
from optimum_sparse.checkpoint import (
    MASKS_NAME,
    CheckpointInfo,
    dense_weights_bytes,
    directory_bytes,
    save_directory_atomically,
)
from optimum_sparse.config import CONFIG_NAME, SparsityConfig
from optimum_sparse.loading import load_base_model
from optimum_sparse.mask_buffers import (
    MASK_BUFFER,
    check_masks,
    register_mask_buffers,
    remove_mask_buffers,
    resolve_module,
)
from optimum_sparse.sparse_checkpoint import (
    add_sparse_files,
    checkpoint_directory,
    read_model_files,
    read_sparsity_record,
    remove_sparse_files,
    saved_tokenizer,
    upload_checkpoint,
    write_model_files,
    write_sparsity_record,
)

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _call_wrapped(self: SparseModel, *args: Any, labels=None, **kwargs: Any):
    if labels is not None:
        kwargs["labels"] = labels
    return self.model(*args, **kwargs)


class _DelegatedForward:
    """`SparseModel.forward`: calls the wrapped model, and shows that model's forward signature.

    `Trainer` drops every dataset column that `inspect.signature(model.forward)` does not name, and looks
    for `labels` in the class's forward: a bare `(*args, **kwargs)` would leave it an empty batch.
    """

    def __get__(self, instance: SparseModel | None, owner: type | None = None):
        if instance is None:
            return _call_wrapped
        model = instance.model

        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any):
            return model(*args, **kwargs)

        return forward


class SparseModel(nn.Module):
    """A pruned transformers model plus its masks and `SparsityConfig`.

    Attribute access, `forward` and `generate` go to the wrapped model (`.model`, a plain transformers
    model whose pruned weights are zeros), as with `peft.PeftModel`.

    Args:
        model: a transformers model (already pruned, or to be described by `masks`).
        masks: {module name: bool mask (out, in), True = kept}; default: the model's current non-zeros in
            the layers that `config` targets (layers without any zero are left out).
        config: the `SparsityConfig` the model was pruned with; default: one recording the masks' sparsity
            (method "magnitude", as the real method is unknown).
    """

    def __init__(
        self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None, config: SparsityConfig | None = None
    ) -> None:
        super().__init__()
        if isinstance(model, SparseModel):
            raise TypeError("model is already a SparseModel")
        self.model = model
        if masks is None:
            from optimum_sparse.refit import masks_from_zeros

            finder = config if config is not None else SparsityConfig(method="magnitude")
            masks = {name: mask for name, mask in masks_from_zeros(model, finder).items() if not bool(mask.all())}
            if not masks:
                logger.warning("SparseModel: the model has no zero weight in its prunable layers; no masks recorded")
        self.masks: dict[str, torch.Tensor] = check_masks(model, masks)
        if config is None:
            total = sum(mask.numel() for mask in self.masks.values())
            pruned = total - sum(int(mask.sum()) for mask in self.masks.values())
            config = SparsityConfig(method="magnitude", sparsity=min(round(pruned / max(total, 1), 4), 0.9999))
        self.sparsity_config: SparsityConfig = config
        #: measured results shown in the model card and sparsity_config.json, e.g. {"perplexity": 31.5}
        self.metrics: dict[str, Any] = {}
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        #: the model that was pruned (a Hub id goes into the model card's `base_model`)
        self.base_model_id: str | None = name_or_path or None
        #: how the calibration data were chosen (for the model card)
        self.calibration: str | None = None
        #: the shell command that made the model (`optimum-sparse prune` sets it; None for a Python run),
        #: shown in the model card
        self.command: str | None = None
        #: whether the pruned model was trained afterwards (`SparseFineTuneCallback` sets it): the card's
        #: `base_model_relation` is then "finetune" rather than "quantized"
        self.fine_tuned: bool = False
        #: saved beside the model by `save_pretrained` when set
        self.tokenizer = None

    # ------------------------------------------------------------------ delegation (as in peft.PeftModel)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not initialised yet: avoid infinite recursion
                raise
            return getattr(self.model, name)

    forward = _DelegatedForward()

    def generate(self, *args: Any, **kwargs: Any):
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ masks
    def _module(self, name: str) -> nn.Module:
        return resolve_module(self.model, name)

    @torch.no_grad()
    def apply_masks(self) -> SparseModel:
        """Set every pruned weight back to zero (e.g. after training without the callback)."""
        for name, mask in self.masks.items():
            module = self._module(name)
            buffer = module._buffers.get(MASK_BUFFER)
            if buffer is not None:
                module.weight.masked_fill_(~buffer, 0)
            else:
                weight = get_weight(module)
                weight.masked_fill_(~mask.to(weight.device), 0)
        return self

    def keep_masks(self, enabled: bool = True) -> SparseModel:
        """Register the masks as `sparse_mask` buffers with gradient-masking hooks (or remove them).

        Gradients of pruned weights are then zero; `SparseFineTuneCallback` also re-zeroes the weights
        after every optimizer step, which keeps the sparsity exact whatever the optimizer does.
        """
        if enabled:
            register_mask_buffers(self.model, self.masks)
            self.apply_masks()
        else:
            remove_mask_buffers(self.model)
        return self

    def _masked_weights(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The (out, in) weight of every masked module: the model's, or the one in `state_dict` (what a
        caller that hands its own state dict to `save_pretrained` saves: FSDP, DeepSpeed); None when
        `state_dict` lacks one of them."""
        weights = {}
        for name in self.masks:
            module = self._module(name)
            if state_dict is None:
                weights[name] = get_weight(module).detach()
                continue
            tensor = state_dict.get(f"{name}.weight")
            if tensor is None:
                return None
            weights[name] = tensor.detach().t() if is_transposed(module) else tensor.detach()
        return weights

    def _layer_sparsity(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        weights = self._masked_weights() if weights is None else weights
        return {name: int((weight == 0).sum()) / max(weight.numel(), 1) for name, weight in weights.items()}

    @property
    def measured_sparsity(self) -> float:
        """Fraction of zeros over the pruned layers' weights."""
        zeros = numel = 0
        for name in self.masks:
            weight = get_weight(self._module(name))
            zeros += int((weight == 0).sum())
            numel += weight.numel()
        return zeros / max(numel, 1)

    def sparsity_report(self) -> dict:
        """Measured zeros per prunable linear of the blocks and in total (see `evaluation.sparsity_report`)."""
        from optimum_sparse.evaluation import sparsity_report

        return sparsity_report(self.model)

    def _check_zeros(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Refuse adapters and non-zero pruned weights (in the model, or in the `weights` about to be saved)."""
        for name, mask in self.masks.items():
            if self.model.get_submodule(name) is not self._module(name):
                raise ValueError(
                    f"{name} carries an adapter (PEFT); merge it first, keeping the zeros: "
                    "SparseModel(merge_and_mask(peft_model, sparse), sparse.masks, sparse.sparsity_config)"
                )
            weight = get_weight(self._module(name)).detach() if weights is None else weights[name]
            stray = int((weight != 0).logical_and_(~mask.to(weight.device)).sum())
            if stray:
                raise ValueError(
                    f"{name} has {stray} non-zero weights where its mask prunes them (trained without "
                    "SparseFineTuneCallback?); call .apply_masks() to zero them before saving"
                )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        compact: bool = False,
        tokenizer=None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> CheckpointInfo:
        """Save the model, its masks, `sparsity_config.json` and a model card, atomically.

        Args:
            save_directory: written in a temporary sibling directory, then renamed into place; a failure
                leaves an existing directory untouched. An existing checkpoint directory is replaced as a
                whole; any other non-empty directory needs `overwrite=True`.
            compact: store pruned weights as kept values + bitmasks (only `SparseModel.from_pretrained`
                reads that); default: a standard transformers checkpoint with zeros where pruned.
            tokenizer: saved alongside (default: `self.tokenizer`, when set).
            kwargs: passed to transformers' `save_pretrained` (dense format), e.g. `max_shard_size`.
        Returns:
            `CheckpointInfo` with the sizes on disk (and the dense size, for comparison).
        """
        self._check_zeros()
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        info: dict[str, int] = {}

        def write(directory: str) -> None:
            info.update(self._write(directory, compact, tokenizer, **kwargs))

        save_directory = os.fspath(save_directory)
        save_directory_atomically(save_directory, write, overwrite=overwrite)
        result = CheckpointInfo(
            directory=save_directory,
            format="compact" if compact else "dense",
            total_bytes=directory_bytes(save_directory),
            weights_bytes=info["weights_bytes"],
            dense_weights_bytes=info["dense_weights_bytes"],
        )
        logger.info(
            "saved %s checkpoint to %s: weights %.1f MiB (dense: %.1f MiB, ratio %.2f)",
            result.format,
            save_directory,
            result.weights_bytes / 2**20,
            result.dense_weights_bytes / 2**20,
            result.ratio,
        )
        return result

    def _write(self, directory: str, compact: bool, tokenizer, **kwargs: Any) -> dict[str, int]:
        checkpoint, weight_files = write_model_files(directory, self.model, self.masks, compact, **kwargs)
        self._write_record_and_card(directory, checkpoint, self._layer_sparsity())
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return {
            "weights_bytes": directory_bytes(directory, weight_files + [MASKS_NAME]),
            "dense_weights_bytes": dense_weights_bytes(self.model),
        }

    def _write_record_and_card(
        self, directory: str, checkpoint: dict[str, Any], layer_sparsity: dict[str, float]
    ) -> None:
        """sparsity_config.json (with `checkpoint`, the layout record) and the model card."""
        measured = write_sparsity_record(
            directory,
            self.sparsity_config,
            self.masks,
            layer_sparsity,
            checkpoint,
            metrics=self.metrics,
            base_model=self.base_model_id,
            calibration=self.calibration,
            command=self.command,
            fine_tuned=self.fine_tuned,
        )
        compact = checkpoint.get("format") == "compact"
        card = self.model_card(compact=compact, measured_sparsity=measured, layer_sparsity=layer_sparsity)
        with open(os.path.join(directory, MODEL_CARD_NAME), "w", encoding="utf-8") as handle:
            handle.write(str(card))

    def save_with(
        self,
        save_weights: Callable[[], T],
        directory: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> T:
        """Have `save_weights()` write the dense transformers checkpoint of `self.model` into `directory`,
        and add the masks file, sparsity_config.json and the model card beside it.

        This is how a model trained with `SparseFineTuneCallback` or `SparsityCallback` saves: the Trainer
        calls transformers' own `save_pretrained` (`save_weights`) into a directory of its choosing, which
        may hold other files (checkpoints, logs), so the directory is not replaced as a whole. Instead:
        an earlier record in `directory` is removed before the weights are written, and the new files are
        added after them, sparsity_config.json last (`sparse_checkpoint.add_sparse_files`), so
        `from_pretrained` never reads a record beside weights it was not written for. The tokenizer is
        the caller's to save (the Trainer saves its own).

        The weights are saved in any case, since a Trainer's save must not fail over the masks: if they
        cannot be described (a pruned weight is non-zero, or `state_dict` lacks a masked weight), they
        are saved without the SparseModel files, with a warning saying why.

        Args:
            save_weights: writes the dense checkpoint (e.g. the model's `save_pretrained` bound to its
                arguments); its result is returned.
            directory: where `save_weights` writes.
            state_dict: the tensors `save_weights` saves, when they are not the model's own (FSDP,
                DeepSpeed); the zeros are checked and measured there.
        """
        directory = os.fspath(directory)
        weights = self._masked_weights(state_dict)
        problem = None if weights is not None else "the state dict being saved lacks masked weights (a sharded save?)"
        if weights is not None:
            try:
                self._check_zeros(weights)
            except ValueError as err:
                problem = str(err)
        if os.path.isdir(directory):
            remove_sparse_files(directory)
        result = save_weights()
        if problem is not None:
            logger.warning(
                "%s: saved the weights without the SparseModel files (%s, masks): %s", directory, CONFIG_NAME, problem
            )
            return result
        layer_sparsity = self._layer_sparsity(weights)
        add_sparse_files(
            directory,
            self.masks,
            lambda stage, checkpoint: self._write_record_and_card(stage, checkpoint, layer_sparsity),
        )
        logger.info("added the SparseModel files (masks of %d layers) to %s", len(self.masks), directory)
        return result

    def model_card(
        self,
        compact: bool = False,
        measured_sparsity: float | None = None,
        layer_sparsity: Mapping[str, float] | None = None,
    ) -> ModelCard:
        """The README.md written by `save_pretrained`, as a `huggingface_hub.ModelCard` (`str(card)` is the
        text, `card.data` the front matter): what was done, the results, the command, how to load it.

        Args:
            compact: describe the compact format rather than the dense one.
            measured_sparsity, layer_sparsity: zeros over all pruned layers and {module name: fraction of
                zeros}, of the weights being saved (default: measured on the model).
        """
        return build_model_card(
            self.sparsity_config,
            class_name=type(self.model).__name__,
            pruned_layers=len(self.masks),
            measured_sparsity=self.measured_sparsity if measured_sparsity is None else measured_sparsity,
            layer_sparsity=self._layer_sparsity() if layer_sparsity is None else layer_sparsity,
            base_model_id=self.base_model_id,
            calibration=self.calibration,
            metrics=self.metrics,
            command=self.command,
            fine_tuned=self.fine_tuned,
            compact=compact,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        compact: bool = False,
        tokenizer=None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Save to a temporary directory and upload it with `huggingface_hub.HfApi.upload_folder`."""
        return upload_checkpoint(
            lambda folder: self.save_pretrained(folder, compact=compact, tokenizer=tokenizer),
            repo_id,
            commit_message=commit_message or f"Upload {self.sparsity_config.describe()} model (optimum-sparse)",
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        sparsity_config: SparsityConfig | None = None,
        calibration=None,
        tokenizer=None,
        *,
        show_progress: bool = True,
        keep_masks: bool = False,
        **hf_kwargs: Any,
    ) -> SparseModel:
        """Prune a model one-shot, or load one saved by this library.

        - With `sparsity_config`: load the base model (Hub id, local directory, or a `.gguf` file / `gguf_file=`)
          with transformers (float32 unless `dtype=` says otherwise) and prune it with `optimum_sparse.prune`
          on `calibration` (see `prune`; the tokenizer is loaded from the same place when not given).
        - Without: `pretrained_model_name_or_path` is a checkpoint saved by `save_pretrained` (a directory
          or a Hub repo, dense or compact); its masks and config come back with it.

        `keep_masks=True` registers the mask buffers at once (see `keep_masks`), ready for fine-tuning.
        `hf_kwargs` go to transformers' `from_pretrained` (dtype, revision, token, device_map, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if sparsity_config is not None:
            sparse = cls._prune_pretrained(path, sparsity_config, calibration, tokenizer, show_progress, hf_kwargs)
            return sparse.keep_masks() if keep_masks else sparse
        path, hf_kwargs = checkpoint_directory(path, hf_kwargs)
        sparse = cls._load_saved(path, hf_kwargs)
        return sparse.keep_masks() if keep_masks else sparse

    @classmethod
    def _prune_pretrained(cls, path, config, calibration, tokenizer, show_progress, hf_kwargs) -> SparseModel:
        from optimum_sparse.sequential import prune

        model, tokenizer = load_base_model(path, hf_kwargs, tokenizer)
        result = prune(model, config, calibration, tokenizer, show_progress=show_progress)
        sparse = cls(model, masks=result.masks, config=config)
        sparse.base_model_id = path
        sparse.calibration = describe_calibration(calibration, config)
        sparse.tokenizer = tokenizer
        sparse.pruning_result = result
        return sparse

    @classmethod
    def _load_saved(cls, directory: str, hf_kwargs: dict[str, Any]) -> SparseModel:
        raw, config = read_sparsity_record(directory)
        model, masks = read_model_files(directory, raw.get("checkpoint") or {}, hf_kwargs)
        model.eval()
        if masks is None:
            logger.info("%s has no masks file: taking the masks from the model's zeros", directory)
        sparse = cls(model, masks=masks, config=config)
        sparse.metrics = dict(raw.get("metrics") or {})
        sparse.base_model_id = raw.get("base_model") or sparse.base_model_id
        sparse.calibration = raw.get("calibration")
        sparse.command = raw.get("command")
        sparse.fine_tuned = bool(raw.get("fine_tuned", False))
        sparse.tokenizer = saved_tokenizer(directory)
        try:
            sparse._check_zeros()
        except ValueError as err:
            logger.warning("%s: %s", directory, err)
        return sparse


def is_compact_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local directory holding a compact checkpoint (which only `SparseModel` can load)."""
    config_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as handle:
        return (json.load(handle).get("checkpoint") or {}).get("format") == "compact"
