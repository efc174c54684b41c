"""Helpers shared by the SparsityCallback tests: a window dataset and a CPU Trainer for tiny models."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments


class Windows(torch.utils.data.Dataset):
    """Token windows as causal-LM examples (labels = inputs)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index].clone()}


def make_trainer(model, dataset, callback, output_dir, steps: int = 4, callbacks=(), **overrides) -> Trainer:
    """A Trainer on the CPU, SGD on the scores, logging every step, no checkpoints unless overridden."""
    args = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=0.05,
        optim="sgd",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=dataset, callbacks=[callback, *callbacks])


class StopAt(TrainerCallback):
    """Stops training after optimizer step `step` (a run interrupted after its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
