"""Draw the pictures of docs/ from numbers already measured (docs/data/*.json), without re-running anything.

    python benchmarks/plots.py                 # every picture below, as docs/images/NAME.png
    python benchmarks/plots.py --only ppl_vs_sparsity

- ppl_vs_sparsity: the perplexity tables of docs/benchmarks.md (each row of the data file names its table);
- layer_sparsity: the `optimum-sparse report DIR --json` record of a real pruned SmolLM2 (its command is
  in the data file);
- channels_per_block: the `sliced_units` of the channel-sliced SmolLM2 of docs/deploy.md (its config.json);
- quality_matrix: the cells of docs/quality.md's matrix (benchmarks/quality_matrix.py keeps the data file).

A new measurement goes into the data file first, so that the picture and the table it comes from agree.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from optimum_sparse import plots

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.normpath(os.path.join(HERE, "..", "docs"))


def _load(name: str) -> dict:
    with open(os.path.join(DOCS, "data", f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def draw_ppl_vs_sparsity(target: str) -> str:
    data = _load("ppl_vs_sparsity")
    return plots.ppl_vs_sparsity_plot(data["rows"], target, title="SmolLM2-135M: perplexity vs sparsity (WikiText-2)")


def draw_layer_sparsity(target: str) -> str:
    data = _load("layer_sparsity")
    return plots.layer_sparsity_plot(data, target, title=data["title"])


def draw_channels_per_block(target: str) -> str:
    data = _load("channels_per_block")
    return plots.channels_per_block_plot(data, target, title="SmolLM2-135M, 50% of channels removed: kept per block")


def draw_quality_matrix(target: str) -> str:
    data = _load("quality_matrix")
    records = [{"method": c["row"], "sparsity": c["sparsity"], "ppl": c["ppl"]} for c in data["cells"]]
    title = "SmolLM2-135M: ADMM / SparseLLM x OWL budgets x block reconstruction"
    return plots.ppl_vs_sparsity_plot(records, target, dense_ppl=data["dense_ppl"], title=title)


PICTURES: dict[str, Callable[[str], str]] = {
    "ppl_vs_sparsity": draw_ppl_vs_sparsity,
    "layer_sparsity": draw_layer_sparsity,
    "channels_per_block": draw_channels_per_block,
    "quality_matrix": draw_quality_matrix,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(PICTURES), default=list(PICTURES))
    parser.add_argument("--out-dir", default=os.path.join(DOCS, "images"), help="where the PNGs go")
    args = parser.parse_args()
    for name in args.only:
        path = PICTURES[name](os.path.join(args.out_dir, f"{name}.png"))
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
