"""optimum-sparse: prune Hugging Face LLMs (magnitude, Wanda, SparseGPT, ADMM, SparseLLM, learned masks)."""

from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import perplexity, sparsity_report
from optimum_sparse.lazy import lazy_exports
from optimum_sparse.pg import solver as _pg_solver  # noqa: F401  registers method "pg"
from optimum_sparse.refit import refit_weights
from optimum_sparse.sequential import PruningResult, prune
from optimum_sparse.solvers import available_methods, register_solver
from optimum_sparse.version import __version__

# imported on first use: they pull in transformers' Trainer utilities (and PEFT when installed)
_LAZY = {
    "SparseModel": "optimum_sparse.modeling",
    "SparseFineTuneCallback": "optimum_sparse.callbacks",
    "SparsityCallback": "optimum_sparse.pg.trainer.callback",
    "merge_and_mask": "optimum_sparse.peft_utils",
    "load_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
    "save_sliced_model": "optimum_sparse.structured.sliced_checkpoint",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

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
