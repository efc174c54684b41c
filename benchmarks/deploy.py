"""Pruned SmolLM2 in llama.cpp: perplexity (ours and llama.cpp's), GGUF size, tokens/s against dense.

Rows (protocol of ../shared/anchors.md: calibration 32 x 512 tokens of WikiText-2 valid, seed 0;
perplexity over the first 40 windows x 1024 tokens of test.txt):
- dense;
- channels 30% / 50%, learned block by block with the ADMM refit, sliced, with and without uniform
  widths (uniform: a standard `llama` GGUF; non-uniform: llama.cpp's per-layer `deci` architecture);
- unstructured 50% ADMM (zeros alone: the same dense shapes, so no speed-up is expected).

    python benchmarks/deploy.py --prepare channels-50-uniform   # prune + slice one row (20-40 min on CPU)
    python benchmarks/deploy.py                                 # measure every prepared row
    python benchmarks/deploy.py --skip-speed --threads 1        # perplexities and sizes only
    python benchmarks/deploy.py --speed-only                    # tokens/s only, on a quiet machine

`--prepare` runs the `optimum-sparse prune` command of the row (printed) into bench_out/deploy/ROW;
measuring exports each model to GGUF (f16 and q8_0), evaluates it in llama.cpp (llama-cpp-python) on
the same token windows as ours, and times prompt processing (512 tokens) and generation (64 tokens),
median of 5 rounds that time every row in turn. Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

logger = logging.getLogger("deploy")

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")
OUT = os.path.join(HERE, "..", "bench_out", "deploy")
PROTOCOL = ["--num-samples", "32", "--seq-len", "512", "--eval-seq-len", "1024", "--eval-max-windows", "40"]
CHANNELS = ["--method", "pg", "--set", "pattern=channels", "pg_objective=block", "samples_per_step=2"]
CHANNELS += ["pg_block_lr=0.01", "--weight-update", "admm", "--slice"]

#: row -> flags of its prune command (None: the dense model itself)
ROWS: dict[str, list[str] | None] = {
    "dense": None,
    "channels-30-uniform": [*CHANNELS, "--sparsity", "0.3", "--uniform-widths"],
    "channels-30": [*CHANNELS, "--sparsity", "0.3"],
    "channels-50-uniform": [*CHANNELS, "--sparsity", "0.5", "--uniform-widths"],
    "channels-50": [*CHANNELS, "--sparsity", "0.5"],
    "unstructured-50-admm": ["--method", "admm", "--sparsity", "0.5"],
}
EVAL_SEQ_LEN, EVAL_WINDOWS = 1024, 40


def prepare(row: str) -> None:
    """Prune, slice and save one row with the CLI; its JSON record goes beside the model."""
    target = os.path.join(OUT, row)
    command = [sys.executable, "-m", "optimum_sparse.cli", "prune", *ROWS[row], *PROTOCOL]
    command += ["--calibration-data", os.path.join(DATA, "valid.txt"), "--eval-data", os.path.join(DATA, "test.txt")]
    command += ["--skip-dense-eval", "--output", target, "--overwrite", "--json", "--no-progress"]
    print(" ".join(command[1:]), flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(target, "deploy_record.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def _windows(tokenizer) -> list[list[int]]:
    from optimum_sparse.calibration import load_text, tokenize
    from optimum_sparse.evaluation import eval_windows

    ids = tokenize(load_text(os.path.join(DATA, "test.txt"), split="test"), tokenizer)
    return [w.tolist() for w in eval_windows(ids, EVAL_SEQ_LEN, EVAL_WINDOWS)]


def llama_cpp_perplexity(path: str, windows: list[list[int]], threads: int) -> float:
    """exp(mean over windows of the mean next-token NLL): what `optimum_sparse.perplexity` computes."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=EVAL_SEQ_LEN, n_batch=512, logits_all=True, n_threads=threads, verbose=False)
    losses = []
    for window in windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        losses.append(-float(log_probs[np.arange(len(window) - 1), window[1:]].mean()))
    return math.exp(sum(losses) / len(losses))


def llama_cpp_speed(paths: dict[str, str], prompt: list[int], threads: int, repeats: int, new: int = 64) -> dict:
    """{key: (prompt tokens/s, generated tokens/s)}: medians of `repeats` rounds.

    Every file is loaded once and warmed up; each round then times every file in turn, so a slow
    spell of the machine falls on all rows alike instead of on whichever row ran during it.
    """
    from llama_cpp import Llama

    models = {
        key: Llama(model_path=path, n_ctx=EVAL_SEQ_LEN, n_batch=512, n_threads=threads, verbose=False)
        for key, path in paths.items()
    }
    times: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in paths}
    for round_index in range(repeats + 1):  # round 0 warms up
        for key, llm in models.items():
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for token in prompt[:new]:  # one token at a time, as generation runs
                llm.eval([token])
            if round_index:
                times[key][0].append(len(prompt) / prompt_seconds)
                times[key][1].append(new / (time.perf_counter() - start))
    return {key: (statistics.median(pp), statistics.median(tg)) for key, (pp, tg) in times.items()}


