"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

Columns are processed left to right. When column j is pruned, the error it makes is spread over the
not-yet-processed columns through the inverse Hessian's Cholesky factor, so the remaining weights
compensate. The mask is chosen adaptively per block of `block_size` columns from the OBS saliency
w^2 / [H^-1]_jj^2 (per N:M group for N:M), and updates are applied lazily block by block, which keeps
the cost at one Cholesky factorisation plus O(rows * cols^2) work per layer.
"""

from __future__ import annotations

import logging

import torch

from optimum_sparse.masks import nm_mask, num_pruned, topk_mask
from optimum_sparse.options import Option, positive_int
from optimum_sparse.registry import register_solver
from optimum_sparse.solvers.base import (
    DAMPENING,
    FLOAT64_MAX_FEATURES,
    LayerResult,
    LayerStatistics,
    Solver,
    dampened_hessian,
)

logger = logging.getLogger(__name__)


def inverse_cholesky_upper(hessian: torch.Tensor, weight: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp)^-1, computed in float64 (float32 above FLOAT64_MAX_FEATURES).

    If the factorisation fails (H ill-conditioned, e.g. too few calibration tokens), dampening is
    raised tenfold and retried, with a log line, rather than letting NaNs into the weights.

    The three steps run in place on one matrix: on a 7B model's 11008-wide down_proj a factor, its
    inverse and the inverse's factor as separate float64 matrices held about 3 GB more than one.
    """
    damp = dampening
    info = torch.empty((), dtype=torch.int32, device=hessian.device)
    dtype = torch.float64 if hessian.shape[0] <= FLOAT64_MAX_FEATURES else torch.float32
    for _ in range(8):
        h = dampened_hessian(hessian, weight, damp).to(dtype)  # a float32 copy is freed at once
        torch.linalg.cholesky_ex(h, out=(h, info))
        if info == 0:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if info == 0 and torch.isfinite(h).all():
                return h.float()
        del h
        logger.warning("Hessian not positive definite with dampening %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    raise RuntimeError("Cholesky factorisation failed even with heavy dampening; check the calibration data")


@register_solver("sparsegpt")
class SparseGPTSolver(Solver):
    requires_hessian = True
    default_scope = "layer"  # the mask is chosen over each whole column block, all rows together
    options = (
        DAMPENING,
        Option(
            "block_size",
            128,
            "column block width of the lazy updates (rounded down to a multiple of M)",
            positive_int(),
        ),
    )

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        assert stats is not None and stats.hessian is not None, "sparsegpt needs the input Hessian"
        cfg = self.config
        w = weight
        rows, cols = w.shape
        hinv = inverse_cholesky_upper(stats.hessian.to(w.device), w, self.dampening)
        mask = torch.zeros_like(w, dtype=torch.bool)
        nm = cfg.nm
        # N:M groups must not straddle two column blocks: round the block width down to a multiple of M
        block_size = max(cfg.block_size - cfg.block_size % nm[1], nm[1]) if nm else cfg.block_size
        for start in range(0, cols, block_size):
            end = min(start + block_size, cols)
            block = w[:, start:end].clone()
            hblock = hinv[start:end, start:end]
            diag = torch.diag(hblock)
            errors = torch.zeros_like(block)
            if nm is None:
                saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
                # per-block quota chosen so that the blocks add up to exactly round(numel * sparsity) per layer
                # (or per row): rounding every block separately would drift by up to half a weight per block
                width = rows if self.scope == "layer" else 1
                quota = num_pruned(width * end, cfg.sparsity) - num_pruned(width * start, cfg.sparsity)
                mask[:, start:end] = topk_mask(saliency, quota / (width * (end - start)), self.scope)
            for i in range(end - start):
                if nm is not None and i % nm[1] == 0:
                    group = slice(i, i + nm[1])
                    saliency = block[:, group].pow(2) / diag[group].pow(2).unsqueeze(0)
                    mask[:, start + i : start + i + nm[1]] = nm_mask(saliency, *nm)
                column = block[:, i]
                pruned = torch.where(mask[:, start + i], column, torch.zeros_like(column))
                error = (column - pruned) / diag[i]
                block[:, i:].sub_(error.unsqueeze(1) * hblock[i, i:].unsqueeze(0))
                block[:, i] = pruned
                errors[:, i] = error
            w[:, start:end] = block
            w[:, end:].sub_(errors @ hinv[start:end, end:])
        w.mul_(mask)
        return LayerResult(w, mask)
