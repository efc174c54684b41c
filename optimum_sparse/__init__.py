"""optimum-sparse: prune Hugging Face LLMs (magnitude, Wanda, SparseGPT, ADMM, SparseLLM, learned masks)."""

from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import perplexity, sparsity_report
from optimum_sparse.refit import refit_weights
from optimum_sparse.sequential import PruningResult, prune
from optimum_sparse.solvers import available_methods, register_solver

__version__ = "0.1.0"

__all__ = [
    "PruningResult",
    "SparsityConfig",
    "__version__",
    "available_methods",
    "perplexity",
    "prune",
    "refit_weights",
    "register_solver",
    "sparsity_report",
]
