"""`SparsityConfig`: what to prune, how much, and with which method.

A flat, JSON-serialisable dataclass in the spirit of `peft.LoraConfig`. Method-specific settings
live beside the common ones so a single file (`sparsity_config.json`) describes a pruning run
completely; each solver reads only the fields it documents. Validation happens on construction so
that a typo fails before a model is loaded or a calibration pass is spent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_NAME = "sparsity_config.json"
FORMAT_VERSION = 1

# Keys that `sparsity_config.json` may carry beside the config fields (written by the library).
METADATA_KEYS = (
    "format_version",
    "library_version",
    "measured_sparsity",
    "layer_sparsity",
    "metrics",
    "checkpoint",  # saved by SparseModel: {"format": "dense" | "compact", "masks_file": ..., "weights_file": ...}
    "base_model",
    "calibration",
)

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

#: non-N:M patterns; "unstructured" is stored as None, "channels" (MLP channels + attention KV groups) is pg-only
STRUCTURED_PATTERNS = ("channels",)
#: settings of policy-gradient mask learning (method "pg", see docs/mask_learning.md)
PG_PRECONDITIONERS = ("fisher", "adam")
PG_RATIOS = ("joint", "unit")
PG_INITS = ("wanda", "uniform")
PG_OBJECTIVES = ("lm", "block")
#: how sampled channel sub-models are instantiated during training (weight patterns are always masked)
PG_SUBMODELS = ("sliced", "masked")
HARDEN_SCOPES = ("global", "layer", "row")

#: per-layer solvers SparseLLM may use for the attention projections and inside its MLP updates
INNER_SOLVERS = ("admm", "sparsegpt")


def _finite_positive(value) -> bool:
    """A real number (not a bool) in (0, inf)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < float("inf")


def _check_positive_ints(config, names: tuple[str, ...]) -> None:
    """Raise a ValueError naming the first of `names` that is not an integer >= 1."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$")


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse "N:M" (keep N of every M consecutive input weights) into (N, M), validating it."""
    match = _NM_RE.match(pattern)
    if not match:
        raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1 or n >= m:
        raise ValueError(
            f"pattern {pattern!r}: N:M keeps N of every M weights and needs 1 <= N < M (e.g. '2:4', '4:8')"
        )
    return n, m


