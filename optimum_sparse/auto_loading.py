"""`load_model_and_tokenizer`: any model reference the CLI accepts, whichever kind of checkpoint it is.

Plain transformers checkpoints, Hub ids and GGUF files load with transformers; the library's own
compact (`SparseModel`) and channel-sliced checkpoints cannot, so this dispatch sits above both
`optimum_sparse.modeling` and the sliced-checkpoint loader, leaving `optimum_sparse.loading` free of them.
"""

from __future__ import annotations

import logging
import os

import torch

from optimum_sparse.loading import (
    check_model_reference,
    default_model_path,
    forget_gguf_quantizer,
    resolve_dtype,
    split_gguf,
)

logger = logging.getLogger(__name__)


def load_model_and_tokenizer(model: str | None = None, dtype: str | torch.dtype | None = "float32", **kwargs):
    """(model, tokenizer) from a Hub id, a local directory (compact and sliced checkpoints too), a .gguf file,
    or SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_reference(model)
    source = model or default_model_path()
    if os.path.isfile(os.path.join(source, "sparsity_config.json")):
        # imported here: loading a plain model should not pay for SparseModel
        from optimum_sparse.modeling import SparseModel, is_compact_checkpoint

        if is_compact_checkpoint(source):  # kept values + bitmasks: transformers alone cannot read it
            logger.info("loading the compact checkpoint %s with SparseModel", source)
            sparse = SparseModel.from_pretrained(source, dtype=resolve_dtype(dtype), **kwargs)
            tokenizer = sparse.tokenizer if sparse.tokenizer is not None else AutoTokenizer.from_pretrained(source)
            return sparse.model, tokenizer
    from optimum_sparse.structured.sliced_checkpoint import is_sliced_checkpoint, load_sliced_model

    if is_sliced_checkpoint(source):  # layers of different widths: transformers alone cannot read it
        logger.info("loading the sliced checkpoint %s", source)
        return load_sliced_model(source, dtype=resolve_dtype(dtype)), AutoTokenizer.from_pretrained(source)
    path, extra = split_gguf(source)
    extra.update(kwargs)
    logger.info("loading %s", source)
    tokenizer = AutoTokenizer.from_pretrained(path, **{k: v for k, v in extra.items() if k == "gguf_file"})
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **extra)
    forget_gguf_quantizer(loaded)
    loaded.eval()
    return loaded, tokenizer
