"""SparseLLM: joint pruning of each block's MLP through auxiliary variables (Bai et al. 2024, "SparseLLM:
Towards Global Pruning of Pre-trained Language Models", arXiv 2402.17946).

Layer-wise methods (SparseGPT, ADMM) prune every linear to reproduce its own dense output, so the
errors of an MLP's first and second layer add up. SparseLLM couples the two layers of each MLP
through auxiliary variables and prunes them against the MLP's dense output. With the MLP input X
(tokens x d), the first layer W1 (fc1 / up), its pre-activation z, the activation output p, the
second layer W2 (fc2 / down) and the dense MLP output Y, it minimises over sparse W1, W2 and free z, p

    alpha ||X W1^T - z||^2  +  gamma ||p - act(z)||^2  +  beta ||p W2^T - Y||^2

by alternating exact (or nearly exact) minimisations over one group of variables at a time:

- W1 (and W2): a least-squares fit of the layer to its new target z (resp. Y from inputs p) is the
  dense weight W* = argmin ||A W^T - B||^2; pruning W* with the inner solver (SparseGPT or ADMM) on
  the Hessian of A then minimises ||A W'^T - B||^2 over sparse W', because that error equals
  ||A (W' - W*)^T||^2 plus a constant. The fit is ridge-regularised towards the dense weights
  (W* = (B^T A + lambda W_dense)(A^T A + lambda I)^-1, lambda = dampening x mean diag(A^T A)) so that
  ill-conditioned inputs can never blow it up; the inner solver adds the same lambda to its Hessian,
  which makes its objective exactly ||A W'^T - B||^2 + lambda ||W' - W_dense||^2.
- p: p = (beta W2^T W2 + gamma I)^-1 (beta W2^T Y + gamma act(z)) for every token (row form
  p <- (beta Y W2 + gamma act(z)) (beta W2^T W2 + gamma I)^-1), processed in chunks of tokens.
- z: elementwise. For ReLU, the minimiser of alpha (z - m)^2 + gamma (p - relu(z))^2 with
  m = X W1^T is the better of the candidates max((alpha m + gamma p) / (alpha + gamma), 0) and
  min(m, 0). For smooth activations (GELU, SiLU) a few safeguarded Gauss-Newton steps are taken
  (each element only moves when its own objective decreases).

Gated MLPs (Llama, Qwen, Gemma, Mistral: down(act(gate x) * up x)) have two first layers. The up
output u plays the role of z (it enters p linearly): with s = act(g) held fixed, minimising
alpha ||X Wu^T - u||^2 + gamma ||p - s * u||^2 gives u = (alpha m_u + gamma s p) / (alpha + gamma s^2).
The gate pre-activation g gets its own term alpha ||X Wg^T - g||^2 and is updated by safeguarded
Gauss-Newton steps on alpha (g - m_g)^2 + gamma (p - act(g) u)^2. Both first layers are then refitted
to their targets and pruned on the Hessian of X.

Safety, beyond the paper: every iteration's auxiliaries are checked for finiteness; the last step
prunes W2 against the *actual* activations of the pruned first layer(s), so the result is judged by
the real MLP output; and the layer-wise result of the inner solver (each MLP layer pruned alone,
which is what the first iteration computes anyway) is kept whenever it reproduces the dense MLP
output better. So SparseLLM is never worse, on the calibration data, than its inner solver.

Attention projections, and every layer that is not part of a recognised MLP, are pruned layer by layer
with the inner solver. See docs/sparsellm.md for the hyperparameters, memory and numerics.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optimum_sparse.architecture import PrunableLayer, get_weight
from optimum_sparse.options import Option, finite_positive, one_of, positive_int
from optimum_sparse.registry import get_solver_class, register_solver
from optimum_sparse.solvers.base import DAMPENING, FLOAT64_MAX_FEATURES, LayerResult, LayerStatistics, Solver

logger = logging.getLogger(__name__)

Activation = Callable[[torch.Tensor], torch.Tensor]
#: prune one weight: (float32 (out, in) weight, statistics of its inputs) -> result with exact sparsity
PruneFn = Callable[[torch.Tensor, LayerStatistics], LayerResult]

#: (alpha, beta, gamma) of `solve_mlp` when none are given: the SparsityConfig defaults, see docs/sparsellm.md
DEFAULT_WEIGHTS = (1.0, 100.0, 10.0)
#: per-layer solvers SparseLLM may use for the attention projections and inside its MLP updates
INNER_SOLVERS = ("admm", "sparsegpt")
#: ADMM penalty of the inner solver when `admm_rho` is None (the setting SparseLLM was measured with)
SPARSELLM_ADMM_RHO = 0.25
#: tokens per chunk of the elementwise / closed-form updates (bounds the temporaries)
CHUNK_TOKENS = 4096
#: attribute names under which transformers modules keep their MLP activation
ACTIVATION_ATTRIBUTES = ("act_fn", "act", "activation_fn", "activation")
#: relative mismatch allowed when checking that the recorded activations are act(fc1 x) (or act(gate x) * up x)
WIRING_TOLERANCE = 5e-2
#: safeguarded Gauss-Newton steps per z (or gate) update for smooth activations
NEWTON_STEPS = 4


# --------------------------------------------------------------------------------------------- problem


@dataclass
class MlpProblem:
    """One MLP: dense float32 weights in (out, in) layout, its activation and calibration data.

    Plain MLPs compute `down(act(up(x)))`, gated ones `down(act(gate(x)) * up(x))`.
    """

    x: torch.Tensor  # (tokens, d_in) MLP input
    y: torch.Tensor  # (tokens, d_out) dense MLP output (biases included)
    up: torch.Tensor  # (width, d_in): fc1 / up_proj
    down: torch.Tensor  # (d_out, width): fc2 / down_proj
    act: Activation
    gate: torch.Tensor | None = None  # (width, d_in): gate_proj of gated MLPs
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def kind(self) -> str:
        """The MLP kind: "gated", "relu" (plain MLP with ReLU) or "smooth" (plain, with GELU, SiLU, ...)."""
        if self.gated:
            return "gated"
        return "relu" if is_relu(self.act) else "smooth"


@dataclass
class MlpSolution:
    """The pruned MLP weights and how they were obtained."""

    up: LayerResult
    down: LayerResult
    gate: LayerResult | None
    #: ||MLP'(X) - Y||^2 / ||Y||^2 of the inner solver alone (each layer pruned on its dense inputs)
    layerwise_error: float
    #: the same for the SparseLLM iterations (inf when they were abandoned as non-finite)
    joint_error: float
    #: SparseLLM objective per token: after the layer-wise start, then after every iteration
    objective: list[float] = field(default_factory=list)
    #: statistics of the dense inputs of the first layer(s) (X) and of the second layer (act output)
    first_statistics: LayerStatistics | None = None
    second_statistics: LayerStatistics | None = None

    @property
    def used_joint(self) -> bool:
        return self.joint_error < self.layerwise_error

    @property
    def error(self) -> float:
        return min(self.layerwise_error, self.joint_error)


def is_relu(act: Activation) -> bool:
    """True when `act` computes max(x, 0) (checked on probe values, so any ReLU module or function)."""
    probe = torch.linspace(-3.0, 3.0, 13)
    try:
        with torch.no_grad():
            return bool(torch.equal(act(probe), probe.clamp_min(0.0)))
    except Exception:  # an activation that cannot run on a CPU vector is not ReLU
        return False


# --------------------------------------------------------------------------------------------- helpers


def _chunks(tokens: int) -> Iterator[slice]:
    for start in range(0, tokens, CHUNK_TOKENS):
        yield slice(start, min(start + CHUNK_TOKENS, tokens))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.t()
    if bias is not None:
        out += bias
    return out


def _mean_square(tensor: torch.Tensor) -> float:
    """Mean of squares (chunked, float64 accumulation), floored so that it can divide."""
    total = sum(float(tensor[c].double().pow(2).sum()) for c in _chunks(tensor.shape[0]))
    return max(total / max(tensor.numel(), 1), 1e-30)


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(f"non-finite values in {name}")


def _hidden(problem: MlpProblem, x: torch.Tensor, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Activation output (the second layer's input) of the MLP with first-layer weights `up` / `gate`."""
    u = _linear(x, up, problem.up_bias)
    if gate is None:
        return problem.act(u)
    return problem.act(_linear(x, gate, problem.gate_bias)) * u


