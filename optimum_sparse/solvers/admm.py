"""ADMM weight update with gradual mask selection (Boža 2024, "Fast and Effective Weight Update for
Pruned Large Language Models", arXiv 2401.02938).

For a layer with weight W (out x in) and calibration inputs X, pruning to a mask M asks for

    min_{W'}  ||X W^T - X W'^T||^2   subject to  W' = 0 outside M,

a least-squares problem whose only data is H = X^T X. The paper splits it, ADMM style, into a
quadratic part (a linear solve with the fixed matrix H + rho I, factorised once per layer) and a
projection onto the mask, tied together by a scaled dual variable U:

    Z <- proj_M(W + U)                                  (zero everything outside the mask)
    U <- U + W - Z                                      (dual ascent)
    W <- (H W_orig + rho (Z - U)) (H + rho I)^-1        (one matrix product per iteration)

Every iteration costs one (out x in) @ (in x in) product, so a few tens of iterations stay cheap
next to SparseGPT's column-by-column sweep. As in the paper, the inputs are first rescaled so that
diag(H) = 1 (W_j <- W_j sqrt(H_jj)); the penalty rho and the dampening then mean the same thing for
every layer, and |W| of the rescaled weight is the Wanda-like saliency |W_ij| ||X_j||.

Gradual pruning (the paper's mask selection): the target sparsity is reached on a cubic schedule
s_t = s (1 - (1 - t / T)^3) over the first T iterations, and each time the mask is re-chosen from
|W + U|, i.e. from weights that the ADMM iterations have already started to adapt to the pruning.

This implementation adds a short conjugate-gradient polish on the final support (exact least
squares per row, all rows at once), which removes what is left of the ADMM error for little cost,
and a weight-update-only mode (`AdmmSolver.refit_layer`, `admm_refit`) that refits the kept weights
of a mask chosen by any method and never returns something worse than the masked original.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import nm_mask, num_pruned, topk_mask
from optimum_sparse.solvers import register_solver
from optimum_sparse.solvers.base import LayerResult, LayerStatistics, Solver

logger = logging.getLogger(__name__)

#: factorise in float64 up to this many input features, in float32 above (memory / speed)
FLOAT64_MAX_FEATURES = 8192
#: inputs whose normalised correlation is at least 1 - this are treated as duplicates
_COLLINEAR_TOL = 1e-4
#: diag(H) below this fraction of the mean is floored there before normalising (keeps 1/scale bounded)
_SCALE_FLOOR = 1e-6
#: sample sizes for the approximate thresholds of intermediate gradual masks
_SAMPLE_PER_ROW = 128
PCG = False
_SAMPLE_PER_LAYER = 1 << 16


@dataclass
class _Problem:
    """The layer problem in normalised coordinates (diag of the Hessian = 1 on live inputs)."""

    hessian: torch.Tensor  # (in, in) float32, normalised, zero rows/columns for dead inputs
    scale: torch.Tensor  # (in,) float32: W_normalised = W * scale
    dead: torch.Tensor  # (in,) bool: inputs that never fired during calibration
    dampening: float  # added to the normalised diagonal (after any automatic increase)


def _normalise(hessian: torch.Tensor, num_tokens: int, dampening: float) -> _Problem:
    """Rescale H to unit diagonal, find dead inputs and decide the dampening (warning when raised)."""
    h = hessian.to(torch.float32)
    if not torch.isfinite(h).all():
        raise ValueError("the input Hessian has non-finite entries; the calibration activations overflowed")
    cols = h.shape[0]
    diag = h.diagonal().clone()
    dead = diag <= 0
    live = int(cols - dead.sum())
    if live == 0:
        logger.warning("no calibration input reached this layer (H = 0); ADMM falls back to the weights' magnitude")
        return _Problem(torch.zeros_like(h), torch.ones_like(diag), dead, dampening)
    floor = _SCALE_FLOOR * float(diag[~dead].mean())
    scale = torch.where(dead, torch.ones_like(diag), diag.clamp_min(floor).sqrt())
    normalised = h / scale.unsqueeze(0) / scale.unsqueeze(1)
    normalised[dead, :] = 0.0
    normalised[:, dead] = 0.0
    if bool(dead.any()):
        logger.warning(
            "%d of %d inputs never fired during calibration (zero Hessian diagonal): their weights carry no "
            "signal, are pruned first and otherwise left as they were",
            cols - live,
            cols,
        )
    reasons = []
    if 0 < num_tokens < live:
        reasons.append(f"only {num_tokens} calibration tokens for {live} active inputs")
    off = normalised.abs()
    off.fill_diagonal_(0.0)
    duplicated = int((off.amax(0) >= 1.0 - _COLLINEAR_TOL).sum())
    if duplicated:
        reasons.append(f"{duplicated} inputs duplicate another input (correlation ~ +-1)")
    if reasons:
        raised = dampening * 10
        logger.warning(
            "rank-deficient input Hessian (%s): raising the dampening from %.3g to %.3g",
            "; ".join(reasons),
            dampening,
            raised,
        )
        dampening = raised
    return _Problem(normalised, scale, dead, dampening)


def _add_diagonal(matrix: torch.Tensor, value: float) -> torch.Tensor:
    out = matrix.clone()
    out.diagonal().add_(value)
    return out


def _admm_inverse(problem: _Problem, rho: float) -> torch.Tensor:
    """(H_n + damp I + rho I)^-1, the matrix of every ADMM weight update.

    The Cholesky factorisation runs in float64 up to FLOAT64_MAX_FEATURES inputs. Should it fail
    (numerically indefinite H), the dampening is raised tenfold with a warning and retried.
    """
    cols = problem.hessian.shape[0]
    dtype = torch.float64 if cols <= FLOAT64_MAX_FEATURES else torch.float32
    base = problem.hessian.to(dtype)
    for _ in range(8):
        matrix = _add_diagonal(base, problem.dampening + rho)
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            if bool(torch.isfinite(inverse).all()):
                return inverse.to(torch.float32)
        raised = problem.dampening * 10
        logger.warning(
            "ADMM factorisation failed with dampening %.3g (ill-conditioned Hessian); retrying with %.3g",
            problem.dampening,
            raised,
        )
        problem.dampening = raised
    raise RuntimeError("ADMM factorisation failed even with heavy dampening; check the calibration data")


def _exact_top(scores: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Top-k keep-mask with exactly the counts of `masks.topk_mask`, via a k-th value threshold.

    `kthvalue` is about twice as fast as `topk` on CPU; ties at the threshold (rare with real-valued
    scores) fall back to `topk_mask`, so the counts are always exact.
    """
    if scope == "row":
        k = num_pruned(scores.shape[1], sparsity)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        mask = scores > scores.kthvalue(k, dim=1, keepdim=True).values
        if bool((mask.sum(1) == scores.shape[1] - k).all()):
            return mask
    else:
        k = num_pruned(scores.numel(), sparsity)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        mask = scores > scores.flatten().kthvalue(k).values
        if int(mask.sum()) == scores.numel() - k:
            return mask
    return topk_mask(scores, sparsity, scope)


