"""Layer-wise reconstruction error and solver time of each method on one synthetic layer.

The layer mimics a SmolLM2 MLP projection (1536 x 576 by default) fed with correlated inputs: a
decaying spectrum plus a few outlier features scaled by 20, the pattern that makes weight updates pay.
Errors are ||X (W' - W)^T||^2 / ||X W^T||^2; times are the solver alone (no calibration passes).

    python benchmarks/layer_error.py
    python benchmarks/layer_error.py --out 576 --in 1536 --tokens 8192 --threads 1

Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from optimum_sparse import SparsityConfig
from optimum_sparse.solvers import get_solver_class
from optimum_sparse.solvers.base import LayerStatistics

# row name -> (method, extra config fields)
VARIANTS = {
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "admm 6 it. / 4 gradual": ("admm", {"admm_iterations": 6, "admm_gradual_steps": 4}),
    "admm (defaults: 20 / 15)": ("admm", {}),
}


def synthetic_layer(rows: int, cols: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, inputs): Gaussian weights; inputs with a log-spaced spectrum, noise and 5 outlier features."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols, cols, generator=generator) * torch.logspace(0, -2, cols)
    inputs = torch.randn(tokens, cols, generator=generator) @ basis + 0.3 * torch.randn(
        tokens, cols, generator=generator
    )
    inputs[:, :5] *= 20
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    return weight, inputs


def relative_error(pruned: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = pruned - weight
    return float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=1536, help="output features (rows)")
    parser.add_argument("--in", dest="cols", type=int, default=576, help="input features (columns)")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "2:4", "0.7"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    weight, inputs = synthetic_layer(args.out, args.cols, args.tokens, args.seed)
    stats = LayerStatistics(args.cols, with_hessian=True)
    stats.update(inputs)
    results = []
    for sparsity in args.sparsities:
        target = {"pattern": sparsity} if ":" in sparsity else {"sparsity": float(sparsity)}
        for name, (method, extra) in VARIANTS.items():
            solver = get_solver_class(method)(SparsityConfig(method=method, **target, **extra))
            start = time.perf_counter()
            result = solver.prune_layer(weight.clone(), stats)
            seconds = time.perf_counter() - start
            error = relative_error(result.weight.float(), weight, stats.hessian)
            results.append({"sparsity": sparsity, "method": name, "error": error, "seconds": seconds})

    print(f"layer {args.out} x {args.cols}, {args.tokens} tokens, {args.threads} threads")
    print("| sparsity | method | relative error | solver s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['sparsity']} | {r['method']} | {r['error']:.4f} | {r['seconds']:.2f} |")
    print(json.dumps({"benchmark": "layer_error", "shape": [args.out, args.cols], "results": results}))


if __name__ == "__main__":
    main()
