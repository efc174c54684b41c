"""Channel masks learned block by block (method "pg", pg_objective="block") on SmolLM2-135M.

For each sparsity, two `prune()` runs under the foundation protocol (32 x 512 calibration windows of
WikiText-2 valid, seed 0 unless `--seed`; perplexity on the first 40 x 1024-token windows of test.txt):

- *start*: `pg_block_steps=0`, the Wanda-initialised channel mask of every block (units ranked by
  sum |W| ||X|| over their weights, each block at the requested sparsity of its own parameters);
- *learned*: `--steps` score updates per block against the dense block's output, each kept only
  if it reconstructs the block at least as well as the start.

The learned model is then sliced (`slice_pruned_channels`) and its forward speed compared with the
dense model's on one 1024-token window.

    python benchmarks/channel_block.py --sparsities 0.3 0.5 --steps 100

Prints a markdown table, then one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import torch
from mask_learning import tokens_per_second  # the sibling benchmark's throughput probe (same measurement)

from optimum_sparse import SparsityConfig, perplexity, prune
from optimum_sparse.auto_loading import load_model_and_tokenizer
from optimum_sparse.calibration import load_text, tokenize
from optimum_sparse.structured.sliced_checkpoint import slice_pruned_channels
from optimum_sparse.structured.unit_masks import channel_keep_from_masks
from optimum_sparse.structured.units import find_channel_groups

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")
logger = logging.getLogger("channel_block")


def prune_channels(
    args: argparse.Namespace, sparsity: float, steps: int, eval_ids: torch.Tensor
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    """A fresh SmolLM2 pruned with channel masks learned for `steps` updates per block, its masks, its record."""
    model, tokenizer = load_model_and_tokenizer(None)
    config = SparsityConfig(
        method="pg",
        pattern="channels",
        sparsity=sparsity,
        pg_objective="block",
        pg_block_steps=steps,
        pg_block_lr=args.learning_rate,
        pg_block_windows=args.block_windows,
        samples_per_step=args.samples_per_step,
        refresh_every=args.refresh_every,
        init_temperature=args.init_temperature,
        num_samples=32,
        seq_len=512,
        seed=args.seed,
        device="cpu",
    )
    start = time.perf_counter()
    result = prune(model, config, os.path.join(DATA, "valid.txt"), tokenizer, show_progress=args.progress)
    seconds = time.perf_counter() - start
    reports = list(result.block_reports.values())
    groups = find_channel_groups(model)
    keep = channel_keep_from_masks(groups, result.masks)
    record = {
        "kv_groups_kept": sum(int(keep[g.units].sum()) for g in groups if g.kind == "attention"),
        "sparsity": sparsity,
        "steps": steps,
        "seconds": seconds,
        "ppl": perplexity(model, tokenizer, eval_ids, 1024, args.eval_max_windows, show_progress=False),
        "blocks_learned": sum(r.used_learned and r.learned_error < r.initial_error for r in reports),
        "block_error_change": [r.learned_error / r.initial_error - 1.0 for r in reports],
    }
    logger.info("sparsity %s, %d steps: perplexity %.2f (%.0f s)", sparsity, steps, record["ppl"], seconds)
    return model, result.masks, record


def run(args: argparse.Namespace, sparsity: float) -> dict:
    dense, tokenizer = load_model_and_tokenizer(None)  # the speed reference, and the evaluation tokens
    eval_ids = tokenize(load_text(os.path.join(DATA, "test.txt")), tokenizer)
    speed_ids = eval_ids[: args.speed_tokens]
    record = {"sparsity": sparsity, "seed": args.seed, "params_dense": sum(p.numel() for p in dense.parameters())}
    record["tokens_per_s_dense"] = tokens_per_second(dense, speed_ids, args.speed_repeats)
    del dense
    _, _, start = prune_channels(args, sparsity, 0, eval_ids)
    model, masks, learned = prune_channels(args, sparsity, args.steps, eval_ids)
    record.update(ppl_start=start["ppl"], seconds_start=start["seconds"], kv_groups_kept_start=start["kv_groups_kept"])
    record.update({f"{key}_learned" if key in ("ppl", "seconds") else key: v for key, v in learned.items()})
    slice_pruned_channels(model, masks)
    record["params_sliced"] = sum(p.numel() for p in model.parameters())
    record["tokens_per_s_sliced"] = tokens_per_second(model, speed_ids, args.speed_repeats)
    record["speedup"] = record["tokens_per_s_sliced"] / record["tokens_per_s_dense"]
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| channels removed | start (Wanda, per block) | learned | blocks improved | KV groups kept (start / learned) | "
        "prune seconds (start / learned) | parameters | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['ppl_start']:.2f} | {r['ppl_learned']:.2f} | {r['blocks_learned']} | "
            f"{r['kv_groups_kept_start']} / {r['kv_groups_kept']} | {r['seconds_start']:.0f} / {r['seconds_learned']:.0f} | "
            f"{r['params_dense'] / 1e6:.1f}M -> {r['params_sliced'] / 1e6:.1f}M | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--steps", type=int, default=100, help="score updates per block")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="pg_block_lr")
    parser.add_argument("--block-windows", type=int, default=4, help="calibration windows per update")
    parser.add_argument("--samples-per-step", type=int, default=2, help="2+: leave-one-out on shared windows")
    parser.add_argument("--refresh-every", type=int, default=1)
    parser.add_argument("--init-temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="calibration windows and mask sampler")
    parser.add_argument("--eval-max-windows", type=int, default=40)
    parser.add_argument("--speed-tokens", type=int, default=1024)
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--progress", action="store_true", help="tqdm per block")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    records = [run(args, sparsity) for sparsity in args.sparsities]
    print(table(records))
    print(json.dumps({"benchmark": "channel_block", "records": records}))


if __name__ == "__main__":
    main()
