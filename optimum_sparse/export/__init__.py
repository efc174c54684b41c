"""Exporting models to formats other runtimes read: `optimum_sparse.export.gguf` (llama.cpp's GGUF)."""
