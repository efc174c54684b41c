"""Putting one sampled mask into the model, and taking it out again.

masking (channel masks by forward hooks, per-weight masks written into the weights; `sample_digest`,
the cache key of a sample), instances (channel sub-models sliced once and swapped in while stale),
semi_structured (2:4 sub-models as compressed sparse weights on CUDA).

Stale sub-models are reused for several steps, so how a sub-model is instantiated is its own concern.
This layer knows the model's layers and `optimum_sparse.structured` (slicing), but not the scores or
the estimator: a mask space (`pg.spaces`) decides which sample to activate.
"""
