"""`SparseFineTuneCallback`: keeping a pruned model's zeros while `transformers.Trainer` trains it; and
`save_sparse_checkpoints`, which makes the Trainer's saves of such a model SparseModel checkpoints.

The masks live on the model as `sparse_mask` buffers with gradient-masking hooks (optimum_sparse.mask_buffers).
The callback re-zeroes the pruned weights when training begins and after every optimizer step, so
`Trainer.train()` ends with exactly the pruned zeros whatever the optimizer (weight decay, momentum) does.

Saving. `Trainer.save_model(d)`, `Trainer.push_to_hub()` and the Trainer's checkpoints all end in the
model's own `save_pretrained(d, state_dict=..., is_main_process=...)` (`Trainer._save`). A callback that
knows the masks (this one, and `SparsityCallback` once its masks are final) therefore replaces
`save_pretrained` on that model instance only: transformers writes its checkpoint as before, and the
masks file, sparsity_config.json and the model card are added beside it through
`SparseModel.save_with`, so `SparseModel.from_pretrained(d)` restores the masks and plain transformers
still loads the weights. No extra call is asked of the user, and nothing changes for other models.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from transformers import PreTrainedModel, TrainerCallback

from optimum_sparse.card import model_card_tags
from optimum_sparse.mask_buffers import apply_mask_buffers, buffer_masks, masked_modules, register_mask_buffers
from optimum_sparse.modeling import SparseModel
from optimum_sparse.sparse_checkpoint import remove_sparse_files, writing_checkpoint
from optimum_sparse.structured.sliced_checkpoint import SLICED_UNITS_KEY

logger = logging.getLogger(__name__)

Describe = Callable[[], "SparseModel | None"]


class _SaveSparseCheckpoint:
    """`model.save_pretrained` of a model a sparsity callback trains (installed by `save_sparse_checkpoints`).

    Calls transformers' own `save_pretrained` of the model's class with the same arguments, and adds the
    SparseModel files when `describe()` gives a SparseModel and this rank writes. A deep copy of the model
    gets a plain `save_pretrained` (no callback tracks the copy); so does an unpickled one.
    """

    def __init__(self, model: PreTrainedModel, describe: Describe | None) -> None:
        self.model = model
        self.describe = describe

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        plain = type(model).save_pretrained

        def save() -> Any:
            return plain(model, save_directory, *args, **kwargs)

        if self.describe is None or writing_checkpoint():  # SparseModel.save_pretrained writes its own files
            return save()
        options = inspect.signature(plain).bind(model, save_directory, *args, **kwargs).arguments
        is_main_process = options.get("is_main_process", True)
        writer = getattr(model, "should_save_on_this_rank", None)
        if not (writer(is_main_process) if callable(writer) else is_main_process):
            return save()
        directory = os.fspath(save_directory)
        # a sliced model is a sliced checkpoint (structured.sliced_checkpoint): its weights no longer fit masks
        sparse = None if getattr(model.config, SLICED_UNITS_KEY, None) else self.describe()
        if sparse is None:
            if os.path.isdir(directory):
                remove_sparse_files(directory)  # an earlier record must not describe these weights
            return save()
        if options.get("push_to_hub"):
            logger.warning(
                "save_pretrained(push_to_hub=True) uploads before the SparseModel files are added; push with "
                "trainer.push_to_hub() or SparseModel.push_to_hub() to upload them"
            )
        result = sparse.save_with(save, directory, state_dict=options.get("state_dict"))
        model.add_model_tags(model_card_tags(sparse.sparsity_config))  # kept on the card Trainer.push_to_hub writes
        return result

    def __deepcopy__(self, memo: dict) -> _SaveSparseCheckpoint:
        return _SaveSparseCheckpoint(copy.deepcopy(self.model, memo), None)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "describe": None}


def save_sparse_checkpoints(model: nn.Module, describe: Describe) -> bool:
    """Make `model.save_pretrained(d)` write a SparseModel checkpoint whenever `describe()` gives a SparseModel.

    `Trainer.save_model`, `Trainer.push_to_hub` (which saves into `args.output_dir`, then uploads it) and the
    Trainer's checkpoints call the model's `save_pretrained`; after this, each such save writes the
    transformers checkpoint as before, then adds the masks file, sparsity_config.json and the model card
    (`SparseModel.save_with`: an earlier record removed before the weights are written, the new one
    written last; weights whose zeros no longer match the masks are saved without it, with a warning).
    `describe()` returning None (masks not final yet) gives a plain checkpoint, and so does a sliced
    model (a sliced checkpoint). Only this model instance is changed; calling it again replaces `describe`.

    Returns whether it was installed: only on a transformers `PreTrainedModel` whose `save_pretrained` is
    its class's (a PEFT model saves its adapter, which is not a pruned checkpoint).
    """
    if not isinstance(model, PreTrainedModel):
        return False
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, _SaveSparseCheckpoint):
        current.describe = describe
        return True
    if current is not None:
        logger.warning(
            "%s.save_pretrained was already replaced on this model instance; its saves will not carry the "
            "SparseModel files (save with SparseModel(model, masks, config).save_pretrained)",
            type(model).__name__,
        )
        return False
    model.save_pretrained = _SaveSparseCheckpoint(model, describe)
    return True


class SparseFineTuneCallback(TrainerCallback):
    """Trainer callback that keeps pruned weights at exactly zero during fine-tuning.

    Args:
        masks: where the masks come from: a `SparseModel` (its `keep_masks()` is switched on), a dict
            {module name: bool (out, in) mask} (names as in the plain model; a PeftModel or SparseModel
            wrapping it is fine), or None: the `sparse_mask` buffers already on the trained model.

    ```python
    sparse = SparseModel.from_pretrained("pruned-dir")
    trainer = Trainer(model=sparse.model, args=args, train_dataset=data, callbacks=[SparseFineTuneCallback(sparse)])
    trainer.train()       # sparse.model keeps its zeros
    trainer.save_model()  # a SparseModel checkpoint: SparseModel.from_pretrained(args.output_dir) restores the masks
    ```

    Every save of the trained transformers model (`trainer.save_model`, `trainer.push_to_hub`, the
    Trainer's checkpoints, `model.save_pretrained`) writes the SparseModel files beside the weights
    (`save_sparse_checkpoints`): with a `SparseModel` source its config, metrics and provenance, as
    `sparse.save_pretrained` would; with a dict or the buffers, a config recording the masks' sparsity.
    Either way the model is marked `fine_tuned`, so its card names it a fine-tune of the base model.
    A PEFT model saves its adapter as usual (merge it with `merge_and_mask`, then save a SparseModel);
    pass `sparse.model`, not the SparseModel itself, to the Trainer, which saves any other wrapper as a
    bare state dict.
    """

    def __init__(self, masks=None) -> None:
        self.source = masks
        self._modules: list[nn.Module] = []
        self._model: nn.Module | None = None

    def _attach(self, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("SparseFineTuneCallback needs the Trainer's model (it passes it to callbacks)")
        if isinstance(self.source, SparseModel):
            self.source.keep_masks(True)
            self.source.fine_tuned = True  # its card then says so (base_model_relation: finetune)
        elif isinstance(self.source, Mapping):
            register_mask_buffers(model, self.source)
        elif self.source is not None:
            raise TypeError(f"masks must be a SparseModel, a dict of masks or None, got {type(self.source).__name__}")
        self._modules = masked_modules(model)
        if not self._modules:
            raise ValueError(
                "SparseFineTuneCallback found no masks on the Trainer's model: pass the SparseModel (or its masks) "
                "to the callback, or call SparseModel.keep_masks() on the model being trained"
            )
        logger.info("keeping the masks of %d pruned layers during training", len(self._modules))
        self._model = model
        if isinstance(model, SparseModel):
            logger.warning(
                "the Trainer saves a SparseModel as a bare state dict that transformers cannot load; give it "
                "sparse.model so that trainer.save_model writes the SparseModel checkpoint"
            )
        elif not save_sparse_checkpoints(model, self._saved_as):
            logger.info("the Trainer's %s saves as it always does (not a transformers model)", type(model).__name__)

    def _saved_as(self) -> SparseModel | None:
        """The SparseModel the trained model is saved as (see `save_sparse_checkpoints`)."""
        model = self._model
        if isinstance(self.source, SparseModel) and self.source.model is model:
            return self.source
        masks = dict(self.source) if isinstance(self.source, Mapping) else buffer_masks(model)
        if not masks:
            return None
        sparse = SparseModel(model, masks=masks)
        sparse.fine_tuned = True
        return sparse

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)
        apply_mask_buffers(self._modules)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._modules:
            self._attach(model)
        apply_mask_buffers(self._modules)