def output_error(problem: MlpProblem, up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor | None = None) -> float:
    """||MLP(X) - Y||^2 / ||Y||^2 with the given weights and the real activation."""
    num = den = 0.0
    for c in _chunks(problem.x.shape[0]):
        out = _linear(_hidden(problem, problem.x[c], up, gate), down, problem.down_bias)
        num += float((out - problem.y[c]).double().pow(2).sum())
        den += float(problem.y[c].double().pow(2).sum())
    return num / den if den > 0 else num


def _statistics(chunks: Iterator[torch.Tensor], width: int, device: torch.device) -> LayerStatistics:
    stats = LayerStatistics(width, with_hessian=True, device=device)
    for chunk in chunks:
        stats.update(chunk)
    return stats


def _fit_statistics(
    pairs: Iterator[tuple[torch.Tensor, torch.Tensor]], n_in: int, n_out: int, device: torch.device
) -> tuple[LayerStatistics, torch.Tensor]:
    """Input statistics (H = A^T A / T) and the cross term B^T A / T of a least-squares fit A W^T ~ B."""
    stats = LayerStatistics(n_in, with_hessian=True, device=device)
    cross = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    for inputs, targets in pairs:
        stats.update(inputs)
        cross += (targets.t() @ inputs).double()  # float32 product per chunk, float64 running sum
    return stats, (cross / max(stats.num_tokens, 1)).float()


