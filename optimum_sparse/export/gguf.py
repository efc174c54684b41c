"""GGUF export for llama.cpp: `export_gguf(model, tokenizer, path)` and `export_gguf_from_pretrained(model, path)`.

The file is written with the `gguf` package's `GGUFWriter` (`pip install "optimum-sparse[gguf]"`); the
tensor names and metadata are llama.cpp's, for the Llama family (model types llama and mistral,
written as llama.cpp architecture `llama`) and Qwen2 (`qwen2`):

- metadata: `general.*` (architecture, name, file type), `<arch>.context_length`, `embedding_length`,
  `block_count`, `feed_forward_length`, `attention.head_count`, `attention.head_count_kv`,
  `attention.key_length` / `value_length`, `attention.layer_norm_rms_epsilon`, `rope.freq_base`,
  `rope.dimension_count` (and `rope.scaling.*` for linear scaling), `vocab_size`, and the tokenizer
  (`tokenizer.ggml.*`, `tokenizer.chat_template`);
- tensors: `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
  ffn_up, ffn_down}` (`.weight`, and `.bias` where the model has one), `output_norm`, and `output`
  unless the embeddings are tied (llama.cpp then reuses `token_embd`); Llama 3 rope scaling adds the
  `rope_freqs` tensor llama.cpp divides its frequencies by.

Out types: f32, f16, bf16 and q8_0 apply to the 2-D weights; norm weights, biases and every other 1-D
tensor stay float32. q8_0 is the gguf package's quantiser (blocks of 32 values with one f16 scale); a
weight whose rows are not a multiple of 32 long (possible after channel slicing) is written as f16
instead, as llama.cpp's converter does. Zeros stay exact zeros in every out type, so pruned models
(any pattern) export like dense ones.

Llama-family q_proj / k_proj rows are reordered per head. transformers' rotary embedding pairs
dimension i of a head with dimension i + head_dim/2 (it rotates the two halves); llama.cpp's rope for
the `llama` architecture pairs dimensions 2i and 2i+1. Interleaving the two halves of every head's rows
(row i -> 2i, row head_dim/2 + i -> 2i + 1) gives the same attention scores under both conventions.
Qwen2 runs with llama.cpp's NEOX rope (the halves convention), so its rows are written as they are.

Widths are read from the modules, not from the config, so structured models with smaller uniform
widths export as they are. Layers of different widths (a channel-sliced model, `load_sliced_model`) are
written as llama.cpp's `deci` architecture with per-layer arrays for `feed_forward_length`,
`attention.head_count` and `attention.head_count_kv`. llama.cpp reads those keys as arrays for every
architecture (`llama_model::load_hparams`, `get_key_or_arr`), but only `deci` builds each layer at its
own width (its tensor loading and `llm_build_deci` use `hparams.n_ff(il)`, `n_head(il)`,
`n_head_kv(il)`); `llama` creates every layer with layer 0's widths. deci skips the rest of a layer
without MLP channels (its attention output included) and has no per-layer bias shapes, so such layers
and biased models are refused, as are layers without heads (slicing always keeps one KV group).
transformers cannot read deci files (it has no DeciLM class); llama.cpp reads them (not run by the tests here).

Tokenizer: copied from a GGUF source, or built from a Hugging Face BPE tokenizer (`export.gguf_vocab`).

Every check runs before the file is opened; the file is written next to its destination under a
temporary name and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from optimum_sparse.checkpoint import TEMP_PREFIX
from optimum_sparse.export.gguf_vocab import build_vocabulary
from optimum_sparse.loading import check_model_reference, default_model_path, split_gguf

logger = logging.getLogger(__name__)

#: out types of `export_gguf` (llama.cpp's names)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: transformers model types `export_gguf` writes
ARCHITECTURES = ("llama", "mistral", "qwen2")
#: the llama.cpp architecture that builds layers of different widths
PER_LAYER_ARCHITECTURE = "deci"
#: rope scalings llama.cpp applies the way transformers does
ROPE_TYPES = ("default", "linear", "llama3")
_Q8_0_BLOCK = 32
_INSTALL_HINT = 'GGUF export needs the gguf package: pip install "optimum-sparse[gguf]" (or pip install gguf)'


@dataclass(frozen=True)
class _Family:
    gguf_arch: str  # general.architecture when every layer has the same widths
    interleave_qk: bool  # llama.cpp's rope pairs adjacent dimensions: q/k rows reordered (see module docstring)
    per_layer: bool  # layers of different widths can be written (as deci)


_FAMILIES = {
    "llama": _Family("llama", interleave_qk=True, per_layer=True),
    "mistral": _Family("llama", interleave_qk=True, per_layer=True),
    "qwen2": _Family("qwen2", interleave_qk=False, per_layer=False),
}


@dataclass(frozen=True)
class GGUFLayout:
    """What `export_gguf` writes for a model, found and checked before anything is written."""

    architecture: str  # general.architecture: llama, qwen2, or deci for layers of different widths
    model_type: str
    head_dim: int
    heads: tuple[int, ...]  # query heads per layer
    kv_heads: tuple[int, ...]
    ffn: tuple[int, ...]  # MLP channels per layer
    vocab_rows: int  # rows of the embedding matrix (llama.cpp's n_vocab)
    tied_embeddings: bool

    @property
    def per_layer(self) -> bool:
        return self.architecture == PER_LAYER_ARCHITECTURE


@dataclass(frozen=True)
class GGUFExportInfo:
    """What `export_gguf` wrote."""

    path: str
    architecture: str
    outtype: str
    num_tensors: int
    file_bytes: int
    per_layer_widths: bool


def require_gguf():
    """The `gguf` package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return gguf


