"""optimum-sparse: prune Hugging Face LLMs (magnitude, Wanda, SparseGPT, ADMM, SparseLLM, learned masks)."""

from optimum_sparse.config import SparsityConfig
from optimum_sparse.solvers import available_methods, register_solver

__version__ = "0.1.0"

__all__ = ["SparsityConfig", "__version__", "available_methods", "register_solver"]
