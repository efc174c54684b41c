"""`SparseFineTuneCallback`: keeping a pruned model's zeros while `transformers.Trainer` trains it.

The masks live on the model as `sparse_mask` buffers with gradient-masking hooks (optimum_sparse.mask_buffers).
The callback re-zeroes the pruned weights when training begins and after every optimizer step, so
`Trainer.train()` ends with exactly the pruned zeros whatever the optimizer (weight decay, momentum) does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import nn
from transformers import TrainerCallback

from optimum_sparse.mask_buffers import apply_mask_buffers, masked_modules, register_mask_buffers
from optimum_sparse.modeling import SparseModel

logger = logging.getLogger(__name__)


class SparseFineTuneCallback(TrainerCallback):
    """Trainer callback that keeps pruned weights at exactly zero during fine-tuning.

    Args:
        masks: where the masks come from: a `SparseModel` (its `keep_masks()` is switched on), a dict
            {module name: bool (out, in) mask} (names as in the plain model; a PeftModel or SparseModel
            wrapping it is fine), or None: the `sparse_mask` buffers already on the trained model.

    ```python
    sparse = SparseModel.from_pretrained("pruned-dir")
    trainer = Trainer(model=sparse.model, args=args, train_dataset=data, callbacks=[SparseFineTuneCallback(sparse)])
    trainer.train()   # sparse.model keeps its zeros; sparse.save_pretrained(...) afterwards
    ```
    """

    def __init__(self, masks=None) -> None:
        self.source = masks
        self._modules: list[nn.Module] = []

    def _attach(self, model: nn.Module | None) -> None:
        if model is None:
            raise ValueError("SparseFineTuneCallback needs the Trainer's model (it passes it to callbacks)")
        if isinstance(self.source, SparseModel):
            self.source.keep_masks(True)
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach(model)
        apply_mask_buffers(self._modules)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._modules:
            self._attach(model)
        apply_mask_buffers(self._modules)
