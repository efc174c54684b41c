"""Mask learning (`SparsityCallback`, method "pg") on SmolLM2-135M against one-shot channel scores.

For each sparsity (and each `--refresh-every` K) one run, in a fresh model:

1. Wanda initialisation of the keep-probabilities from 32 calibration windows of WikiText-2 valid;
   the hard mask of these scores is the *Wanda-structured* baseline (channel score = sum over the
   channel's weights of |W_ij| * ||X_j||); the same with ||X_j|| = 1 is the *magnitude* baseline.
2. `Trainer.train()` on windows of valid.txt with the callback, for `--steps` steps or until the
   `--budget-minutes` run out, whichever is first.
3. Perplexity of the three masks under the foundation protocol (first 40 x 1024-token windows of
   test.txt); for channels, the learned model is then sliced into smaller dense layers and its
   forward speed compared with the dense model's on the same 1024-token input.

    python benchmarks/mask_learning.py --sparsities 0.3 0.5 --steps 300 --budget-minutes 40
    python benchmarks/mask_learning.py --sparsities 0.3 --refresh-every 1 4 16 --steps 60
    python benchmarks/mask_learning.py --sparsities 0.3 --init-masks DIR   # refine a mask prune() learned

Prints a markdown table, then one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from optimum_sparse import SparsityCallback, SparsityConfig, perplexity
from optimum_sparse.auto_loading import load_model_and_tokenizer
from optimum_sparse.calibration import TokenWindowDataset, load_text, sample_windows, tokenize
from optimum_sparse.pg.spaces.wanda_init import layers_of, wanda_metric

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")
logger = logging.getLogger("mask_learning")


class StopAfter(TrainerCallback):
    """Ends training once `seconds` have passed (the time budget of a run)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