def check_outtype(outtype: str) -> str:
    """The out type in llama.cpp's spelling, or a ValueError naming the supported ones."""
    name = str(outtype).lower()
    if name not in OUTTYPES:
        raise ValueError(f"unsupported GGUF out type {outtype!r}; supported: {', '.join(OUTTYPES)}")
    return name


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> str:
    """The absolute output path, refused when it is a directory or an existing file (unless `overwrite`)."""
    output = os.path.abspath(os.fspath(path))
    if os.path.isdir(output):
        raise FileExistsError(f"GGUF output {os.fspath(path)!r} is a directory; give a file name such as model.gguf")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(
            f"GGUF output {os.fspath(path)!r} exists; pass --overwrite (overwrite=True) to replace it"
        )
    return output


def check_architecture(config: Any) -> _Family:
    """Refuse a config that `export_gguf` cannot write (before its weights are loaded)."""
    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"GGUF export supports the architectures {', '.join(ARCHITECTURES)}; this model is {model_type!r}"
        )
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        raise ValueError(
            f"GGUF export of {model_type} needs the silu MLP activation llama.cpp uses, not {activation!r}"
        )
    _rope_settings(config)
    window = getattr(config, "sliding_window", None)
    windowed = model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if windowed and window and window < getattr(config, "max_position_embeddings", 0):
        logger.warning(
            "%s attends within a sliding window of %d tokens; llama.cpp's %s architecture attends to the whole "
            "context, so outputs differ on sequences longer than the window",
            model_type,
            window,
            family.gguf_arch,
        )
    return family


def _rope_settings(config: Any) -> dict[str, Any]:
    """{"theta", "type", ...scaling parameters} from transformers' `rope_parameters` (or older `rope_scaling`)."""
    settings = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = settings.get("rope_theta", getattr(config, "rope_theta", None))
    kind = settings.get("rope_type", settings.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"GGUF export supports rope scaling {', '.join(ROPE_TYPES)}; this model uses {kind!r}")
    partial = settings.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"GGUF export needs the rotary embedding on whole heads (partial_rotary_factor {partial})")
    return {**settings, "theta": float(theta if theta is not None else 10000.0), "type": kind}


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"GGUF export expects a transformers causal LM with decoder layers at model.model.layers "
            f"({type(model).__name__} has none)"
        )
    return layers


def _has_bias(*modules: nn.Module) -> bool:
    return any(getattr(module, "bias", None) is not None for module in modules)


