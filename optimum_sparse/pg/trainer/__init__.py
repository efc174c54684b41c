"""Mask learning inside a `transformers.Trainer`: `SparsityCallback` and what it needs from the Trainer.

callback (`SparsityCallback`, `build_space`), wiring (freezing the model, attaching the scores,
the surrogate forward, the dense state dict), distributed (ranks and the cross-rank average of the
initial scores), checkpointing (the learner's state in the Trainer's checkpoint folders).

The top layer of `optimum_sparse.pg` and the only one that imports transformers' Trainer machinery;
nothing else in the package imports it (`pg/__init__.py` resolves `SparsityCallback` lazily), so the
block objective inside `prune()` and the lower layers load without it.
"""
