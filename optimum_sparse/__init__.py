"""optimum-sparse: prune Hugging Face LLMs (magnitude, Wanda, SparseGPT, ADMM, SparseLLM, learned masks)."""

from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import perplexity, sparsity_report

# mask learning registers method "pg" (its Trainer callback stays lazy, below)
from optimum_sparse.pg import solver as _pg_solver  # noqa: E402,F401,I001
from optimum_sparse.refit import refit_weights
from optimum_sparse.sequential import PruningResult, prune
from optimum_sparse.solvers import available_methods, register_solver

__version__ = "0.1.0"

# imported on first use: they pull in transformers' Trainer utilities (and PEFT when installed)
_LAZY = {
    "SparseModel": "optimum_sparse.modeling",
    "SparseFineTuneCallback": "optimum_sparse.callbacks",
    "SparsityCallback": "optimum_sparse.pg.trainer.callback",
    "merge_and_mask": "optimum_sparse.peft_utils",
    "load_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
    "save_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimum_sparse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "PruningResult",
    "SparseFineTuneCallback",
    "SparseModel",
    "SparsityCallback",
    "SparsityConfig",
    "__version__",
    "available_methods",
    "load_sliced_model",
    "merge_and_mask",
    "perplexity",
    "prune",
    "refit_weights",
    "register_solver",
    "save_sliced_model",
    "sparsity_report",
]