def _tied(model: nn.Module) -> bool:
    """True when the output projection is the embedding matrix itself (llama.cpp then reuses token_embd)."""
    output = model.get_output_embeddings()
    if output is None:
        return True
    return output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def plan_gguf_export(model: nn.Module) -> GGUFLayout:
    """Check that `model` can be written as GGUF and find its per-layer widths (nothing is written)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("GGUF export needs a transformers model (it reads model.config)")
    family = check_architecture(config)
    layers = _decoder_layers(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, kv_heads, ffn, biased = [], [], [], False
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        try:
            q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        except AttributeError:
            raise ValueError(
                f"layer {index} lacks the Llama-family modules (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"
            ) from None
        if q.out_features % head_dim or k.out_features % head_dim:
            raise ValueError(
                f"layer {index}: q/k widths {q.out_features}/{k.out_features} are not whole heads of {head_dim}"
            )
        if v.out_features != k.out_features or o.in_features != q.out_features:
            raise ValueError(f"layer {index}: v_proj / o_proj widths do not match q_proj / k_proj")
        if not gate.out_features == up.out_features == down.in_features:
            raise ValueError(f"layer {index}: gate_proj, up_proj and down_proj widths differ")
        heads.append(q.out_features // head_dim)
        kv_heads.append(k.out_features // head_dim)
        ffn.append(gate.out_features)
        biased = biased or _has_bias(q, k, v, o, gate, up, down)
    architecture = family.gguf_arch
    uniform = len(set(heads)) == len(set(kv_heads)) == len(set(ffn)) == 1
    if not uniform:
        widths = f"MLP channels {ffn}, query heads {heads}, KV heads {kv_heads}"
        if not family.per_layer:
            raise ValueError(
                f"the layers of this {config.model_type} model have different widths ({widths}); llama.cpp builds "
                f"layers of different widths only in its {PER_LAYER_ARCHITECTURE!r} architecture, for Llama-family "
                "models (llama, mistral). Prune with uniform widths to export it"
            )
        if biased:
            raise ValueError(
                f"layers of different widths are written as llama.cpp's {PER_LAYER_ARCHITECTURE!r} architecture, "
                "which has no room for per-layer attention or MLP biases; this model has biases"
            )
        architecture = PER_LAYER_ARCHITECTURE
    for kind, widths in (("MLP channels", ffn), ("attention heads", heads)):
        if 0 in widths:
            raise ValueError(f"layer {widths.index(0)} has no {kind} left; GGUF export needs at least one per layer")
    return GGUFLayout(
        architecture=architecture,
        model_type=config.model_type,
        head_dim=int(head_dim),
        heads=tuple(heads),
        kv_heads=tuple(kv_heads),
        ffn=tuple(ffn),
        vocab_rows=int(model.get_input_embeddings().weight.shape[0]),
        tied_embeddings=_tied(model),
    )


# ------------------------------------------------------------------------------------------ tensors
def interleave_rotary_halves(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of q_proj / k_proj (weight or bias) from transformers' rope layout to llama.cpp's.

    Within each head, row i of the first half goes to 2i and row i of the second half to 2i + 1.
    """
    rows = tensor.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    half = rows // heads // 2
    return tensor.reshape(heads, 2, half, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def llama3_rope_factors(settings: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling (llama.cpp's `rope_freqs` tensor).

    Wavelengths shorter than original_context / high_freq_factor keep their frequency, longer than
    original_context / low_freq_factor are divided by `factor`, and those in between blend the two.
    """
    factor = float(settings["factor"])
    low, high = float(settings.get("low_freq_factor", 1.0)), float(settings.get("high_freq_factor", 4.0))
    original = float(settings.get("original_max_position_embeddings", 8192))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    wavelengths = 2 * math.pi * settings["theta"] ** exponents
    divisors = torch.ones_like(wavelengths)
    for index, wavelength in enumerate(wavelengths.tolist()):
        if wavelength > original / low:
            divisors[index] = factor
        elif wavelength >= original / high:
            smooth = (original / wavelength - low) / (high - low)
            divisors[index] = 1.0 / ((1 - smooth) / factor + smooth)
    return divisors.float()


def _named_tensors(model: nn.Module, layout: GGUFLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's row order) for every tensor the file holds."""
    family = _FAMILIES[layout.model_type]
    base = model.model
    yield "token_embd.weight", model.get_input_embeddings().weight
    rope = _rope_settings(model.config)
    if rope["type"] == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(rope, layout.head_dim)
    for index, layer in enumerate(base.layers):
        attention, mlp = layer.self_attn, layer.mlp
        yield f"blk.{index}.attn_norm.weight", layer.input_layernorm.weight
        projections = (
            ("attn_q", attention.q_proj, layout.heads[index]),
            ("attn_k", attention.k_proj, layout.kv_heads[index]),
            ("attn_v", attention.v_proj, None),
            ("attn_output", attention.o_proj, None),
        )
        for name, module, heads in projections:
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if tensor is None:
                    continue
                if heads is not None and family.interleave_qk:
                    tensor = interleave_rotary_halves(tensor, heads)
                yield f"blk.{index}.{name}.{kind}", tensor
        yield f"blk.{index}.ffn_norm.weight", layer.post_attention_layernorm.weight
        for name, module in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
            for kind in ("weight", "bias"):
                tensor = getattr(module, kind, None)
                if tensor is not None:
                    yield f"blk.{index}.{name}.{kind}", tensor
    yield "output_norm.weight", base.norm.weight
    if not layout.tied_embeddings:
        yield "output.weight", model.get_output_embeddings().weight


def _encode(gguf, name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of one tensor in the out type; 1-D tensors stay float32."""
    array = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values; the model cannot be exported")
    if array.ndim == 1 or outtype == "f32":
        return array, None
    if outtype == "q8_0" and array.shape[-1] % _Q8_0_BLOCK == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if outtype == "q8_0":
        logger.info("%s: rows of %d values are not whole q8_0 blocks; written as f16", name, array.shape[-1])
    half = array.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"{name} has values beyond the f16 range; export it as bf16 or f32")
    return half, None


# ------------------------------------------------------------------------------------------- export
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write_hyperparameters(gguf, writer: Any, model: nn.Module, layout: GGUFLayout) -> None:
    config = model.config
    rope = _rope_settings(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(layout.ffn))
    uint32 = gguf.GGUFValueType.UINT32
    arch = layout.architecture
    per_layer = (
        (f"{arch}.feed_forward_length", layout.ffn),
        (f"{arch}.attention.head_count", layout.heads),
        (f"{arch}.attention.head_count_kv", layout.kv_heads),
    )
    for key, values in per_layer:
        if layout.per_layer:
            writer.add_key_value(key, [int(value) for value in values], gguf.GGUFValueType.ARRAY, sub_type=uint32)
        else:
            writer.add_uint32(key, int(values[0]))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(rope["theta"])
    writer.add_rope_dimension_count(layout.head_dim)
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(layout.vocab_rows)


def _sibling_temp_file(parent: str) -> str:
    """A new empty file in `parent`, created with the permissions of a plain `open` (umask applied)."""
    while True:
        path = os.path.join(parent, TEMP_PREFIX + secrets.token_hex(6) + ".gguf")
        try:
            handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        return path


def _default_name(model: nn.Module) -> str:
    """general.name: the checkpoint's directory or Hub name, else the model type capitalised.

    Not the bare model type: transformers reads a `llama` file named exactly "mistral" as a Mistral model,
    which its GGUF loader then cannot map.
    """
    source = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/")
    return os.path.basename(source) or model.config.model_type.capitalize()


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    outtype: str = "f16",
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFExportInfo:
    """Write `model` as a GGUF file at `path` for llama.cpp (see the module docstring for what is written).

    `tokenizer` is a transformers BPE tokenizer (byte-level, or with byte fallback) or the path of a .gguf
    file whose tokenizer is copied. `outtype` is one of f32, f16, bf16, q8_0. Everything is checked before the file is
    opened, and the file appears only once complete; an existing file is replaced only with `overwrite`.
    """
    outtype = check_outtype(outtype)
    output = check_output_path(path, overwrite)
    gguf = require_gguf()
    layout = plan_gguf_export(model)
    vocabulary = build_vocabulary(gguf, tokenizer, model, layout.vocab_rows)
    if layout.per_layer:
        logger.info(
            "layers of different widths: writing llama.cpp architecture %r with per-layer widths", layout.architecture
        )

    writer = gguf.GGUFWriter(None, layout.architecture)
    writer.add_type("model")
    writer.add_name(name or _default_name(model))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hyperparameters(gguf, writer, model, layout)
    for key, value, vtype, sub_type in vocabulary.entries:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if vocabulary.special is not None:
        vocabulary.special.add_to_gguf(writer, quiet=True)
    count = 0
    with torch.no_grad():
        for tensor_name, tensor in _named_tensors(model, layout):
            array, raw_dtype = _encode(gguf, tensor_name, tensor, outtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
            count += 1

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    temporary = _sibling_temp_file(parent)
    try:
        writer.write_header_to_file(path=Path(temporary))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, output)
    except BaseException:
        writer.close()
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    info = GGUFExportInfo(
        path=output,
        architecture=layout.architecture,
        outtype=outtype,
        num_tensors=count,
        file_bytes=os.path.getsize(output),
        per_layer_widths=layout.per_layer,
    )
    logger.info(
        "wrote %s (%s, %s, %d tensors, %.1f MiB)", output, info.architecture, outtype, count, info.file_bytes / 2**20
    )
    return info


def _read_config(source: str) -> Any:
    from transformers import AutoConfig

    location, gguf_kwargs = split_gguf(source)
    return AutoConfig.from_pretrained(location, **gguf_kwargs)


def export_gguf_from_pretrained(
    model: str | None,
    path: str | os.PathLike,
    outtype: str = "f16",
    *,
    dtype: str | torch.dtype | None = "float32",
    name: str | None = None,
    overwrite: bool = False,
) -> GGUFExportInfo:
    """Load `model` (a Hub id, a local directory of any checkpoint kind the CLI reads, a .gguf file, or None
    for SmolLM2) and write it as GGUF at `path`.

    The out type, the output path and the architecture (from the config alone) are checked before the
    weights load. A .gguf source keeps its own tokenizer metadata.
    """
    outtype = check_outtype(outtype)
    check_output_path(path, overwrite)
    require_gguf()
    check_model_reference(model)
    source = model or default_model_path()
    check_architecture(_read_config(source))
    from optimum_sparse.auto_loading import load_model_and_tokenizer

    loaded, tokenizer = load_model_and_tokenizer(source, dtype)
    tokenizer_source = source if source.endswith(".gguf") else tokenizer
    if name is None and source.endswith(".gguf"):
        name = os.path.splitext(os.path.basename(source))[0]
    return export_gguf(loaded, tokenizer_source, path, outtype, name=name, overwrite=overwrite)
