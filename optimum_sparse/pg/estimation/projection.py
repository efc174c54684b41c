"""Keeping keep-probabilities on the sparsity budget, and turning them into hard masks.

Budget: sum_i c_i s_i = B with 0 <= s_i <= 1, where c_i is the parameter cost of unit i (1 for a
weight; for a channel or head, the number of weights it owns) and B = (1 - sparsity) * sum_i c_i,
i.e. the expected number of kept parameters.

`project_to_budget` is the projection in the cost-weighted metric sum_i c_i (x_i - s_i)^2 (every
parameter counts alike): by the KKT conditions the solution is x_i = clip(s_i - tau, 0, 1) for one
shift tau, found by safeguarded Newton steps since the kept mass is monotone and piecewise linear in
tau (the shift-and-clip projection of the design notes; with unit costs it is the Euclidean
projection). `sigmoid_to_budget` finds the logit shift that puts sigmoid(z + tau) on the budget
(Wanda-style initialisation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def budget_of(costs: torch.Tensor, sparsity: float) -> float:
    """Kept-parameter budget (1 - sparsity) * sum(costs)."""
    return (1.0 - sparsity) * float(costs.double().sum())


def _bisect(mass: Callable[[float], float], target: float, low: float, high: float, iterations: int) -> float:
    """tau in [low, high] with mass(tau) = target for a non-increasing `mass`."""
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if mass(mid) > target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _check_budget(costs: torch.Tensor, budget: float) -> float:
    total = float(costs.double().sum())
    if not -1e-9 * max(total, 1.0) <= budget <= total * (1 + 1e-12) + 1e-9:
        raise ValueError(f"budget {budget} is outside [0, {total}] (the total cost of the units)")
    return total


@torch.no_grad()
def project_to_budget(scores: torch.Tensor, costs: torch.Tensor, budget: float, iterations: int = 100) -> torch.Tensor:
    """clip(s - tau, 0, 1) with tau chosen so that sum(costs * result) = budget (to float64 precision).

    The kept mass is piecewise linear in tau, so Newton steps (slope = minus the cost of the units
    strictly inside (0, 1)) land on the root in a few evaluations; they start from tau = 0, which is
    the answer for scores already on the budget and close to it after one optimizer step. A step that
    leaves the bracket, or a flat piece, falls back to bisection. Millions of units (per-weight masks)
    then cost a handful of passes instead of a hundred.
    """
    total = _check_budget(costs, budget)
    s = scores.detach().double().reshape(-1)
    c = costs.detach().double().reshape(-1).to(s.device)
    low, high = float(s.min()) - 1.0, float(s.max())  # mass(low) = total >= budget >= 0 = mass(high)
    tolerance = 1e-12 * max(total, 1.0)
    tau = min(max(0.0, low), high)
    for _ in range(iterations):
        shifted = s - tau
        inside = (shifted > 0.0) & (shifted < 1.0)
        gap = float((c * shifted.clamp(0.0, 1.0)).sum()) - budget
        if abs(gap) <= tolerance:
            break
        if gap > 0:
            low = tau
        else:
            high = tau
        slope = float(c[inside].sum())
        step = tau + gap / slope if slope > 0 else None
        tau = step if step is not None and low < step < high else 0.5 * (low + high)
    return (s - tau).clamp(0.0, 1.0).to(scores.dtype).reshape(scores.shape)


@torch.no_grad()
def sigmoid_to_budget(logits: torch.Tensor, costs: torch.Tensor, budget: float, iterations: int = 100) -> torch.Tensor:
    """sigmoid(z + tau) with tau chosen so that sum(costs * result) = budget."""
    total = _check_budget(costs, budget)
    z = logits.detach().double().reshape(-1)
    c = costs.detach().double().reshape(-1).to(z.device)
    if budget <= 0.0:
        return torch.zeros_like(logits)
    if budget >= total:
        return torch.ones_like(logits)

    def mass(neg_tau: float) -> float:  # non-increasing in neg_tau
        return float((c * torch.sigmoid(z - neg_tau)).sum())

    span = float(z.abs().max()) + 60.0
    neg_tau = _bisect(mass, budget, -span, span, iterations)
    return torch.sigmoid(z - neg_tau).to(logits.dtype).reshape(logits.shape)


def zscore(values: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, with std floored so that constant inputs map to zeros."""
    x = values.double()
    return ((x - x.mean()) / x.std(unbiased=False).clamp_min(1e-12)).to(values.dtype)


@torch.no_grad()
def harden_to_budget(
    scores: torch.Tensor, costs: torch.Tensor, budget: float, required: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep units in decreasing order of score while their total cost fits in `budget`.

    Greedy: a unit that does not fit is skipped and smaller ones further down may still be added, so
    the kept cost is within one unit's cost of the budget. Units flagged in `required` are kept first
    (e.g. one attention group per layer, so that no layer loses all of its heads).
    """
    s = scores.detach().reshape(-1).cpu()
    c = costs.detach().double().reshape(-1).cpu()
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    if required is None and s.numel() and bool((c == c[0]).all()) and float(c[0]) > 0:  # equal costs: top-k
        k = min(s.numel(), int(budget * (1 + 1e-12) // float(c[0])))
        keep[torch.argsort(s, descending=True, stable=True)[:k]] = True
        return keep.to(scores.device).reshape(scores.shape)
    spent = 0.0
    order = torch.argsort(s, descending=True, stable=True).tolist()
    if required is not None:
        req = required.reshape(-1).cpu()
        keep |= req
        spent = float(c[req].sum())
    for index in order:
        if keep[index]:
            continue
        cost = float(c[index])
        if spent + cost <= budget * (1 + 1e-12):
            keep[index] = True
            spent += cost
    return keep.to(scores.device).reshape(scores.shape)


@torch.no_grad()
def harden_per_group(
    scores: torch.Tensor,
    costs: torch.Tensor,
    sparsity: float,
    groups: Sequence[slice],
    required: torch.Tensor | None = None,
) -> torch.Tensor:
    """`harden_to_budget` within each slice of units, each at the same sparsity (per-layer hardening)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat_s, flat_c = scores.reshape(-1), costs.reshape(-1)
    flat_r = required.reshape(-1) if required is not None else None
    for group in groups:
        c = flat_c[group]
        keep[group] = harden_to_budget(
            flat_s[group], c, budget_of(c, sparsity), None if flat_r is None else flat_r[group]
        )
    return keep.reshape(scores.shape)