def _ridge_fit(stats: LayerStatistics, cross: torch.Tensor, anchor: torch.Tensor, dampening: float) -> torch.Tensor:
    """W* = (cross + lambda anchor)(H + lambda I)^-1 with lambda = dampening * mean diag(H).

    The least-squares weight for the fit's targets, pulled towards `anchor` (the dense weight) in the
    directions the inputs barely excite. Solved by Cholesky (float64 up to FLOAT64_MAX_FEATURES
    inputs); on failure the dampening is raised tenfold with a warning, and after 6 failures the
    anchor itself is returned.
    """
    h = stats.hessian
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0 or not math.isfinite(mean_diag):
        return anchor.clone()
    dtype = torch.float64 if h.shape[0] <= FLOAT64_MAX_FEATURES else torch.float32
    damp = dampening
    for _ in range(6):
        lam = damp * mean_diag
        matrix = h.to(dtype, copy=True)  # never the stored Hessian itself: a retry would dampen it twice
        matrix.diagonal().add_(lam)
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            rhs = (cross.to(dtype) + lam * anchor.to(dtype)).t()
            weight = torch.cholesky_solve(rhs, chol).t().to(torch.float32)
            if bool(torch.isfinite(weight).all()):
                return weight.contiguous()
        logger.warning("SparseLLM: weight refit failed with dampening %.3g; retrying with %.3g", damp, damp * 10)
        damp *= 10
    logger.warning("SparseLLM: weight refit failed even with heavy dampening; keeping the dense weight as target")
    return anchor.clone()


def _is_silu(act: Activation) -> bool:
    """True when `act` computes SiLU (checked on probe values, like `is_relu`)."""
    probe = torch.linspace(-4.0, 4.0, 17)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), torch.nn.functional.silu(probe), atol=1e-6))
    except Exception:
        return False


def _act_and_slope(act: Activation, z: torch.Tensor, silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """act(z) and act'(z) elementwise: in closed form for SiLU (the activation of Llama-style MLPs, and
    about 3x cheaper than autograd there), by autograd otherwise so any differentiable activation works."""
    if silu:
        sigmoid = torch.sigmoid(z)
        value = z * sigmoid
        return value, sigmoid * (1.0 + z * (1.0 - sigmoid))
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        value = act(leaf)
        (slope,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), slope


def relu_pre_activation_step(m: torch.Tensor, p: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Exact minimiser of alpha (z - m)^2 + gamma (p - relu(z))^2, elementwise.

    On z >= 0 the objective is a parabola with vertex (alpha m + gamma p) / (alpha + gamma) (clamped
    to 0); on z <= 0 it is alpha (z - m)^2 + gamma p^2, minimised at min(m, 0). The better one wins.
    """
    positive = ((alpha * m + gamma * p) / (alpha + gamma)).clamp_min_(0.0)
    negative = m.clamp_max(0.0)
    cost_pos = alpha * (positive - m).pow(2) + gamma * (p - positive).pow(2)
    cost_neg = alpha * (negative - m).pow(2) + gamma * p.pow(2)
    return torch.where(cost_pos <= cost_neg, positive, negative)


def smooth_pre_activation_step(
    act: Activation,
    z: torch.Tensor,
    m: torch.Tensor,
    p: torch.Tensor,
    alpha: float,
    gamma: float,
    scale: torch.Tensor | None = None,
    steps: int = NEWTON_STEPS,
    silu: bool | None = None,
) -> torch.Tensor:
    """Decrease f(z) = alpha (z - m)^2 + gamma (p - scale * act(z))^2 elementwise (scale = 1 if None).

    Starts from the better of the current z and m, then takes Gauss-Newton steps
    z -= f'(z) / (2 alpha + 2 gamma (scale act'(z))^2); an element only moves when its own f decreases,
    so the result is never worse than the start, whatever the activation's curvature.
    """

    closed_form = _is_silu(act) if silu is None else silu

    def evaluate(point: torch.Tensor):
        value, slope = _act_and_slope(act, point, closed_form)
        if scale is not None:
            value, slope = value * scale, slope * scale
        residual = p - value
        return alpha * (point - m).pow(2) + gamma * residual.pow(2), residual, slope

    cost, residual, slope = evaluate(z)
    cost_m, residual_m, slope_m = evaluate(m)
    start_m = cost_m < cost
    z = torch.where(start_m, m, z)
    cost = torch.where(start_m, cost_m, cost)
    residual = torch.where(start_m, residual_m, residual)
    slope = torch.where(start_m, slope_m, slope)
    for _ in range(steps):
        gradient = alpha * (z - m) - gamma * residual * slope
        candidate = z - gradient / (alpha + gamma * slope.pow(2))
        new_cost, new_residual, new_slope = evaluate(candidate)
        better = new_cost < cost  # NaN compares False: a bad candidate is simply not taken
        z = torch.where(better, candidate, z)
        cost = torch.where(better, new_cost, cost)
        residual = torch.where(better, new_residual, residual)
        slope = torch.where(better, new_slope, slope)
    return z


def _activation_step_inverse(down: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """(beta W2^T W2 + gamma I)^-1 (width x width); symmetric positive definite, eigenvalues >= gamma."""
    width = down.shape[1]
    dtype = torch.float64 if width <= FLOAT64_MAX_FEATURES else torch.float32
    matrix = beta * (down.t().to(dtype) @ down.to(dtype))
    matrix.diagonal().add_(gamma)
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        raise FloatingPointError("the activation update matrix beta W2^T W2 + gamma I is not positive definite")
    return torch.cholesky_inverse(chol).to(torch.float32)


# --------------------------------------------------------------------------------------------- solver core


@dataclass
class _Weights:
    """The objective's weights in absolute units (after `_State.normalise`)."""

    alpha: float  # first layer (plain) or up term
    alpha_gate: float  # gate term of gated MLPs
    beta: float
    gamma: float