def measure(row: str, threads: int, speed_only: bool = False) -> dict:
    import torch

    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.evaluation import perplexity
    from optimum_sparse.export.gguf import export_gguf
    from optimum_sparse.loading import default_model_path

    source = None if row == "dense" else os.path.join(OUT, row)
    model, tokenizer = load_model_and_tokenizer(source, "float32")
    windows = _windows(tokenizer)
    record = {"row": row, "parameters": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        if not speed_only:
            record["ppl_ours"] = perplexity(
                model, data=torch.tensor(sum(windows, [])), seq_len=EVAL_SEQ_LEN, show_progress=False
            )
    for outtype in ("f16", "q8_0"):
        path = os.path.join(OUT, f"{row}.{outtype}.gguf")
        export_gguf(model, default_model_path(), path, outtype=outtype, overwrite=True)
        record[f"gguf_mb_{outtype}"] = os.path.getsize(path) / 2**20
        if not speed_only:
            record[f"ppl_llama_cpp_{outtype}"] = llama_cpp_perplexity(path, windows, threads)
    record["prompt"] = windows[0][:512]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", nargs="+", choices=[r for r in ROWS if ROWS[r]], default=None)
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=None, help="rows to measure (default: prepared)"
    )
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--speed-only", action="store_true", help="time only; perplexities from the last full run")
    parser.add_argument(
        "--skip-speed", action="store_true", help="perplexities and sizes only; speeds from the last timed run"
    )
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.prepare:
        for row in args.prepare:
            prepare(row)
        return
    rows = args.rows or [r for r in ROWS if r == "dense" or os.path.isdir(os.path.join(OUT, r))]
    if "dense" not in rows:
        rows.insert(0, "dense")  # every ratio is to dense, timed in the same rounds
    saved_path = os.path.join(OUT, "measured.json")
    saved = json.load(open(saved_path, encoding="utf-8")) if os.path.exists(saved_path) else {}
    records = {}
    for row in rows:
        records[row] = measure(row, args.threads, speed_only=args.speed_only)
        if args.speed_only or args.skip_speed:
            records[row] = {**saved.get(row, {}), **records[row]}
        logger.info("measured %s", row)
    paths = {(row, t): os.path.join(OUT, f"{row}.{t}.gguf") for row in rows for t in ("f16", "q8_0")}
    prompt = records[rows[0]].pop("prompt")
    if not args.skip_speed:
        for (row, outtype), (pp, tg) in llama_cpp_speed(paths, prompt, args.threads, args.repeats).items():
            records[row][f"pp_tps_{outtype}"], records[row][f"tg_tps_{outtype}"] = pp, tg
    for record in records.values():
        record.pop("prompt", None)
    saved.update(records)
    with open(saved_path, "w", encoding="utf-8") as handle:
        json.dump(saved, handle, indent=2)
    print_table(list(records.values()))
    print(json.dumps({"deploy": list(records.values()), "threads": args.threads, "repeats": args.repeats}))


def _ratio(record: dict, dense: dict, key: str) -> str:
    nan = float("nan")
    return f"{record.get(key, nan) / dense.get(key, nan):.2f}x"


def print_table(records: list[dict]) -> None:
    """The markdown table (a value not measured yet shows as nan)."""
    dense = records[0]
    nan = float("nan")
    print(
        "| row | parameters | ppl ours | ppl llama.cpp f16 / q8_0 | GGUF MiB f16 / q8_0 | "
        "pp tok/s f16 / q8_0 (vs dense) | tg tok/s f16 / q8_0 (vs dense) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in records:
        get = lambda key, r=r: r.get(key, nan)  # noqa: E731
        pp = f"{get('pp_tps_f16'):.0f} / {get('pp_tps_q8_0'):.0f}"
        tg = f"{get('tg_tps_f16'):.0f} / {get('tg_tps_q8_0'):.0f}"
        if r is not dense:
            pp += f" ({_ratio(r, dense, 'pp_tps_f16')} / {_ratio(r, dense, 'pp_tps_q8_0')})"
            tg += f" ({_ratio(r, dense, 'tg_tps_f16')} / {_ratio(r, dense, 'tg_tps_q8_0')})"
        ppl = f"{get('ppl_ours'):.2f} | {get('ppl_llama_cpp_f16'):.2f} / {get('ppl_llama_cpp_q8_0'):.2f}"
        sizes = f"{get('gguf_mb_f16'):.1f} / {get('gguf_mb_q8_0'):.1f}"
        print(f"| {r['row']} | {r['parameters'] / 1e6:.1f}M | {ppl} | {sizes} | {pp} | {tg} |")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
