"""Calibration and evaluation text: from files, Hub datasets, strings, tensors, or the model itself.

Everything becomes a LongTensor of token windows (num_samples x seq_len). Windows are drawn at
seeded random offsets of the whole tokenized text, so a run is reproducible from its config.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Union

import torch

logger = logging.getLogger(__name__)

CalibrationSource = Union[str, os.PathLike, Sequence[str], torch.Tensor, Sequence[torch.Tensor], None]

# Short names for the usual corpora: name -> (dataset, config)
DATASET_ALIASES = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext": ("wikitext", "wikitext-2-raw-v1"),
}

_FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".raw", ".tokens", ".csv")


def looks_like_path(source: str) -> bool:
    """A string naming a local file (rather than a Hub dataset id)."""
    return os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(_FILE_SUFFIXES)


def check_text_source(source: str | os.PathLike) -> None:
    """Fail early (before a model is loaded) when a local file is named but missing."""
    source = os.fspath(source)
    if looks_like_path(source) and not os.path.isfile(os.path.expanduser(source)):
        raise FileNotFoundError(
            f"text file {source!r} does not exist; pass an existing .txt file or a Hub dataset such as "
            "'wikitext:wikitext-2-raw-v1'"
        )


def load_text(source: str | os.PathLike, split: str = "train") -> str:
    """Read a local text file, or a Hub dataset given as 'name[:config[:split]]' (e.g. 'wikitext2')."""
    source = os.fspath(source)
    check_text_source(source)
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read()
    return _load_dataset_text(source, split)


def parse_dataset_spec(spec: str, split: str = "train") -> tuple[str, str | None, str]:
    """(Hub dataset, config, split) named by 'name[:config[:split]]', aliases resolved ('wikitext2')."""
    parts = spec.split(":")
    name, config = DATASET_ALIASES.get(parts[0], (parts[0], None))
    if len(parts) > 1 and parts[1]:
        config = parts[1]
    if len(parts) > 2 and parts[2]:
        split = parts[2]
    return name, config, split


def _load_dataset_text(spec: str, split: str) -> str:
    import datasets

    name, config, split = parse_dataset_spec(spec, split)
    logger.info("loading dataset %s (%s) split %s", name, config, split)
    data = datasets.load_dataset(name, config, split=split)
    column = (
        "text"
        if "text" in data.column_names
        else next((c for c, f in data.features.items() if getattr(f, "dtype", None) == "string"), None)
    )
    if column is None:
        raise ValueError(f"dataset {spec!r} has no text column; columns are {data.column_names}")
    return "\n\n".join(data[column])


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids of a whole document as a 1-D LongTensor (no special tokens, no length warning)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded random offsets.

    Offsets are drawn as `random.Random(seed).randint(0, tokens - seq_len - 1)`, the convention of the
    SparseGPT and Wanda reference code, so that a given seed selects the same windows as those tools
    on the same token stream (calibration windows alone move perplexity by a few percent at 70%).
    """
    ids = ids.reshape(-1)
    if ids.numel() < seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; give more "
            "text or a smaller seq_len"
        )
    rng = random.Random(seed)
    last = max(ids.numel() - seq_len - 1, 0)
    starts = [rng.randint(0, last) for _ in range(num_samples)]
    return torch.stack([ids[s : s + seq_len] for s in starts])


@torch.no_grad()
def generate_calibration(model, tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Text sampled from the model itself: the data-free fallback when no calibration text is at hand."""
    logger.warning(
        "no calibration data: sampling %d x %d tokens from the model itself (slower and usually worse than "
        "real text; pass calibration data for best results)",
        num_samples,
        seq_len,
    )
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    start = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    first = torch.full((num_samples, 1), start, dtype=torch.long, device=device)
    if vocab:  # diversify the openings: one random token after BOS
        first = torch.cat([first, torch.randint(0, vocab, (num_samples, 1), device=device)], dim=1)
    out = model.generate(
        first,
        attention_mask=torch.ones_like(first),
        do_sample=True,
        top_p=0.95,
        max_length=seq_len,
        min_length=seq_len,
        pad_token_id=start,
    )
    return out[:, :seq_len].cpu()


def get_calibration_data(
    calibration: CalibrationSource,
    tokenizer=None,
    model=None,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Normalise any supported calibration source to a (num_samples x seq_len) LongTensor.

    Accepts a path to a text file, a Hub dataset spec, a list of strings, a tensor of token ids
    (2-D, or a list of 1-D/2-D tensors: used as given), or None (text generated by `model`). A Hub
    dataset that cannot be loaded (offline) also falls back to model-generated text, with a warning;
    a missing local file is an error.
    """
    if isinstance(calibration, torch.Tensor) or (
        isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], torch.Tensor)
    ):
        tensors = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
        rows = [t.reshape(1, -1) if t.dim() == 1 else t for t in tensors]
        lengths = {r.shape[1] for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"calibration tensors must share one sequence length, got {sorted(lengths)}")
        return torch.cat(rows).long().cpu()
    if calibration is None:
        if model is None:
            raise ValueError("no calibration data and no model to generate it from")
        return generate_calibration(model, tokenizer, num_samples, seq_len, seed)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn calibration text into tokens")
    if isinstance(calibration, (str, os.PathLike)):
        try:
            text = load_text(calibration, split="train")
        except FileNotFoundError:
            raise
        except Exception as err:  # Hub unreachable, unknown dataset, ...
            if model is None:
                raise
            logger.warning("could not load calibration dataset %r (%s)", os.fspath(calibration), err)
            return generate_calibration(model, tokenizer, num_samples, seq_len, seed)
    else:
        text = "\n\n".join(calibration)
    return sample_windows(tokenize(text, tokenizer), num_samples, seq_len, seed)


class TokenWindowDataset(torch.utils.data.Dataset):
    """Token windows (num_windows x seq_len) as causal-LM training examples, labels = inputs.

    What a `transformers.Trainer` needs to learn masks or fine-tune on `sample_windows(...)` output,
    with no collator: every example already has the same length.
    """

    def __init__(self, windows: torch.Tensor):
        if windows.dim() != 2:
            raise ValueError(f"windows must be a (num_windows x seq_len) tensor, got shape {tuple(windows.shape)}")
        self.windows = windows.long()

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.windows[index]
        return {"input_ids": row, "labels": row.clone()}
