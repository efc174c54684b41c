"""SHA-256 of SmolLM2's pruned weights per method and pattern: proof that a refactoring changed no result.

Run it from two checkouts (e.g. before and after a change) and compare the JSON lines; equal digests
mean bit-identical pruned weights. Calibration is the anchors protocol's (32 x 512 tokens of WikiText-2
valid.txt, seed 0); no evaluation is run.

    OMP_NUM_THREADS=1 python benchmarks/weights_digest.py --methods magnitude wanda sparsegpt admm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

from optimum_sparse import SparsityConfig, prune

try:
    from optimum_sparse.auto_loading import load_model_and_tokenizer
except ImportError:  # a checkout from before the loader moved (issue 14)
    from optimum_sparse.loading import load_model_and_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
VALID = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "valid.txt")


def digest(method: str, amount: str) -> str:
    model, tokenizer = load_model_and_tokenizer(None, "float32")
    kwargs = {"pattern": amount} if ":" in amount else {"sparsity": float(amount)}
    config = SparsityConfig(method=method, num_samples=32, seq_len=512, **kwargs)
    prune(model, config, VALID, tokenizer, show_progress=False)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "admm"])
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "2:4"])
    args = parser.parse_args()
    results = {}
    for method in args.methods:
        for amount in args.sparsities:
            start = time.perf_counter()
            results[f"{method} {amount}"] = digest(method, amount)
            print(f"| {method} | {amount} | {results[f'{method} {amount}']} | {time.perf_counter() - start:.0f} s |", flush=True)
    print(json.dumps({"weights_digest": results}))


if __name__ == "__main__":
    main()
