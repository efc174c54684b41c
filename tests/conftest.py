"""Shared fixtures: tiny random models of five architectures, a character-level tokenizer, calibration text.

Everything is built from configs (no Hub access) and kept small enough for a 2-core CPU: hidden size
<= 64, 2 blocks, widths divisible by 8 so that 2:4 and 4:8 apply to every linear.
"""

from __future__ import annotations

import os
import random
import string
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from optimum_sparse.config import SparsityConfig
from optimum_sparse.registry import methods_used, option_owners

VOCAB_SIZE = 64
HIDDEN = 32
INTERMEDIATE = 64
SEQ_LEN = 32  # calibration window of the unit tests
SLIDING_WINDOW = 8  # < SEQ_LEN: the Gemma model's sliding and global layers really differ

ARCHITECTURES = ("llama", "opt", "gpt2", "qwen2", "gemma")


def method_config(method: str, **kwargs) -> SparsityConfig:
    """A config for `method` from settings meant for several methods: those it does not use are left out.

    Tests loop over methods with one set of arguments (e.g. SparseGPT's block_size); SparsityConfig
    itself refuses a setting of a method the run does not use.
    """
    owners = option_owners()
    used = set(methods_used(method, kwargs.get("weight_update"), {k: v for k, v in kwargs.items() if k in owners}))
    return SparsityConfig(method=method, **{k: v for k, v in kwargs.items() if k not in owners or used & set(owners[k])})

# Tiny matmuls are dominated by thread synchronisation on a shared 2-core machine (8 ms per 32x32 linear
# with 2 threads, 13 us with 1): one thread makes the suite an order of magnitude faster.
torch.set_num_threads(1)
WIKITEXT_VALID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"

# [UNK], [BOS], [EOS], space, a-z, 0-9, a little punctuation: 49 tokens, < VOCAB_SIZE
CHARACTERS = [" "] + list(string.ascii_lowercase) + list(string.digits) + list(".,'-;:()\n")
SPECIAL_TOKENS = ["[UNK]", "[BOS]", "[EOS]"]


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _llama_like(**extra) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def build_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of architecture `arch` (see ARCHITECTURES), in eval mode, float32."""
    seed_everything(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**_llama_like(), **overrides}))
    elif arch == "mistral":  # not in ARCHITECTURES: Llama-like, for what names model types (export, uniform widths)
        model = MistralForCausalLM(MistralConfig(**{**_llama_like(sliding_window=None), **overrides}))
    elif arch == "qwen2":  # q/k/v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**{**_llama_like(), **overrides}))
    elif arch == "gemma":  # sliding-window and global layers: per-layer masks and rotary tables
        config = _llama_like(
            head_dim=8, sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]
        )
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{**config, **overrides}))
    elif arch == "opt":
        config = dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            ffn_dim=INTERMEDIATE,
            word_embed_proj_dim=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = OPTForCausalLM(OPTConfig(**{**config, **overrides}))
    elif arch == "gpt2":  # Conv1D layers with (in, out) weights
        config = dict(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = GPT2LMHeadModel(GPT2Config(**{**config, **overrides}))
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.float().eval()


@pytest.fixture
def make_model() -> Callable[..., torch.nn.Module]:
    """Factory: make_model("llama", seed=0, **config_overrides)."""
    return build_model


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_model("llama")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (lower-cased letters, digits, space, punctuation; anything else is [UNK])."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]", pad_token="[UNK]"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _generated_text(num_chars: int, seed: int = 0) -> str:
    """English-looking filler: random words from a small lexicon, sentences, paragraphs."""
    rng = random.Random(seed)
    lexicon = (
        "the of and to in a is was for on as with by he that at from his it an were are which this be or has "
        "had its first new one after also two who their been they her but have she not time city season "
        "game world film album war river north during state government music school series team station"
    ).split()
    parts: list[str] = []
    size = 0
    while size < num_chars:
        sentence = " ".join(rng.choice(lexicon) for _ in range(rng.randint(5, 18)))
        sentence = sentence.capitalize() + rng.choice([".", ".", ",", ";"]) + (" " if rng.random() < 0.9 else "\n")
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:num_chars]


@pytest.fixture(scope="session")
def calibration_text() -> str:
    """~20 KB of text: the start of WikiText-2 valid when ../shared is present, else generated text."""
    if WIKITEXT_VALID.is_file():
        with open(WIKITEXT_VALID, encoding="utf-8-sig") as handle:
            return handle.read(20_000)
    return _generated_text(20_000)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, calibration_text) -> str:
    """The calibration text written to a .txt file (calibration and evaluation input of file-based tests)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(calibration_text, encoding="utf-8")
    return os.fspath(path)


@pytest.fixture
def windows(tokenizer, calibration_text) -> torch.Tensor:
    """4 seeded calibration windows of SEQ_LEN tokens."""
    from optimum_sparse.calibration import sample_windows, tokenize

    return sample_windows(tokenize(calibration_text, tokenizer), 4, SEQ_LEN, seed=0)


@pytest.fixture(scope="session")
def saved_llama(tmp_path_factory) -> str:
    """A tiny Llama and its tokenizer saved with save_pretrained (the CLI's --model)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama").save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return os.fspath(directory)


@pytest.fixture(autouse=True)
def _seed() -> None:
    seed_everything(0)


def prune_args(model: str, data: str, *extra: str) -> list[str]:
    """`optimum-sparse prune` on `model`, calibrated on 4 x 32 tokens of `data`, on the CPU, quietly."""
    calibration = ["--calibration-data", data, "--num-samples", "4", "--seq-len", "32"]
    return ["prune", "--model", model, *calibration, "--no-progress", "--device", "cpu", *extra]
