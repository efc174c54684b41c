"""Regenerate optimum_sparse/tasks/wikitext_cloze/wikitext_cloze.jsonl from WikiText-2 test.txt.

The generator is seeded: run with the defaults, it rewrites the committed file byte for byte (a test checks
this when ../shared/data is present). How examples and distractors are chosen: docs/evaluation.md.

    python benchmarks/wikitext_cloze_data.py [--source ../shared/data/wikitext-2/test.txt] [--output FILE]
"""

from __future__ import annotations

import argparse
import os

from optimum_sparse.cloze import CLOZE_DATA, make_cloze_examples, write_cloze_file

HERE = os.path.dirname(os.path.abspath(__file__))
TEST = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=TEST, help="WikiText-2 (tokenized) test.txt")
    parser.add_argument("--output", default=os.fspath(CLOZE_DATA), help="the jsonl to write")
    parser.add_argument("--num-examples", type=int, default=400)
    parser.add_argument("--num-choices", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.source, encoding="utf-8-sig") as handle:
        text = handle.read()
    examples = make_cloze_examples(text, args.num_examples, args.num_choices, args.seed)
    write_cloze_file(examples, args.output)
    print(f"wrote {len(examples)} examples to {args.output}")


if __name__ == "__main__":
    main()