class _State:
    """The auxiliaries of one MLP: pre-activation z (up output u for gated MLPs), gate g, activation p."""

    def __init__(self, problem: MlpProblem):
        tokens, width = problem.x.shape[0], problem.up.shape[0]
        device = problem.x.device
        self.z = torch.empty(tokens, width, device=device)
        self.g = torch.empty(tokens, width, device=device) if problem.gated else None
        self.p = torch.empty(tokens, width, device=device)
        for c in _chunks(tokens):
            self.z[c] = _linear(problem.x[c], problem.up, problem.up_bias)
            if self.g is not None:
                self.g[c] = _linear(problem.x[c], problem.gate, problem.gate_bias)
                self.p[c] = problem.act(self.g[c]) * self.z[c]
            else:
                self.p[c] = problem.act(self.z[c])

    def normalise(self, problem: MlpProblem, alpha: float, beta: float, gamma: float) -> _Weights:
        """The weights divided by the mean squares of the dense z (u and g), p and Y.

        Called before any update. Each term of the objective then is a relative error, so the same
        alpha, beta, gamma mean the same thing for models of any scale.
        """
        gate = alpha / _mean_square(self.g) if self.g is not None else 0.0
        return _Weights(
            alpha / _mean_square(self.z), gate, beta / _mean_square(problem.y), gamma / _mean_square(self.p)
        )

    def activation(self, problem: MlpProblem, c: slice) -> torch.Tensor:
        """act(z) (plain) or act(g) * u (gated) on the token chunk `c`."""
        if self.g is None:
            return problem.act(self.z[c])
        return problem.act(self.g[c]) * self.z[c]


def _objective(
    problem: MlpProblem,
    state: _State,
    up: torch.Tensor,
    down: torch.Tensor,
    gate: torch.Tensor | None,
    weights: _Weights,
) -> float:
    """The SparseLLM objective per token, with the gate term alpha ||X Wg^T - g||^2 for gated MLPs."""
    total = 0.0
    for c in _chunks(problem.x.shape[0]):
        x = problem.x[c]
        total += weights.alpha * float((_linear(x, up, problem.up_bias) - state.z[c]).double().pow(2).sum())
        if gate is not None:
            gate_term = (_linear(x, gate, problem.gate_bias) - state.g[c]).double().pow(2).sum()
            total += weights.alpha_gate * float(gate_term)
        total += weights.gamma * float((state.p[c] - state.activation(problem, c)).double().pow(2).sum())
        output = _linear(state.p[c], down, problem.down_bias) - problem.y[c]
        total += weights.beta * float(output.double().pow(2).sum())
    return total / problem.x.shape[0]


