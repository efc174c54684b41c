"""Former home of `optimum_sparse.structured.sliced_checkpoint`, kept only while `loading.py` imports from here.

`load_model_and_tokenizer` still imports `is_sliced_checkpoint` and `load_sliced_model` from this path;
once that import names `optimum_sparse.structured.sliced_checkpoint`, delete this module.
"""

from optimum_sparse.structured.sliced_checkpoint import is_sliced_checkpoint, load_sliced_model

__all__ = ["is_sliced_checkpoint", "load_sliced_model"]
