"""Run by tests/pg/trainer/test_pg_distributed.py under `torchrun --nproc_per_node 2`: mask learning with DDP on the CPU.

Trains a tiny random Llama's channel scores with `SparsityCallback` in a plain Trainer (gloo backend)
and saves, per rank, the scores after the (synchronised) initialisation, the final scores and the
mask sampled at every step to `<output_dir>/rank<r>.pt`. DDP runs with `find_unused_parameters=False`,
the strict mode (the Trainer's default for a transformers model is True, which works as well): the
surrogate loss reaches the scores, the only trainable parameters, at every step.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from pg_helpers import Windows, make_trainer
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from optimum_sparse import SparsityCallback, SparsityConfig

logger = logging.getLogger(__name__)


class Recorder(TrainerCallback):
    """Keeps the scores at the first step and the mask each step used."""

    def __init__(self, callback: SparsityCallback):
        self.callback = callback
        self.initial: torch.Tensor | None = None
        self.samples: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.initial is None:
            self.initial = self.callback.learner.scores.detach().clone()

    def on_step_end(self, args, state, control, **kwargs):
        self.samples.append(self.callback.learner.samples[0].clone())


def main(output_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).float()
    ids = torch.randint(3, 64, (16, 24), generator=torch.Generator().manual_seed(0))
    sparsity = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, refresh_every=2, num_samples=4)
    callback = SparsityCallback(sparsity)
    recorder = Recorder(callback)
    trainer = make_trainer(
        model,
        Windows(ids),
        callback,
        output_dir / "trainer",
        steps=4,
        callbacks=[recorder],
        per_device_train_batch_size=2,
        ddp_find_unused_parameters=False,
    )
    trainer.train()
    rank = trainer.args.process_index
    torch.save(
        {
            "world_size": trainer.args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
            "initial": recorder.initial,
            "scores": callback.learner.scores.detach().clone(),
            "samples": recorder.samples,
        },
        output_dir / f"rank{rank}.pt",
    )
    logger.info("rank %d done", rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
