"""The quality matrix of docs/quality.md: {ADMM, SparseLLM} x {uniform, OWL budgets} x {none, block
reconstruction} at 50%, 2:4, 70% and 80% on SmolLM2-135M, under the anchors protocol of ppl_table.py.

Each cell is one `ppl_table.py` row (its own process, so its time and peak memory are its own). The
measured cells live in docs/data/quality_matrix.json, each with the conditions it ran under (threads,
how many jobs shared the machine, the load average) and the command that gave it, so that the matrix
can be filled over several sessions and the docs table is printed from the data, never typed.

    python benchmarks/quality_matrix.py                          # the table and what each part gave
    python benchmarks/quality_matrix.py --plot docs/images/quality_matrix.png
    python benchmarks/quality_matrix.py --run --workers 2        # measure the missing cells, one thread each
    python benchmarks/quality_matrix.py --run --cells sparsellm+owl@0.7 sparsellm@2:4
    python benchmarks/quality_matrix.py --import out/*.out --conditions "one thread, another job beside it"

Prints a markdown table, one line per part's contribution, then one JSON line. OWL budgets are refused
for N:M patterns (every layer is N/M sparse), so those cells are "n/a".

Stopping: `kill <pid of one ppl_table.py>` stops that cell (and the prune it runs) and the run goes on
with the next; `kill <pid of quality_matrix.py>` stops every running cell and starts no queued one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_FILE = os.path.normpath(os.path.join(HERE, "..", "docs", "data", "quality_matrix.json"))
METHODS = ("admm", "sparsellm")
SPARSITIES = ("0.5", "2:4", "0.7", "0.8")
#: (row suffix, budgets, reconstruction) in the table's order: the issue's matrix
VARIANTS = (
    ("", "uniform", "none"),
    ("+owl", "OWL", "none"),
    ("+recon", "uniform", "block"),
    ("+owl+recon", "OWL", "block"),
)
#: shown where measured, not part of the matrix: reconstruction from the dense model's inputs
EXTRA_VARIANTS = (("+recon-dense", "uniform", "block, dense inputs"),)


def cell_key(row: str, sparsity: str) -> str:
    return f"{row}@{sparsity}"


def all_cells() -> list[str]:
    """Every cell that can be measured: OWL with an N:M pattern is refused by the library."""
    return [
        cell_key(method + suffix, sparsity)
        for method in METHODS
        for suffix, budgets, _ in VARIANTS
        for sparsity in SPARSITIES
        if not (budgets == "OWL" and ":" in sparsity)
    ]


def load_data(path: str = DATA_FILE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_data(data: dict[str, Any], path: str = DATA_FILE) -> None:
    """Written to a temporary file, then renamed: an interrupted run never leaves half a data file."""
    data["cells"].sort(key=lambda c: (c["row"], SPARSITIES.index(c["sparsity"]) if c["sparsity"] in SPARSITIES else 9))
    scratch = f"{path}.tmp"
    with open(scratch, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(scratch, path)


def by_key(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cells by `row@sparsity`; a cell measured again replaces the earlier one (the later in the list)."""
    return {cell_key(c["row"], c["sparsity"]): c for c in data["cells"]}


def _format(cell: dict[str, Any] | None, best: float | None) -> str:
    if cell is None:
        return "-"
    text = f"{cell['ppl']:.2f}"
    if best is not None and abs(cell["ppl"] - best) < 1e-9:
        text = f"**{text}**"
    cost = [f"{cell['prune_seconds']:.0f} s"] if cell.get("prune_seconds") else []
    cost += [f"{cell['peak_rss_mb']:.0f} MiB"] if cell.get("peak_rss_mb") else []
    return f"{text} ({', '.join(cost)})" if cost else text