@torch.inference_mode()
def tokens_per_second(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Forward throughput on one window (after a warm-up call), best of `repeats`."""
    window = ids.reshape(1, -1)
    model(input_ids=window, use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=window, use_cache=False)
        best = min(best, time.perf_counter() - start)
    return window.numel() / best


def score_ppl(callback: SparsityCallback, scores: torch.Tensor, evaluate) -> float:
    """Perplexity of the hard mask of `scores` (the prepared model evaluates its hard mask)."""
    with torch.no_grad():
        callback.learner.scores.copy_(scores)
    return evaluate(callback.model)


def run(args: argparse.Namespace, sparsity: float, refresh_every: int, train_ids, eval_ids) -> dict:
    model, tokenizer = load_model_and_tokenizer(None)
    model.config.use_cache = False
    speed_ids = eval_ids[: args.speed_tokens]
    dense_speed = tokens_per_second(model, speed_ids, args.speed_repeats) if args.pattern == "channels" else None
    dense_params = sum(p.numel() for p in model.parameters())

    def evaluate(m: torch.nn.Module) -> float:
        return perplexity(m, tokenizer, eval_ids, 1024, args.eval_max_windows, show_progress=False)

    calibration = sample_windows(train_ids, 32, args.seq_len, seed=0)
    config = SparsityConfig(
        method="pg",
        pattern=args.pattern,
        sparsity=sparsity,
        refresh_every=refresh_every,
        clip=args.clip,
        importance_ratio=args.importance_ratio,
        layer_sharing=args.layer_sharing,
        harden_scope=args.harden_scope,
        preconditioner="fisher",
        samples_per_step=args.samples_per_step,
        init="wanda",
        init_temperature=args.init_temperature,
        normalize_advantage=args.normalize_advantage or None,
        final_weight_update=None,  # applied below, after the learned mask alone is measured
        num_samples=32,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    callback = SparsityCallback(config, calibration=calibration, init_masks=args.init_masks)
    callback.prepare(model)
    start = time.perf_counter()
    callback.initialise()
    init_seconds = time.perf_counter() - start
    wanda = callback.learner.scores.detach().clone()
    space = callback.space
    ones = {name: torch.ones(layer.weight.shape[1]) for name, layer in layers_of(space).items()}
    magnitude = space.init_from_metric(wanda_metric(space, ones)).to(wanda.device)
    record: dict = {"pattern": args.pattern, "sparsity": sparsity, "refresh_every": refresh_every}
    start_key = "ppl_wanda" if args.init_masks is None else "ppl_start"  # start: the given masks' hard mask
    record.update(
        samples_per_step=args.samples_per_step,
        init_temperature=args.init_temperature,
        learning_rate=args.learning_rate,
        eval_windows=args.eval_max_windows,
        importance_ratio=args.importance_ratio,
        layer_sharing=args.layer_sharing,
        seed=args.seed,
        init_masks=args.init_masks,
        normalize_advantage=args.normalize_advantage,
    )
    if not args.skip_baselines:
        record["ppl_magnitude"] = score_ppl(callback, magnitude, evaluate)
        record[start_key] = score_ppl(callback, wanda, evaluate)
        logger.info("sparsity %s: magnitude %.2f, start %.2f", sparsity, record["ppl_magnitude"], record[start_key])
    with torch.no_grad():
        callback.learner.scores.copy_(wanda)

    windows = sample_windows(train_ids, args.windows, args.seq_len, seed=1)
    training = TrainingArguments(
        output_dir=os.path.join(args.work_dir, f"s{sparsity}-k{refresh_every}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        optim="sgd",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    budget = StopAfter(args.budget_minutes * 60)
    trainer = Trainer(
        model=model, args=training, train_dataset=TokenWindowDataset(windows), callbacks=[callback, budget]
    )
    dense_weights = {n: p.detach().clone() for n, p in model.named_parameters()} if args.final_weight_update else {}
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    history = callback.history
    last = history[-1] if history else {}
    steps = len(history)
    record.update(
        steps=steps,
        init_seconds=init_seconds,
        train_seconds=train_seconds,
        seconds_per_step=train_seconds / max(steps, 1),
        instantiations=int(last.get("instantiations", 0)),
        instantiation_seconds=float(last.get("instantiation_seconds", 0.0)),
        clipped_fraction=sum(h.get("clipped_fraction", 0.0) for h in history) / max(steps, 1),
    )
    record["ppl_learned"] = evaluate(model)  # the hardened mask, written into the weights as zeros
    logger.info("learned: %.2f after %d steps (%.1f s/step)", record["ppl_learned"], steps, record["seconds_per_step"])
    if args.final_weight_update == "admm":
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(dense_weights[name])
        start = time.perf_counter()
        callback.refit_kept_weights(callback.masks)
        record["refit_seconds"] = time.perf_counter() - start
        record["ppl_learned_admm"] = evaluate(model)
        logger.info("learned + ADMM refit: %.2f", record["ppl_learned_admm"])
    if args.pattern == "channels":
        callback.slice_model()
        record["params_dense"] = dense_params
        record["params_sliced"] = sum(p.numel() for p in model.parameters())
        record["tokens_per_s_dense"] = dense_speed
        record["tokens_per_s_sliced"] = tokens_per_second(model, speed_ids, args.speed_repeats)
        record["speedup"] = record["tokens_per_s_sliced"] / dense_speed
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| pattern | sparsity | K | magnitude | start (Wanda, or --init-masks) | learned | steps | s/step | "
        "instantiations | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        start_key = "ppl_start" if r.get("init_masks") else "ppl_wanda"
        magnitude, wanda = (f"{r[key]:.2f}" if key in r else "-" for key in ("ppl_magnitude", start_key))
        learned = f"{r['ppl_learned']:.2f}"
        if "ppl_learned_admm" in r:
            learned += f" (+ADMM {r['ppl_learned_admm']:.2f})"
        lines.append(
            f"| {r['pattern']} | {r['sparsity']} | {r['refresh_every']} | {magnitude} | "
            f"{wanda} | {learned} | {r['steps']} | {r['seconds_per_step']:.2f} | "
            f"{r['instantiations']} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pattern", default="channels", help="channels (default), unstructured or N:M")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--refresh-every", nargs="+", type=int, default=[4], help="K: steps a sub-model is reused")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="training time limit per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=1024, help="training windows drawn from valid.txt")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=2.0)
    parser.add_argument("--importance-ratio", default="joint", choices=["joint", "unit"])
    parser.add_argument(
        "--harden-scope", default="global", choices=["global", "layer", "row"], help="row: Wanda's per-row rule"
    )
    parser.add_argument("--layer-sharing", type=float, default=0.0, help="1: a layer's channel scores move together")
    parser.add_argument("--samples-per-step", type=int, default=1, help="2+: leave-one-out baseline per batch")
    parser.add_argument("--init-temperature", type=float, default=1.0, help="< 1: sharper Wanda initialisation")
    parser.add_argument("--final-weight-update", default=None, choices=[None, "admm"])
    parser.add_argument(
        "--normalize-advantage", action="store_true", help="divide the estimate by the advantages' running RMS"
    )
    parser.add_argument(
        "--init-masks", default=None, help="start from these masks (a directory `optimum-sparse prune --output` wrote)"
    )
    parser.add_argument("--eval-max-windows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask sampler")
    parser.add_argument(
        "--skip-baselines", action="store_true", help="do not evaluate the magnitude / Wanda-structured masks"
    )
    parser.add_argument("--speed-tokens", type=int, default=1024)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--work-dir", default=os.path.join("/tmp", "optimum-sparse-mask-learning"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.pattern not in ("channels", "unstructured") and ":" not in args.pattern:
        parser.error("--pattern must be channels, unstructured or N:M")

    _, tokenizer = load_model_and_tokenizer(None)
    train_ids = tokenize(load_text(os.path.join(DATA, "valid.txt")), tokenizer)
    eval_ids = tokenize(load_text(os.path.join(DATA, "test.txt")), tokenizer)
    records = []
    for sparsity in args.sparsities:
        for refresh_every in args.refresh_every:
            records.append(run(args, sparsity, refresh_every, train_ids, eval_ids))
            logger.info("result: %s", json.dumps(records[-1]))
    print(table(records))
    print(json.dumps({"benchmark": "mask_learning", "model": "SmolLM2-135M", "runs": records}))


if __name__ == "__main__":
    main()
