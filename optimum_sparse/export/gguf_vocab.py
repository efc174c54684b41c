"""The tokenizer part of a GGUF file: `tokenizer.ggml.*` metadata for llama.cpp.

From a GGUF file (the default SmolLM2 model is one) every `tokenizer.*` key is copied. A Hugging Face
BPE tokenizer is written with its tokens and token types, its merges, special token ids, add-BOS/EOS
flags and chat template (the last four through the gguf package's `SpecialVocab`): byte-level ones
(GPT-2, Llama 3, Qwen2, SmolLM style) as llama.cpp's `gpt2` tokenizer model with the pre-tokenizer name
llama.cpp knows for their split rules, SentencePiece-style ones with byte fallback (Llama 2, Mistral)
as its `llama` model, with scores ranking the pieces in merge order (llama.cpp merges the adjacent pair
of highest score) and `add_space_prefix`. A vocabulary shorter than the embedding is padded with unused
`[PADi]` tokens. Other tokenizer models (WordLevel, WordPiece, Unigram) have no GGUF form that
llama.cpp and transformers read alike, and are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from optimum_sparse.checkpoint import TEMP_PREFIX

logger = logging.getLogger(__name__)

# llama.cpp's names (tokenizer.ggml.pre) for the split rules of the byte-level BPE tokenizers it knows
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocabulary:
    """Tokenizer metadata ready to write: (key, value, type, array element type) entries plus a SpecialVocab."""

    entries: list[tuple[str, Any, Any, Any]]
    special: Any = None


def _pad_tokens(gguf, entries: list[tuple[str, Any, Any, Any]], rows: int) -> None:
    """Extend the token list (and its per-token arrays) with unused `[PADi]` tokens up to `rows`."""
    index = {key: position for position, (key, *_rest) in enumerate(entries)}
    tokens = entries[index["tokenizer.ggml.tokens"]][1]
    count = len(tokens)
    if count > rows:
        raise ValueError(f"the tokenizer has {count} tokens but the model's embedding only {rows} rows")
    if count == rows:
        return
    fillers = {
        "tokenizer.ggml.tokens": [
            f"[PAD{i}]".encode() if isinstance(tokens[0], bytes) else f"[PAD{i}]" for i in range(count, rows)
        ],
        "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * (rows - count),
        "tokenizer.ggml.scores": [-1000.0] * (rows - count),
    }
    for key, filler in fillers.items():
        if key in index:
            name, value, vtype, sub_type = entries[index[key]]
            entries[index[key]] = (name, list(value) + filler, vtype, sub_type)
    logger.info("padded the vocabulary from %d to %d tokens (the embedding's rows)", count, rows)


def _vocabulary_from_gguf(gguf, path: str, rows: int) -> Vocabulary:
    """Every `tokenizer.*` key of the GGUF file at `path`, as stored (strings as raw bytes)."""
    reader = gguf.GGUFReader(path)
    entries = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise ValueError(f"{path}: {key} is a nested array, which this export does not copy")
            sub_type = field.types[1]
            if sub_type == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            entries.append((key, value, kind, sub_type))
        elif kind == gguf.GGUFValueType.STRING:
            entries.append((key, bytes(field.parts[field.data[0]]), kind, None))
        else:
            entries.append((key, field.contents(), kind, None))
    if not any(key == "tokenizer.ggml.tokens" for key, *_rest in entries):
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens) to copy")
    _pad_tokens(gguf, entries, rows)
    return Vocabulary(entries)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the split rules of a byte-level BPE tokenizer (tokenizer.json's pre_tokenizer)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name
    logger.warning(
        "the tokenizer's pre-tokenizer (%s) is not one llama.cpp names; writing tokenizer.ggml.pre = 'default' "
        "(llama.cpp may split text differently than transformers)",
        kinds,
    )
    return "default"


def _is_byte_level(spec: dict) -> bool:
    def has(component: dict | None) -> bool:
        if not component:
            return False
        if component.get("type") == "ByteLevel":
            return True
        return any(has(part) for part in component.get("pretokenizers", []) + component.get("decoders", []))

    return has(spec.get("pre_tokenizer")) and has(spec.get("decoder"))


def _merge_pairs(spec: dict) -> list[tuple[str, str]]:
    """tokenizer.json's merges, either spelling ("a b" strings or [a, b] pairs)."""
    return [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in spec["model"]["merges"]]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (llama.cpp's add_space_prefix)."""

    def parts(component: dict | None) -> list[dict]:
        if not component:
            return []
        nested = component.get("normalizers") or component.get("pretokenizers") or []
        return [component] + [part for child in nested for part in parts(child)]

    for part in parts(spec.get("normalizer")) + parts(spec.get("pre_tokenizer")):
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
    return False


def _tokens_and_types(gguf, tokenizer: Any) -> tuple[list[str], list[int]]:
    """Every token in id order (holes filled with unused [PADi]) and its llama.cpp token type."""
    vocab = tokenizer.get_vocab()
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, index in vocab.items():
        tokens[index] = text
        if index in added:
            types[index] = int(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types[index] = int(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_special_tokens(tokenizer: Any) -> dict[str, bool]:
    """{"bos": ..., "eos": ...}: whether encoding a text adds the BOS / EOS token (written explicitly, since
    readers assume their own default when the flag is missing)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bos is not None and len(full) > len(plain) and full[0] == bos,
        "eos": eos is not None and len(full) > len(plain) and full[-1] == eos,
    }


def _vocabulary_from_tokenizer(gguf, tokenizer: Any, model: nn.Module, rows: int) -> Vocabulary:
    """A BPE Hugging Face tokenizer as llama.cpp's `gpt2` (byte-level) or `llama` (byte fallback) tokenizer model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers-backed) tokenizer, or a .gguf file to copy one from")
    spec = json.loads(backend.to_str())
    model_spec = spec.get("model") or {}
    kind, byte_fallback = model_spec.get("type"), bool(model_spec.get("byte_fallback"))
    if kind != "BPE" or not (byte_fallback or _is_byte_level(spec)):
        raise ValueError(
            "GGUF export writes BPE tokenizers: byte-level ones (GPT-2, Llama 3, Qwen2, SmolLM style) as llama.cpp's "
            "'gpt2' tokenizer model and SentencePiece-style ones with byte fallback (Llama 2, Mistral) as 'llama'; "
            f"this tokenizer is {kind!r}, which GGUF cannot express the same way. Export from a .gguf source "
            "(its tokenizer is copied) or with a BPE tokenizer"
        )
    tokens, types = _tokens_and_types(gguf, tokenizer)
    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    if byte_fallback:  # SentencePiece-style: llama.cpp merges the adjacent pair of highest score
        merges = _merge_pairs(spec)
        rank = {}
        for position, (left, right) in enumerate(merges):
            rank.setdefault(left + right, position)
        scores = []
        for index, token in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) and types[index] == gguf.TokenType.NORMAL:
                types[index] = int(gguf.TokenType.BYTE)
            # the earlier a merge, the higher its score; a multi-character piece that no merge makes is never
            # preferred; bytes, special and single-character tokens are not made by merging
            if token in rank:
                scores.append(-float(rank[token] + 1))
            elif types[index] == gguf.TokenType.NORMAL and len(token) > 1:
                scores.append(-float(len(merges) + 1))
            else:
                scores.append(0.0)
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < len(types):
            types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
        entries = [
            ("tokenizer.ggml.model", "llama", string, None),
            ("tokenizer.ggml.tokens", tokens, array, string),
            ("tokenizer.ggml.scores", scores, array, gguf.GGUFValueType.FLOAT32),
            ("tokenizer.ggml.token_type", types, array, gguf.GGUFValueType.INT32),
            ("tokenizer.ggml.add_space_prefix", _adds_space_prefix(spec), gguf.GGUFValueType.BOOL, None),
        ]
    else:
        entries = [
            ("tokenizer.ggml.model", "gpt2", string, None),
            ("tokenizer.ggml.pre", _pre_tokenizer_name(spec), string, None),
            ("tokenizer.ggml.tokens", tokens, array, string),
            ("tokenizer.ggml.token_type", types, array, gguf.GGUFValueType.INT32),
        ]
    _pad_tokens(gguf, entries, rows)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as directory:
        tokenizer.save_pretrained(directory)
        ids = {f"{name}_token_id": getattr(model.config, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
            json.dump({key: value for key, value in ids.items() if isinstance(value, int)}, handle)
        special = gguf.SpecialVocab(Path(directory), load_merges=True, n_vocab=rows)
    special.add_special_token.update(_adds_special_tokens(tokenizer))
    if not special.merges and not byte_fallback:
        raise ValueError("the tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer model needs them")
    return Vocabulary(entries, special)


def build_vocabulary(gguf, tokenizer: Any, model: nn.Module, rows: int) -> Vocabulary:
    if tokenizer is None:
        raise ValueError("GGUF export needs the tokenizer (a transformers tokenizer or a .gguf file to copy it from)")
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not path.endswith(".gguf") or not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer source {path!r} is not a .gguf file")
        return _vocabulary_from_gguf(gguf, path, rows)
    return _vocabulary_from_tokenizer(gguf, tokenizer, model, rows)