@dataclass
class SparsityConfig:
    """Configuration of a pruning run.

    Args:
        method: registered solver name (see `optimum_sparse.available_methods()`).
        sparsity: fraction of weights set to zero in every pruned layer, in [0, 1). Implied by
            `pattern` when that is N:M.
        pattern: None or "unstructured", "N:M" (keep N of every M consecutive input weights), or, for
            method "pg" only, "channels" (MLP intermediate channels and attention KV groups, budget
            counted in parameters).
        targets: regexes (``re.search`` on full module names); only matching linears inside the
            decoder blocks are pruned. None prunes every linear in every block.
        ignore: regexes of module names never pruned. lm_head and embeddings are always skipped.
        mask_scope: "row" compares weights within each output row, "layer" across the whole layer.
            None picks the method's default (magnitude: layer, wanda: row).
        prune_ties: (magnitude, unstructured) prune every weight whose score is <= the score at
            position k = round(sparsity * n) of the ascending sort, which is the rule of the
            SparseGPT/Wanda repositories' magnitude baseline, instead of exactly k weights. Quantised
            checkpoints have many equal |W|, so the layer ends slightly above the target sparsity.
        num_samples, seq_len, seed: calibration windows (count, tokens each, sampling seed).
        dampening: fraction of mean(diag(H)) added to the Hessian diagonal (SparseGPT, ADMM,
            SparseLLM). None picks the method's default (sparsegpt 0.01, admm 0.1, sparsellm 0.01).
        block_size: column block width of SparseGPT's lazy updates.
        sequential_update: calibrate each group of linears on the outputs of already-pruned
            earlier sub-layers of the same block (more forward passes, better quality).
        device: where blocks are processed ("auto": CUDA if present, else CPU).
        admm_iterations: ADMM iterations per layer (method "admm" and the ADMM refit), including
            the gradual ones; each costs one (out x in) @ (in x in) product.
        admm_rho: ADMM penalty, in units of the normalised Hessian's diagonal (which is 1). None:
            1.0 for method "admm" and the ADMM refit, 0.25 inside SparseLLM.
        admm_gradual_steps: iterations over which the mask grows to the target sparsity on a cubic
            schedule when `gradual` (at most `admm_iterations`).
        admm_cg_steps: conjugate-gradient steps on the final support after ADMM (0 turns it off).
        gradual: ADMM re-chooses the mask while the sparsity grows (else it is chosen once).
        mask_init: ADMM's first scores: "magnitude" (|W| after input normalisation) or "wanda".
        weight_update: "admm" refits the kept weights after any method's mask selection.
        sparsellm_iterations: alternating rounds of SparseLLM's joint MLP pruning (Bai et al. 2024).
        alpha, beta, gamma: weights of SparseLLM's objective terms alpha ||W1 X - z||^2 (first
            layer), gamma ||p - act(z)||^2 (activation) and beta ||W2 p - Y||^2 (output), each term
            measured relative to the mean square of its dense value (see docs/sparsellm.md).
        inner_solver: per-layer solver SparseLLM uses for attention and inside its MLP updates,
            "admm" (default) or "sparsegpt".
        sparsellm_max_memory_gb: SparseLLM refuses, before allocating, a block whose auxiliary
            variables (calibration tokens x MLP width) would need more GiB than this.
        refresh_every: (pg) a sampled sub-model is reused for this many optimizer steps, its
            gradient reweighted by the clipped importance ratio p_now(m) / p_sampled(m).
        clip: (pg) importance ratios are clipped to [1/clip, clip] (>= 1; inf: no clipping).
        importance_ratio: (pg) reweight a stale sample by its "joint" ratio p_now(m) / p_then(m), or
            each unit's gradient by that unit's own factor of it ("unit"; see pg/estimator.py).
        layer_sharing: (pg, pattern "channels") in [0, 1]: each unit's score gradient is mixed with
            the mean gradient of its layer group, g <- (1 - a) g + a mean_layer(g). With a = 1 the
            scores of a layer move together (learning how many units each layer keeps, while the
            initialisation keeps ranking the units inside it): ~sqrt(units per layer) less noise.
        preconditioner: (pg) "fisher" scales Bernoulli gradients by s(1 - s) (natural gradient;
            pair with optim="sgd"), "adam" leaves the raw gradient to an adaptive optimizer.
        samples_per_step: (pg) sub-models evaluated per forward pass (each batch runs through each);
            with 2 or more, each advantage uses the leave-one-out baseline of the same batch.
        init: (pg) initial keep-probabilities: "wanda" (sigmoid of the z-scored |W| * ||X|| metric,
            shifted to the budget, from `num_samples` calibration sequences) or "uniform".
        init_temperature: (pg) divides the z-scored metric before the sigmoid of the Wanda
            initialisation: below 1 the keep-probabilities start closer to 0/1, so sampled sub-models
            stay near the initial hard mask and only borderline units are explored.
        final_weight_update: (pg) None, or "admm" to refit the kept weights after hardening.
        pg_objective: (pg) "lm": the sampled sub-model's language-modelling loss, learned in a
            Trainer by `SparsityCallback`; "block": masks learned one block at a time by `prune()`,
            the loss being the block output's relative squared error against the dense block on the
            calibration windows (per-weight masks, or channels at the sparsity of each block's own
            parameters; see docs/mask_learning.md).
        pg_block_steps, pg_block_lr, pg_block_windows: (pg, objective "block") score updates per
            block (0: no learning, the Wanda-initialised mask itself), their SGD step size, and
            calibration windows evaluated per update.
        baseline_decay: (pg) decay of the loss baseline's exponential moving average.
        normalize_advantage: (pg) divide the gradient estimate by the running RMS of the advantages
            (loss minus baseline), so that the learning rate, not the loss scale, sets the step size.
            None (default): on for channel masks with pg_objective "block" (each block's error has its
            own scale), off otherwise (what the other settings were measured with).
        harden_scope: (pg) final masks keep the top keep-probabilities "global"ly under the budget
            or within each "layer" (each MLP / attention module, or linear) at the same sparsity, or
            (per-weight masks) within each output "row", Wanda's rule: the initial mask is then Wanda's.
        pg_submodels: (pg) "sliced": each sampled sub-model is built once and reused while stale: a
            channel mask as smaller dense layers, a 2:4 mask as compressed semi-structured sparse
            weights where torch supports them (CUDA, sm80+; elsewhere masked in place); "masked":
            forward hooks zero the units (channels), W0 * m written into the weights (N:M).
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    mask_scope: str | None = None
    prune_ties: bool = False
    # calibration
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    # Hessian-based solvers
    dampening: float | None = None
    block_size: int = 128
    sequential_update: bool = False
    device: str = "auto"
    # ADMM (Boza 2024)
    admm_iterations: int = 20
    admm_rho: float | None = None
    admm_gradual_steps: int = 15
    admm_cg_steps: int = 2
    gradual: bool = True
    mask_init: str = "magnitude"
    weight_update: str | None = None
    # SparseLLM (Bai et al. 2024)
    sparsellm_iterations: int = 4
    alpha: float = 1.0
    beta: float = 100.0
    gamma: float = 10.0
    inner_solver: str = "admm"
    sparsellm_max_memory_gb: float = 16.0
    # policy-gradient mask learning with stale sub-models (method "pg", SparsityCallback)
    refresh_every: int = 1
    clip: float = 2.0
    importance_ratio: str = "joint"
    layer_sharing: float = 0.0
    preconditioner: str = "fisher"
    samples_per_step: int = 1
    init: str = "wanda"
    init_temperature: float = 1.0
    final_weight_update: str | None = None
    pg_objective: str = "lm"
    pg_block_steps: int = 100
    pg_block_lr: float = 0.05
    pg_block_windows: int = 4
    baseline_decay: float = 0.9
    normalize_advantage: bool | None = None
    harden_scope: str = "global"
    pg_submodels: str = "sliced"

    def __post_init__(self) -> None:
        from optimum_sparse.solvers import available_methods

        methods = available_methods()
        if self.method not in methods:
            raise ValueError(f"method {self.method!r} is not registered; choose one of {sorted(methods)}")
        if isinstance(self.pattern, str) and self.pattern.strip().lower() == "unstructured":
            self.pattern = None
        if isinstance(self.pattern, str) and self.pattern.strip().lower() in STRUCTURED_PATTERNS:
            self.pattern = self.pattern.strip().lower()
            if self.method != "pg":
                raise ValueError(
                    f"pattern {self.pattern!r} is learned by method 'pg' (SparsityCallback) only; "
                    f"{self.method!r} prunes unstructured or N:M"
                )
        elif self.pattern is not None:
            n, m = parse_nm(self.pattern)
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity} contradicts pattern {self.pattern!r} (which means sparsity "
                    f"{implied:g}); give only one of them"
                )
            self.pattern = f"{n}:{m}"
            self.sparsity = implied
        if self.sparsity is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a float in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of weights set to zero), got {self.sparsity}")
        self.sparsity = float(self.sparsity)
        if self.mask_scope not in (None, "row", "layer"):
            raise ValueError(f"mask_scope must be None, 'row' or 'layer', got {self.mask_scope!r}")
        if not isinstance(self.prune_ties, bool):
            raise TypeError(f"prune_ties must be true or false, got {self.prune_ties!r}")
        if self.prune_ties and self.nm is not None:
            raise ValueError("prune_ties applies to unstructured sparsity; an N:M pattern keeps exactly N of every M")
        _check_positive_ints(
            self,
            ("num_samples", "seq_len", "block_size", "admm_iterations", "admm_gradual_steps", "sparsellm_iterations"),
        )
        steps = self.admm_cg_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"admm_cg_steps must be a non-negative integer (0: no CG polish), got {steps!r}")
        if self.gradual and self.admm_gradual_steps > self.admm_iterations:
            raise ValueError(
                f"admm_gradual_steps={self.admm_gradual_steps} exceeds "
                f"admm_iterations={self.admm_iterations}: the mask must reach the target sparsity within "
                "the ADMM iterations; lower one or raise the other"
            )
        if self.dampening is not None and not self.dampening > 0:
            raise ValueError(
                f"dampening must be > 0 (fraction of mean diag(H)) or None (the method's default), got {self.dampening}"
            )
        if self.admm_rho is not None and not self.admm_rho > 0:
            raise ValueError(f"admm_rho must be > 0 or None (the method's default), got {self.admm_rho}")
        if self.mask_init not in ("magnitude", "wanda"):
            raise ValueError(f"mask_init must be 'magnitude' or 'wanda', got {self.mask_init!r}")
        if self.weight_update not in (None, "admm"):
            raise ValueError(f"weight_update must be None or 'admm', got {self.weight_update!r}")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not _finite_positive(value):
                raise ValueError(f"{name} (a SparseLLM objective weight) must be a finite number > 0, got {value!r}")
            setattr(self, name, float(value))
        if self.inner_solver not in INNER_SOLVERS:
            raise ValueError(f"inner_solver must be one of {list(INNER_SOLVERS)}, got {self.inner_solver!r}")
        limit = self.sparsellm_max_memory_gb
        if not _finite_positive(limit):
            raise ValueError(f"sparsellm_max_memory_gb must be a finite number of GiB > 0, got {limit!r}")
        self.sparsellm_max_memory_gb = float(limit)
        self._validate_pg()
        if self.device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?|mps)$", self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("targets", "ignore"):
            patterns = getattr(self, name)
            if patterns is None:
                continue
            if isinstance(patterns, str):
                patterns = [patterns]
                setattr(self, name, patterns)
            for regex in patterns:
                try:
                    re.compile(regex)
                except re.error as err:
                    raise ValueError(f"{name}: {regex!r} is not a valid regular expression ({err})") from err

    def _validate_pg(self) -> None:
        _check_positive_ints(self, ("refresh_every", "samples_per_step", "pg_block_windows"))
        steps = self.pg_block_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"pg_block_steps must be a non-negative integer (0: the Wanda start), got {steps!r}")
        if not _finite_positive(self.init_temperature):
            raise ValueError(f"init_temperature must be a finite number > 0, got {self.init_temperature!r}")
        self.init_temperature = float(self.init_temperature)
        if not _finite_positive(self.pg_block_lr):
            raise ValueError(f"pg_block_lr must be a finite number > 0, got {self.pg_block_lr!r}")
        self.pg_block_lr = float(self.pg_block_lr)
        sharing = self.layer_sharing
        if isinstance(sharing, bool) or not isinstance(sharing, (int, float)) or not 0.0 <= sharing <= 1.0:
            raise ValueError(f"layer_sharing must be a number in [0, 1], got {sharing!r}")
        self.layer_sharing = float(sharing)
        if self.layer_sharing > 0 and self.method == "pg" and self.pattern != "channels":
            raise ValueError("layer_sharing applies to pattern 'channels' (its layer groups); set it to 0")
        if self.harden_scope == "row" and self.pattern == "channels":
            raise ValueError("harden_scope='row' is for per-weight masks; channel masks harden 'global' or per 'layer'")
        clip = self.clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 1.0:
            raise ValueError(f"clip bounds importance ratios to [1/clip, clip]: a number >= 1 (or inf), got {clip!r}")
        self.clip = float(clip)
        choices = {
            "preconditioner": PG_PRECONDITIONERS,
            "importance_ratio": PG_RATIOS,
            "init": PG_INITS,
            "pg_objective": PG_OBJECTIVES,
            "harden_scope": HARDEN_SCOPES,
            "pg_submodels": PG_SUBMODELS,
            "final_weight_update": (None, "admm"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        decay = self.baseline_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {decay!r}")
        self.baseline_decay = float(decay)
        if self.normalize_advantage not in (None, True, False):
            raise ValueError(f"normalize_advantage must be true, false or null, got {self.normalize_advantage!r}")

    # ------------------------------------------------------------------ helpers
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) when the pattern is N:M, else None."""
        return parse_nm(self.pattern) if self.pattern and self.pattern not in STRUCTURED_PATTERNS else None

    @property
    def ignore_patterns(self) -> list[str]:
        """User ignores plus the modules that are never pruned (lm_head, embeddings)."""
        return list(DEFAULT_IGNORE) + list(self.ignore)

    def describe(self) -> str:
        """Short human form, e.g. "sparsegpt 2:4" or "wanda 50%"."""
        amount = self.pattern if self.nm else f"{self.sparsity:.0%}"
        if self.pattern in STRUCTURED_PATTERNS:
            amount = f"{self.pattern} {amount}"
        return f"{self.method} {amount}"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        data = dict(data)
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(
                f"this sparsity config has format_version {version}, newer than this library supports "
                f"({FORMAT_VERSION}); upgrade optimum-sparse"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(METADATA_KEYS))
        if unknown:
            logger.warning("ignoring unknown sparsity config keys %s (written by a newer version?)", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **metadata: Any) -> str:
        """Write `sparsity_config.json` (plus optional metadata such as measured sparsity)."""
        os.makedirs(save_directory, exist_ok=True)
        payload = {**self.to_dict(), "format_version": FORMAT_VERSION, **metadata}
        from optimum_sparse import __version__

        payload.setdefault("library_version", __version__)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SparsityConfig:
        """Read `sparsity_config.json` from a local directory (or a path to the file itself)."""
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}; save one with SparsityConfig.save_pretrained(dir)")
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
