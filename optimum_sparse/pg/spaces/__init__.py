"""Mask spaces: one per sparsity pattern, tying scores, a mask distribution, sub-models and a budget together.

space (`MaskSpace`, the interface the learner talks to), channel_space ("channels": MLP channels and
attention KV groups), weight_space ("unstructured" and "N:M"), wanda_init (the calibration pass and
Wanda metric that give a space its initial scores).

Built on `pg.estimation` (distributions, budget projection) and `pg.submodels` (instantiating a
sample); the learner (`pg.learner`) and the block objective only see the `MaskSpace` interface.
"""