def markdown_table(cells: dict[str, dict[str, Any]]) -> str:
    """Rows: method x budgets x reconstruction; columns: sparsities; cells "ppl (prune s, peak RSS MiB)",
    the best of each column in bold."""
    best = {s: min((c["ppl"] for k, c in cells.items() if k.endswith(f"@{s}")), default=None) for s in SPARSITIES}
    lines = [
        "| method | budgets | reconstruction | "
        + " | ".join(s if ":" in s else f"{float(s):.0%}" for s in SPARSITIES)
        + " |",
        "|---|---|---|" + "---|" * len(SPARSITIES),
    ]
    for method in METHODS:
        for suffix, budgets, reconstruction in VARIANTS + EXTRA_VARIANTS:
            row = method + suffix
            if (suffix, budgets, reconstruction) in EXTRA_VARIANTS and not any(
                cell_key(row, s) in cells for s in SPARSITIES
            ):
                continue
            values = [
                "n/a" if budgets == "OWL" and ":" in s else _format(cells.get(cell_key(row, s)), best[s])
                for s in SPARSITIES
            ]
            lines.append(f"| {method} | {budgets} | {reconstruction} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _change(before: dict[str, Any], after: dict[str, Any]) -> str:
    return f"{before['ppl']:.2f} -> {after['ppl']:.2f} ({after['ppl'] / before['ppl'] - 1:+.1%})"


def contributions(cells: dict[str, dict[str, Any]]) -> list[str]:
    """What OWL, reconstruction and both did to each method's plain cell, where both cells are measured."""
    lines = []
    for method in METHODS:
        for sparsity in SPARSITIES:
            base = cells.get(cell_key(method, sparsity))
            if base is None:
                continue
            parts = []
            labels = (
                ("+owl", "OWL"),
                ("+recon", "reconstruction"),
                ("+owl+recon", "both"),
                ("+recon-dense", "dense-input reconstruction"),
            )
            for suffix, label in labels:
                other = cells.get(cell_key(method + suffix, sparsity))
                if other is not None:
                    parts.append(f"{label} {_change(base, other)}")
            # OWL alone and OWL after reconstruction differ (the second is where budgets pay): show both
            reconstructed = cells.get(cell_key(method + "+recon", sparsity))
            both = cells.get(cell_key(method + "+owl+recon", sparsity))
            if reconstructed is not None and both is not None:
                parts.append(f"OWL on top of reconstruction {_change(reconstructed, both)}")
            if parts:
                lines.append(f"{method} {sparsity}: " + "; ".join(parts))
    return lines


def ppl_table_args(row: str, sparsity: str) -> list[str]:
    """ppl_table.py's arguments for one cell: what is run and what the data file shows as its command."""
    return ["--rows", row, "--sparsities", sparsity, "--no-dense"]


def shown_command(row: str, sparsity: str) -> str:
    """The cell's command as the data file records it (run from the project root)."""
    return f"python benchmarks/ppl_table.py {' '.join(ppl_table_args(row, sparsity))}"


class Cells:
    """The cells' ppl_table.py processes now running, so that SIGTERM can stop them all (each stops its
    own CLI child) and no queued cell starts after it; killing one ppl_table.py stops just that cell."""

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def stop(self, signum: int, _frame: object) -> None:
        self.stopping.set()
        with self.lock:
            for proc in self.running:
                proc.terminate()
        raise SystemExit(128 + signum)

    def run(self, command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of `command`, tracked while it runs."""
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            with self.lock:
                self.running.add(proc)
                if self.stopping.is_set():  # stop() ran between the caller's check and this start
                    proc.terminate()
            try:
                stdout, stderr = proc.communicate()
            finally:
                with self.lock:
                    self.running.discard(proc)
        return proc.returncode, stdout, stderr


def run_cell(key: str, threads: int, cells: Cells) -> dict[str, Any]:
    """One cell through ppl_table.py (same protocol, own process), on `threads` threads."""
    row, sparsity = key.split("@")
    command = [sys.executable, os.path.join(HERE, "ppl_table.py"), *ppl_table_args(row, sparsity)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load_before = os.getloadavg()[0]
    returncode, stdout, stderr = cells.run(command, env)
    if returncode != 0:
        raise RuntimeError(f"{key}: ppl_table.py failed (exit {returncode}): {stderr.strip().splitlines()[-1:]}")
    record = json.loads(stdout.strip().splitlines()[-1])["results"][0]
    if "error" in record:
        raise RuntimeError(f"{key}: {record['error']}")
    shown = f"OMP_NUM_THREADS={threads} {shown_command(row, sparsity)}"
    return {**record, "threads": threads, "load_average_start": round(load_before, 2), "command": shown}


def import_outputs(paths: list[str], conditions: str) -> list[dict[str, Any]]:
    """Cells from saved ppl_table.py outputs (their last line is the JSON summary)."""
    cells = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith("{")]
        if not lines:
            raise ValueError(f"{path} has no ppl_table.py JSON line (did the run finish?)")
        for record in json.loads(lines[-1])["results"]:
            if "error" in record or "ppl" not in record:
                raise ValueError(f"{path}: row {record.get('row')} has no perplexity ({record.get('error')})")
            cells.append({**record, "conditions": conditions, "command": shown_command(record["row"], record["sparsity"])})
    return cells


def _stamp(cell: dict[str, Any]) -> dict[str, Any]:
    keep = ("row", "sparsity", "ppl", "prune_seconds", "peak_rss_mb", "measured_sparsity", "reconstruction")
    stamped = {k: cell[k] for k in keep if k in cell}
    stamped.update({k: v for k, v in cell.items() if k in ("threads", "load_average_start", "conditions", "command")})
    stamped.setdefault("date", datetime.date.today().isoformat())
    return stamped


def measure(keys: list[str], workers: int, threads: int, path: str) -> None:
    """Run `keys` on `workers` parallel processes, saving each cell to the data file as it ends."""
    lock = threading.Lock()
    conditions = f"{threads} thread(s), {workers} job(s) at once on the 2 cores"
    cells = Cells()
    signal.signal(signal.SIGTERM, cells.stop)

    def one(key: str) -> None:
        if cells.stopping.is_set():
            return
        try:
            cell = _stamp({**run_cell(key, threads, cells), "conditions": conditions})
        except RuntimeError as err:
            print(f"{err}", file=sys.stderr, flush=True)
            return
        with lock:
            data = load_data(path)
            data["cells"] = [c for c in data["cells"] if cell_key(c["row"], c["sparsity"]) != key] + [cell]
            save_data(data, path)
        print(f"{key}: ppl {cell['ppl']:.2f}, {cell.get('prune_seconds', 0):.0f} s", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA_FILE, help="the measured cells (JSON)")
    parser.add_argument("--run", action="store_true", help="measure cells (default: the missing ones)")
    parser.add_argument("--cells", nargs="+", default=None, metavar="ROW@SPARSITY", help="cells to measure")
    parser.add_argument("--workers", type=int, default=1, help="cells measured at once")
    parser.add_argument("--threads", type=int, default=None, help="threads per cell (default: 2 // workers)")
    parser.add_argument("--import", dest="imports", nargs="+", default=None, metavar="OUT", help="ppl_table.py outputs")
    parser.add_argument("--conditions", default=None, help="with --import: how the runs shared the machine")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="draw perplexity vs sparsity per variant")
    args = parser.parse_args()
    known = set(all_cells()) | {
        cell_key(m + suffix, s) for m in METHODS for suffix, _, _ in EXTRA_VARIANTS for s in SPARSITIES
    }
    if args.cells and (unknown := [key for key in args.cells if key not in known]):
        parser.error(f"unknown cells {unknown}; cells are ROW@SPARSITY, e.g. {all_cells()[:2]}")
    if args.imports and not args.conditions:
        parser.error("--import needs --conditions: how those runs shared the machine (threads, other jobs)")
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be positive")
    if args.plot:
        from optimum_sparse.plots import check_png_path, require_matplotlib

        try:
            check_png_path(args.plot)
            require_matplotlib()
        except (ValueError, OSError, ImportError) as err:
            parser.error(f"--plot: {err}")

    if args.imports:
        data = load_data(args.data)
        try:
            new = [_stamp(cell) for cell in import_outputs(args.imports, args.conditions)]
        except (OSError, ValueError) as err:
            parser.error(f"--import: {err}")
        keys = {cell_key(c["row"], c["sparsity"]) for c in new}
        data["cells"] = [c for c in data["cells"] if cell_key(c["row"], c["sparsity"]) not in keys] + new
        save_data(data, args.data)
    if args.run:
        measured = by_key(load_data(args.data))
        keys = args.cells or [key for key in all_cells() if key not in measured]
        measure(keys, args.workers, args.threads or max(1, 2 // args.workers), args.data)

    cells = by_key(load_data(args.data))
    missing = [key for key in all_cells() if key not in cells]
    print(markdown_table(cells))
    print()
    for line in contributions(cells):
        print(f"- {line}")
    if missing:
        print(f"\nnot measured yet ({len(missing)}): {' '.join(missing)}")
    summary: dict[str, Any] = {"benchmark": "quality_matrix", "cells": list(cells.values()), "missing": missing}
    if args.plot:
        from optimum_sparse.plots import ppl_vs_sparsity_plot

        records = [{"method": c["row"], "sparsity": c["sparsity"], "ppl": c["ppl"]} for c in cells.values()]
        dense = load_data(args.data).get("dense_ppl")
        summary["plot"] = ppl_vs_sparsity_plot(
            records, args.plot, dense_ppl=dense, title="SmolLM2-135M: ADMM / SparseLLM x OWL x reconstruction"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