def _approx_top(scores: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Keep-mask at roughly `sparsity`, thresholded on an evenly strided sample of the scores.

    Only used for the intermediate masks of the gradual schedule, where the exact count does not
    matter; it is 4-8x cheaper than an exact selection on wide layers. The stride is odd so that
    the sample does not pick the same slot of every N:M group.
    """
    if scope == "row":
        stride = max(1, scores.shape[1] // _SAMPLE_PER_ROW) | 1  # odd: visits every slot of N:M groups
        sample = scores[:, ::stride]
        k = num_pruned(sample.shape[1], sparsity)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        return scores > sample.kthvalue(k, dim=1, keepdim=True).values
    flat = scores.flatten()
    sample = flat[:: max(1, flat.numel() // _SAMPLE_PER_LAYER) | 1]
    k = num_pruned(sample.numel(), sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores > sample.kthvalue(k).values


def _nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """`masks.nm_mask` (keep the n largest of every m consecutive scores), computed faster on CPU.

    The m members of all groups are laid out as m contiguous vectors, and n bubble passes of
    elementwise min/max bring the n-th largest of every group into place; that is the threshold.
    Ties at the threshold fall back to `nm_mask` to keep exactly n per group.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({cols}) to be divisible by {m}")
    groups = scores.reshape(-1, m)
    members = list(groups.t().contiguous().unbind(0))
    for finished in range(n):
        for j in range(m - 1 - finished):
            low, high = torch.minimum(members[j], members[j + 1]), torch.maximum(members[j], members[j + 1])
            members[j], members[j + 1] = low, high
    keep = groups >= members[m - n].unsqueeze(1)
    if int(keep.sum()) == groups.shape[0] * n:  # a group never keeps fewer than n, so totals suffice
        return keep.reshape(rows, cols)
    return nm_mask(scores, n, m)


def _select(
    scores: torch.Tensor, sparsity: float, target: float, nm: tuple[int, int] | None, scope: str
) -> torch.Tensor:
    """Keep-mask at `sparsity` on the way to the final pattern (at `target`, exact).

    Unstructured: top-k per row / layer. N:M: entries that the N:M rule keeps are never pruned, and
    the remaining `sparsity` of all weights is taken from the others by score, so that at
    `sparsity == target` the mask is exactly the N:M mask.
    """
    final = sparsity >= target
    if nm is None:
        return _exact_top(scores, target, scope) if final else _approx_top(scores, sparsity, scope)
    keep = _nm_keep(scores, *nm)
    if final:
        return keep
    boosted = torch.where(keep, torch.full_like(scores, float("inf")), scores)
    return _approx_top(boosted, sparsity, scope) | keep  # `| keep`: a sampled threshold may be inf


def _rank_dead_last(scores: torch.Tensor, weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Dead inputs score below every live one (and among themselves by magnitude)."""
    if not bool(dead.any()):
        return scores
    return torch.where(dead.unsqueeze(0), -1.0 / (1.0 + weight.abs()), scores)


def _cg_polish(
    weight: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, problem: _Problem, steps: int
) -> torch.Tensor:
    """Conjugate gradients on the fixed support, all rows at once (each row is its own system).

    Minimises (w - w0) A (w - w0)^T, A = H_n + damp I, for every row w over the vectors that are
    zero outside the row's mask, warm-started from `weight`. One (out x in) @ (in x in) product per
    step plus one for the starting residual.
    """
    maskf = mask.to(weight.dtype)
    w = weight * maskf
    residual = _apply(original - w, problem) * maskf
    direction = residual.clone()
    rs = (residual * residual).sum(1, keepdim=True)
    tiny = torch.finfo(weight.dtype).tiny
    for _ in range(steps):
        curved = _apply(direction, problem) * maskf
        curvature = (direction * curved).sum(1, keepdim=True)
        alpha = torch.where(curvature > tiny, rs / curvature.clamp_min(tiny), torch.zeros_like(rs))
        w.addcmul_(alpha, direction)
        residual.addcmul_(alpha, curved, value=-1.0)
        rs_new = (residual * residual).sum(1, keepdim=True)
        beta = torch.where(rs > tiny, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        direction = residual.addcmul(beta, direction)
        rs = rs_new
    return w


def _pcg_polish(weight, original, mask, problem, inverse, steps):
    maskf = mask.to(weight.dtype)
    w = weight * maskf
    residual = _apply(original - w, problem) * maskf
    pre = (residual @ inverse) * maskf
    direction = pre.clone()
    rz = (residual * pre).sum(1, keepdim=True)
    tiny = torch.finfo(weight.dtype).tiny
    for _ in range(steps):
        curved = _apply(direction, problem) * maskf
        curvature = (direction * curved).sum(1, keepdim=True)
        alpha = torch.where(curvature > tiny, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        w.addcmul_(alpha, direction)
        residual.addcmul_(alpha, curved, value=-1.0)
        pre = (residual @ inverse) * maskf
        rz_new = (residual * pre).sum(1, keepdim=True)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        direction = pre.addcmul(beta, direction)
        rz = rz_new
    return w


def _apply(rows: torch.Tensor, problem: _Problem) -> torch.Tensor:
    """rows @ (H_n + damp I)."""
    return torch.addmm(rows, rows, problem.hessian, beta=problem.dampening)


def _error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(delta H delta^T): the reconstruction error ||X delta^T||^2 (up to the token count)."""
    return float(((delta @ hessian) * delta).sum())


def _run_admm(
    wn: torch.Tensor,
    problem: _Problem,
    config: SparsityConfig,
    scope: str,
    mask: torch.Tensor | None = None,
    init_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM in normalised coordinates, then the CG polish.

    With `mask` the support stays fixed; otherwise it is chosen from `init_scores` (once, or on the
    gradual schedule, re-chosen from |W + U| at every step). Returns (weight zero outside mask, mask).
    """
    rho = config.admm_rho
    inverse = _admm_inverse(problem, rho)
    nm = config.nm
    goal = config.sparsity
    iterations = config.admm_iterations
    ramp = 0
    if mask is None:
        if config.gradual:
            ramp = min(config.admm_gradual_steps, iterations)
        else:
            mask = _select(init_scores, goal, goal, nm, scope)
    shifted = wn.clone()  # W + U; W starts at the original weights and U at zero
    for step in range(iterations):
        if step < ramp:
            level = goal * (1.0 - (1.0 - (step + 1) / ramp) ** 3)
            scores = init_scores if step == 0 else _rank_dead_last(shifted.abs(), wn, problem.dead)
            mask = _select(scores, level, goal, nm, scope)
        z = shifted * mask  # Z = proj_M(W + U)
        u = shifted.sub_(z)  # U <- U + W - Z  (reuses the W + U buffer)
        # W = (A + rho I)^-1 (A W0 + rho (Z - U)) = W0 + rho (Z - U - W0) (A + rho I)^-1
        w = torch.addmm(wn, (z - u).sub_(wn), inverse, alpha=rho)
        shifted = w.add_(u)
    z = shifted * mask
    if config.admm_cg_steps:
        if PCG:
            z = _pcg_polish(z, wn, mask, problem, inverse, config.admm_cg_steps)
        else:
            z = _cg_polish(z, wn, mask, problem, config.admm_cg_steps)
    return z * mask, mask


@register_solver("admm")
class AdmmSolver(Solver):
    """ADMM pruning (Boža 2024, arXiv 2401.02938): gradual mask selection + ADMM weight update.

    Config fields read: sparsity / pattern, mask_scope (default "row"), dampening, admm_iterations,
    admm_rho, admm_gradual_steps, admm_cg_steps, gradual, mask_init. See docs/admm.md.
    """

    requires_hessian = True
    default_scope = "row"

    def _problem(self, stats: LayerStatistics | None, device: torch.device) -> _Problem:
        if stats is None or stats.hessian is None:
            raise ValueError("admm needs the input Hessian (LayerStatistics(with_hessian=True))")
        return _normalise(stats.hessian.to(device), stats.num_tokens, self.config.dampening)

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        problem = self._problem(stats, weight.device)
        w = weight.to(torch.float32)
        wn = w * problem.scale.unsqueeze(0)
        if self.config.mask_init == "wanda":
            scores = w.abs() * stats.norms.to(w.device).unsqueeze(0)
        else:
            scores = wn.abs()
        if bool(problem.dead.all()):
            mask = _select(w.abs(), self.config.sparsity, self.config.sparsity, self.config.nm, self.scope)
            return LayerResult(w * mask, mask)
        scores = _rank_dead_last(scores, w, problem.dead)
        zn, mask = _run_admm(wn, problem, self.config, self.scope, init_scores=scores)
        out = zn / problem.scale.unsqueeze(0)
        return LayerResult(_finite_or_masked(out, w, mask), mask)

    def refit_layer(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        problem = self._problem(stats, weight.device)
        mask = mask.to(device=weight.device, dtype=torch.bool)
        w = weight.to(torch.float32)
        return LayerResult(_refit(w, mask, problem, self.config, self.scope), mask)


def _finite_or_masked(candidate: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if bool(torch.isfinite(candidate).all()):
        return candidate * mask
    logger.warning("ADMM produced non-finite weights; keeping the masked original weights instead")
    return weight * mask


def _refit(w: torch.Tensor, mask: torch.Tensor, problem: _Problem, config: SparsityConfig, scope: str):
    masked = w * mask
    if bool(problem.dead.all()):
        return masked
    scale = problem.scale.unsqueeze(0)
    wn = w * scale
    zn, _ = _run_admm(wn, problem, config, scope, mask=mask)
    refit = _finite_or_masked(zn / scale, w, mask)
    # guard: never worse than simply applying the mask to the original weights
    before = _error(wn * mask - wn, problem.hessian)
    after = _error(refit * scale - wn, problem.hessian)
    if after <= before:
        return refit
    logger.warning("ADMM refit did not reduce the error (%.4g vs %.4g); keeping the masked weights", after, before)
    return masked


def admm_refit(
    weight: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    config: SparsityConfig,
    num_tokens: int = 0,
) -> torch.Tensor:
    """Refit the kept weights of `weight` (out x in) on the fixed keep-`mask` by ADMM.

    `hessian` is X^T X (any positive scale); `num_tokens`, when known, lets rank deficiency be
    detected. Returns a float32 weight, zero outside `mask`, whose reconstruction error is never
    above that of `weight * mask`.
    """
    problem = _normalise(hessian.to(weight.device), num_tokens, config.dampening)
    mask = mask.to(device=weight.device, dtype=torch.bool)
    return _refit(weight.to(torch.float32), mask, problem, config, config.mask_scope or "row")