def _refit_and_prune(
    prune: PruneFn,
    pairs: Iterator[tuple[torch.Tensor, torch.Tensor]],
    anchor: torch.Tensor,
    dampening: float,
    device: torch.device,
) -> LayerResult:
    """Prune the weight that best maps the pairs' inputs to their targets (see the module docstring)."""
    stats, cross = _fit_statistics(pairs, anchor.shape[1], anchor.shape[0], device)
    target = _ridge_fit(stats, cross, anchor, dampening)
    outcome = prune(target, stats)
    _check_finite("a pruned weight", outcome.weight)
    return outcome


def solve_mlp(
    problem: MlpProblem,
    prune: PruneFn,
    *,
    iterations: int = 4,
    weights: tuple[float, float, float] | None = None,
    dampening: float = 0.01,
    track_objective: bool = True,
) -> MlpSolution:
    """SparseLLM on one MLP (module docstring); `prune` is the inner per-layer solver.

    `track_objective` records the objective after every round (`MlpSolution.objective`); it costs
    about one extra pass over the auxiliaries per round, so the solver turns it on only for DEBUG logs.

    Round 0 prunes each layer on its own (the inner solver's layer-wise result); each of the
    `iterations` rounds then updates p, z (u and g), refits and prunes the first layer(s) to their
    targets and the second layer to its inputs p; a final step prunes the second layer against the
    actual activations of the pruned first layer(s). The better of the layer-wise and the joint
    result (by the real MLP output error on the calibration tokens) is returned.
    """
    x, device, tokens = problem.x, problem.x.device, problem.x.shape[0]
    for name, tensor in (("MLP inputs", problem.x), ("MLP outputs", problem.y)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"SparseLLM: the calibration {name} are not finite (the model overflowed upstream)")
    width = problem.up.shape[0]
    target = problem.y if problem.down_bias is None else problem.y - problem.down_bias
    relu = not problem.gated and is_relu(problem.act)
    silu = not relu and _is_silu(problem.act)

    def minus(values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return values if bias is None else values - bias

    state = _State(problem)
    # each term measured relative to the mean square of its dense value: scale-free weights
    w = state.normalise(problem, *(weights if weights is not None else DEFAULT_WEIGHTS))
    alpha, beta, gamma = w.alpha, w.beta, w.gamma
    stats_x = _statistics((x[c] for c in _chunks(tokens)), x.shape[1], device)
    stats_p = _statistics((state.p[c] for c in _chunks(tokens)), width, device)
    # round 0: the inner solver alone, every layer on its dense inputs
    up = prune(problem.up.clone(), stats_x)
    gate = prune(problem.gate.clone(), stats_x) if problem.gated else None
    down = prune(problem.down.clone(), stats_p)
    gate_w = gate.weight if gate is not None else None
    layerwise = (up, gate, down)
    layerwise_error = output_error(problem, up.weight, down.weight, gate_w)
    objective = [_objective(problem, state, up.weight, down.weight, gate_w, w)] if track_objective else []
    joint_error = math.inf
    joint = None
    try:
        for _ in range(iterations):
            # p: closed form, given the pruned W2 and the current pre-activations
            inverse = _activation_step_inverse(down.weight, beta, gamma)
            for c in _chunks(tokens):
                rhs = beta * (target[c] @ down.weight) + gamma * state.activation(problem, c)
                state.p[c] = rhs @ inverse
            _check_finite("the activation auxiliary p", state.p)
            # z (or u, then g): elementwise, given the pruned first layer(s) and p
            for c in _chunks(tokens):
                m = _linear(x[c], up.weight, problem.up_bias)
                if problem.gated:
                    s = problem.act(state.g[c])
                    state.z[c] = (alpha * m + gamma * s * state.p[c]) / (alpha + gamma * s * s)
                    m_gate = _linear(x[c], gate.weight, problem.gate_bias)
                    state.g[c] = smooth_pre_activation_step(
                        problem.act, state.g[c], m_gate, state.p[c], w.alpha_gate, gamma, scale=state.z[c], silu=silu
                    )
                elif relu:
                    state.z[c] = relu_pre_activation_step(m, state.p[c], alpha, gamma)
                else:
                    state.z[c] = smooth_pre_activation_step(
                        problem.act, state.z[c], m, state.p[c], alpha, gamma, silu=silu
                    )
            _check_finite("the pre-activation auxiliary z", state.z)
            if state.g is not None:
                _check_finite("the gate auxiliary g", state.g)
            # W1 (and the gate) to their targets on X; W2 to Y on its inputs p
            up = _refit_and_prune(
                prune,
                ((x[c], minus(state.z[c], problem.up_bias)) for c in _chunks(tokens)),
                problem.up,
                dampening,
                device,
            )
            if problem.gated:
                gate = _refit_and_prune(
                    prune,
                    ((x[c], minus(state.g[c], problem.gate_bias)) for c in _chunks(tokens)),
                    problem.gate,
                    dampening,
                    device,
                )
            gate_w = gate.weight if gate is not None else None
            down = _refit_and_prune(
                prune, ((state.p[c], target[c]) for c in _chunks(tokens)), problem.down, dampening, device
            )
            if track_objective:
                objective.append(_objective(problem, state, up.weight, down.weight, gate_w, w))
        # last: W2 against the real activations of the pruned first layer(s)
        down = _refit_and_prune(
            prune,
            ((_hidden(problem, x[c], up.weight, gate_w), target[c]) for c in _chunks(tokens)),
            problem.down,
            dampening,
            device,
        )
        joint_error = output_error(problem, up.weight, down.weight, gate_w)
        joint = (up, gate, down)
    except FloatingPointError as err:
        logger.warning("SparseLLM iterations abandoned (%s); keeping the inner solver's layer-wise result", err)
    if not math.isfinite(joint_error):
        joint_error = math.inf
    chosen = joint if joint is not None and joint_error < layerwise_error else layerwise
    return MlpSolution(chosen[0], chosen[2], chosen[1], layerwise_error, joint_error, objective, stats_x, stats_p)


# --------------------------------------------------------------------------------------------- memory


def estimate_memory(tokens: int, d_in: int, width: int, d_out: int, gated: bool) -> int:
    """Bytes SparseLLM keeps for one MLP: X, Y and the auxiliaries (float32, tokens x width each:
    z and p, plus g for gated MLPs), the chunk temporaries, and the width x width matrices (Hessian,
    factorisations and inverses, float64) of the updates and the inner solver."""
    auxiliaries = 3 if gated else 2
    floats = tokens * (d_in + d_out + auxiliaries * width) + min(tokens, CHUNK_TOKENS) * 6 * width
    doubles = 4 * width * width + 2 * d_in * d_in + 2 * width * max(d_in, d_out)
    return 4 * floats + 8 * doubles


def _available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` (CUDA: the driver's count; CPU: MemAvailable on Linux), None if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu" and os.path.exists("/proc/meminfo"):
            with open("/proc/meminfo", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------------- MLP detection


@dataclass
class _Mlp:
    """A recognised MLP of a block: first layer(s) (up, or gate and up) feeding `second` through `act`."""

    up: PrunableLayer
    second: PrunableLayer
    act: Activation
    gate: PrunableLayer | None = None

    @property
    def layers(self) -> list[PrunableLayer]:
        return [layer for layer in (self.gate, self.up, self.second) if layer is not None]


def _out_features(layer: PrunableLayer) -> int:
    return get_weight(layer.module).shape[0]


def _mlp_candidate(groups: list[list[PrunableLayer]]) -> tuple[list[PrunableLayer], PrunableLayer] | None:
    """The last pair of consecutive input groups shaped like an MLP: 1 or 2 layers d -> m reading the same
    input, then a single layer m -> d. Attention projections do not fit (q/k/v come in threes, or as one
    fused d -> 3d layer; o_proj d -> d is followed by a layer with d inputs but not d outputs... unless the
    MLP is square, which the wiring check then rejects)."""
    for first, second in reversed(list(zip(groups, groups[1:]))):
        if len(first) not in (1, 2) or len(second) != 1:
            continue
        d_in, width = first[0].in_features, _out_features(first[0])
        if any(layer.in_features != d_in or _out_features(layer) != width for layer in first):
            continue
        if second[0].in_features == width and _out_features(second[0]) == d_in and width != d_in:
            return first, second[0]
    return None


def _find_activation(block: nn.Module, layers: list[PrunableLayer]) -> Activation | None:
    """The activation stored on the MLP layers' closest common parent module, or on one of its ancestors
    inside the block, under one of ACTIVATION_ATTRIBUTES (transformers' naming: act_fn in Llama/Qwen/
    Gemma, act in GPT-2, activation_fn in OPT)."""
    names = {id(module): name for name, module in block.named_modules()}
    paths = [names.get(id(layer.module), "").split(".")[:-1] for layer in layers]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    for depth in range(len(common), -1, -1):
        module = block.get_submodule(".".join(common[:depth])) if depth else block
        for attribute in ACTIVATION_ATTRIBUTES:
            act = getattr(module, attribute, None)
            if callable(act) and not isinstance(act, (str, type)):
                return act
    return None


def _mismatch(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = float(actual.double().norm()) + 1e-6 * math.sqrt(actual.numel())
    return float((expected - actual).double().norm()) / scale


# --------------------------------------------------------------------------------------------- the solver


@dataclass
class MlpReport:
    """What SparseLLM did for one block's MLP (kept on the solver in `reports`, by block index)."""

    layers: list[str]
    kind: str
    layerwise_error: float
    joint_error: float
    objective: list[float]

    @property
    def used_joint(self) -> bool:
        return self.joint_error < self.layerwise_error


@register_solver("sparsellm")
class SparseLLMSolver(Solver):
    """SparseLLM (Bai et al. 2024, arXiv 2402.17946): each block's MLP pruned jointly, the rest by the
    inner solver.

    Reads: sparsity / pattern, mask_scope, the `options` below and the inner solver's own settings.
    Per-layer calls (`prune_layer`, `refit_layer`, used on fixed masks) are the inner solver's.
    `prune_block` returns each block's `MlpReport` (MLP errors and objective), which the engine keeps
    in `PruningResult.block_reports`.
    """

    requires_hessian = True
    smoke_settings = {"sparsellm_iterations": 1, "admm_iterations": 4, "admm_gradual_steps": 3}
    options = (
        DAMPENING,
        Option("sparsellm_iterations", 4, "alternating rounds of the joint MLP pruning", positive_int()),
        Option(
            "alpha",
            1.0,
            "weight of alpha ||W1 X - z||^2 (first layer), relative to its dense mean square",
            finite_positive("a finite number > 0 (a SparseLLM objective weight)"),
        ),
        Option(
            "beta",
            100.0,
            "weight of beta ||W2 p - Y||^2 (output), relative to its dense mean square",
            finite_positive("a finite number > 0 (a SparseLLM objective weight)"),
        ),
        Option(
            "gamma",
            10.0,
            "weight of gamma ||p - act(z)||^2 (activation), relative to its dense mean square",
            finite_positive("a finite number > 0 (a SparseLLM objective weight)"),
        ),
        Option(
            "inner_solver",
            "admm",
            "per-layer solver for attention and inside the MLP updates: 'admm' or 'sparsegpt'",
            one_of(INNER_SOLVERS),
        ),
        Option(
            "sparsellm_max_memory_gb",
            16.0,
            "refuse, before allocating, a block whose auxiliary variables would need more GiB than this",
            finite_positive("a finite number of GiB > 0"),
        ),
    )

    @classmethod
    def uses(cls, settings: dict[str, Any]) -> Sequence[str]:
        return (settings["inner_solver"],)

    def __init__(self, config):
        super().__init__(config)
        # the inner solver runs with the settings SparseLLM was tuned with (docs/sparsellm.md), unless set
        changes: dict[str, Any] = {"dampening": self.dampening}
        if "admm_rho" in config.settings:
            changes["admm_rho"] = config.admm_rho if config.admm_rho is not None else SPARSELLM_ADMM_RHO
        self.inner: Solver = get_solver_class(config.inner_solver)(config.replace(**changes))

    @property
    def scope(self) -> str:
        return self.inner.scope

    def prune_layer(self, weight: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        return self.inner.prune_layer(weight, stats)

    def refit_layer(self, weight: torch.Tensor, mask: torch.Tensor, stats: LayerStatistics | None) -> LayerResult:
        return self.inner.refit_layer(weight, mask, stats)

    # ------------------------------------------------------------------ block level
    def prune_block(self, context) -> MlpReport | None:
        """Prune `context.block`: non-MLP layers with the inner solver, then the MLP jointly."""
        groups = context.groups()
        mlp = self._detect(context, groups)
        if mlp is not None:
            self._check_memory(context, mlp)
        names = {layer.name for layer in mlp.layers} if mlp is not None else set()
        others = [group for group in groups if not any(layer.name in names for layer in group)]
        self.prune_groups(context, others, self.inner)
        return self._prune_mlp(context, mlp) if mlp is not None else None

    def _detect(self, context, groups: list[list[PrunableLayer]]) -> _Mlp | None:
        """Find the block's MLP and check, on one calibration window, that it computes what we assume."""
        candidate = _mlp_candidate(groups)
        if candidate is None:
            reason = "no pair of layers shaped d -> m -> d (a fused gate_up projection, or excluded MLP layers?)"
            return self._unrecognised(context, reason)
        first, second = candidate
        act = _find_activation(context.block, [*first, second])
        if act is None:
            reason = f"no activation under {ACTIVATION_ATTRIBUTES} on the MLP's parent modules"
            return self._unrecognised(context, reason)
        modules = {layer.name: layer.module for layer in [*first, second]}
        parts = {**{layer.name: "outputs" for layer in first}, second.name: "inputs"}
        probe = context.capture(modules, parts=parts, max_windows=1)
        hidden = probe[second.name][0]
        outputs = [probe[layer.name][1] for layer in first]
        with torch.no_grad():
            if len(first) == 1:
                if _mismatch(act(outputs[0]), hidden) <= WIRING_TOLERANCE:
                    return _Mlp(first[0], second, act)
            else:
                for gate, up in ((0, 1), (1, 0)):
                    if _mismatch(act(outputs[gate]) * outputs[up], hidden) <= WIRING_TOLERANCE:
                        return _Mlp(first[up], second, act, gate=first[gate])
        wiring = "act(gate x) * up x" if len(first) == 2 else "act(fc1 x)"
        names = ", ".join(layer.name for layer in [*first, second])
        return self._unrecognised(context, f"the input of {second.name} is not {wiring} ({names})")

    def _unrecognised(self, context, reason: str) -> None:
        logger.warning(
            "SparseLLM: block %d has no MLP it can prune jointly (%s); pruning all its layers with %s alone",
            context.index,
            reason,
            self.config.inner_solver,
        )
        return None

    def _check_memory(self, context, mlp: _Mlp) -> None:
        cfg = self.config
        tokens = context.num_tokens
        d_in, width, d_out = mlp.up.in_features, _out_features(mlp.up), _out_features(mlp.second)
        need = estimate_memory(tokens, d_in, width, d_out, mlp.gate is not None)
        limit = int(cfg.sparsellm_max_memory_gb * 2**30)
        available = _available_memory(context.device)
        where = f"sparsellm_max_memory_gb={cfg.sparsellm_max_memory_gb:g}"
        if available is not None and available < limit:
            limit, where = available, f"free memory on {context.device}"
        if need > limit:
            raise ValueError(
                f"SparseLLM needs about {need / 2**30:.2f} GiB for the MLP of block {context.index} ({tokens} "
                f"calibration tokens x (inputs {d_in} + outputs {d_out} + {3 if mlp.gate is not None else 2} x width "
                f"{width}) float32), more than the {limit / 2**30:.2f} GiB allowed ({where}): lower num_samples x "
                f"seq_len (now {cfg.num_samples} x {cfg.seq_len}) or raise sparsellm_max_memory_gb"
            )

    def _prune_mlp(self, context, mlp: _Mlp) -> MlpReport:
        cfg = self.config
        captured = context.capture(
            {mlp.up.name: mlp.up.module, mlp.second.name: mlp.second.module},
            parts={mlp.up.name: "inputs", mlp.second.name: "outputs"},
        )
        x, y = captured[mlp.up.name][0], captured[mlp.second.name][1]

        def dense(layer: PrunableLayer | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if layer is None:
                return None, None
            weight = get_weight(layer.module).detach().to(context.device, torch.float32).clone()
            bias = getattr(layer.module, "bias", None)
            return weight, (bias.detach().to(context.device, torch.float32).clone() if bias is not None else None)

        (up, up_bias), (down, down_bias), (gate, gate_bias) = dense(mlp.up), dense(mlp.second), dense(mlp.gate)
        problem = MlpProblem(x, y, up, down, mlp.act, gate, up_bias, down_bias, gate_bias)
        del captured

        def prune(weight: torch.Tensor, stats: LayerStatistics) -> LayerResult:
            outcome = self.inner.prune_layer(weight.clone(), stats)
            if context.refit is not None:
                outcome = context.refit.refit_layer(weight.clone(), outcome.mask, stats)
            return outcome

        solution = solve_mlp(
            problem,
            prune,
            iterations=cfg.sparsellm_iterations,
            weights=(cfg.alpha, cfg.beta, cfg.gamma),
            dampening=self.dampening,
            track_objective=logger.isEnabledFor(logging.DEBUG),
        )
        context.write(mlp.up, solution.up, solution.first_statistics)
        if mlp.gate is not None:
            context.write(mlp.gate, solution.gate, solution.first_statistics)
        context.write(mlp.second, solution.down, solution.second_statistics)
        report = MlpReport(
            [layer.name for layer in mlp.layers],
            problem.kind,
            solution.layerwise_error,
            solution.joint_error,
            solution.objective,
        )
        logger.info(
            "SparseLLM block %d (%s MLP): output error %.4g, %s alone %.4g -> %s",
            context.index,
            problem.kind,
            solution.error,
            cfg.inner_solver,
            solution.layerwise_error,
            "joint result kept" if solution.used_joint else "layer-wise result kept",
        )
        return report
