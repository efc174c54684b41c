"""`SparsityConfig`: what to prune, how much, and with which method.

A JSON-serialisable dataclass in the spirit of `peft.LoraConfig`. It holds the settings every run has
(method, sparsity or pattern, which layers, calibration windows, device) and, in `settings`, those of
the methods the run uses: each method declares its own (`Solver.options`, see
`optimum_sparse.options`), and the config asks the registry to check them. Method settings are passed
and read flat, as before (`SparsityConfig(method="admm", admm_rho=2)`, `config.admm_rho`), and
`sparsity_config.json` stays one flat object, so files written by earlier versions load unchanged.
Validation happens on construction so that a typo fails before a model is loaded or a calibration
pass is spent.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from optimum_sparse import registry
from optimum_sparse.options import finite_positive, in_interval, one_of, positive_int
from optimum_sparse.recipes import recipe_rule
from optimum_sparse.version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "sparsity_config.json"
FORMAT_VERSION = 1

# Keys that `sparsity_config.json` may carry beside the config fields (written by the library).
METADATA_KEYS = (
    "format_version",
    "library_version",
    "measured_sparsity",
    "measured_layer_sparsity",  # per layer; files before layer budgets called it "layer_sparsity"
    "block_sparsity",  # measured per block
    "metrics",
    "checkpoint",  # saved by SparseModel: {"format": "dense" | "compact", "masks_file": ..., "weights_file": ...}
    "base_model",
    "calibration",
    "command",  # the shell command that made the model (optimum-sparse prune ...)
    "fine_tuned",  # true when the pruned model was trained afterwards (SparseFineTuneCallback)
)

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

#: non-N:M patterns; "unstructured" is stored as None, "channels" (MLP channels + attention KV groups) is
#: offered by the methods that list it in `Solver.patterns`
STRUCTURED_PATTERNS = ("channels",)

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


@dataclass(init=False)
class SparsityConfig:
    """Configuration of a pruning run.

    Args:
        method: registered solver name (see `optimum_sparse.available_methods()`).
        sparsity: fraction of weights set to zero in every pruned layer, in [0, 1). Implied by
            `pattern` when that is N:M.
        pattern: None or "unstructured", "N:M" (keep N of every M consecutive input weights), or, for
            methods that offer it (pg), "channels" (MLP intermediate channels and attention KV
            groups, budget counted in parameters).
        targets: regexes (``re.search`` on full module names); only matching linears inside the
            decoder blocks are pruned. None prunes every linear in every block.
        ignore: regexes of module names never pruned. lm_head and embeddings are always skipped.
        mask_scope: "row" compares weights within each output row, "layer" across the whole layer.
            None picks the method's default (magnitude: layer, wanda: row).
        num_samples: calibration windows drawn from the calibration text.
        seq_len: tokens in each calibration window.
        seed: seed of the window offsets, so a config reproduces its calibration set.
        sequential_update: calibrate each group of linears on the outputs of already-pruned
            earlier sub-layers of the same block (more forward passes, better quality).
        device: where blocks are processed ("auto": CUDA if present, else CPU).
        weight_update: a method that refits the kept weights after any method's mask selection
            ("admm").
        sparsity_profile: how `sparsity` is spread over the blocks: None / "uniform" (every layer at
            `sparsity`) or "owl" (Outlier Weighed Layerwise sparsity: fewer zeros in blocks with
            more outlier features, mean still `sparsity`; see `optimum_sparse.budgets`). Unstructured
            only.
        owl_m, owl_lambda: OWL's outlier threshold (a score above M x the block mean is an outlier)
            and the spread of the budgets (block sparsities lie within `sparsity` +- 2 x lambda).
        layer_sparsity: explicit budgets instead: one sparsity per block (a list), or
            {regex: sparsity} over module names (first match wins; other layers keep `sparsity`).
        reconstruction: None or "block": once a block's masks are chosen (by any method), fit its
            kept weights, masks fixed, so that the block reproduces the dense block's output on the
            calibration windows (`optimum_sparse.reconstruction`).
        reconstruction_inputs: "pruned" (the pruned model's activations: later blocks also correct
            earlier errors) or "dense" (the dense model's).
        reconstruction_epochs, reconstruction_lr: passes over the training windows, Adam step size.
        reconstruction_holdout: share of the calibration windows held out; their error picks the
            best epoch and stops training after `reconstruction_patience` epochs without improvement.
        settings: the same, as a dict (what `dataclasses.replace` and `asdict` hand back).
        **method_settings: the settings of the methods the run uses (`method`, `weight_update`, and what
            they call, such as SparseLLM's inner solver), each documented where its method declares
            it (`optimum_sparse.solvers.<method>`; `available_settings()` lists them all). A setting
            of a method the run does not use is an error naming that method.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    mask_scope: str | None = None
    # calibration
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    sequential_update: bool = False
    device: str = "auto"
    weight_update: str | None = None
    # layer budgets (optimum_sparse.budgets)
    sparsity_profile: str | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    layer_sparsity: list[float] | dict[str, float] | None = None
    # block reconstruction (optimum_sparse.reconstruction)
    reconstruction: str | None = None
    reconstruction_inputs: str = "pruned"
    reconstruction_epochs: int = 8
    reconstruction_lr: float = 1e-4
    reconstruction_holdout: float = 0.125
    reconstruction_patience: int = 2
    #: the used methods' settings, defaults filled in ({name: value}; read as attributes too)
    settings: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        method: str = "sparsegpt",
        sparsity: float | None = None,
        pattern: str | None = None,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        mask_scope: str | None = None,
        *,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        sequential_update: bool = False,
        device: str = "auto",
        weight_update: str | None = None,
        sparsity_profile: str | None = None,
        owl_m: float = 5.0,
        owl_lambda: float = 0.08,
        layer_sparsity: list[float] | dict[str, float] | None = None,
        reconstruction: str | None = None,
        reconstruction_inputs: str = "pruned",
        reconstruction_epochs: int = 8,
        reconstruction_lr: float = 1e-4,
        reconstruction_holdout: float = 0.125,
        reconstruction_patience: int = 2,
        settings: dict[str, Any] | None = None,
        **method_settings: Any,
    ) -> None:
        values = dict(locals())
        for name in _COMMON_FIELDS:
            object.__setattr__(self, name, values[name])
        object.__setattr__(self, "ignore", [] if ignore is None else ignore)
        object.__setattr__(self, "settings", {})
        self._validate_common()
        self._resolve_settings({**(settings or {}), **method_settings})
        self._validate_selection()
        object.__setattr__(self, "_ready", True)

    # ------------------------------------------------------------------ validation
    def _validate_common(self) -> None:
        methods = registry.available_methods()
        if self.method not in methods:
            raise ValueError(f"method {self.method!r} is not registered; choose one of {sorted(methods)}")
        self._normalise_pattern()
        if self.sparsity is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a float in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of weights set to zero), got {self.sparsity}")
        self.sparsity = float(self.sparsity)
        if self.mask_scope not in (None, "row", "layer"):
            raise ValueError(f"mask_scope must be None, 'row' or 'layer', got {self.mask_scope!r}")
        for name in ("num_samples", "seq_len"):
            positive_int()(name, getattr(self, name))
        self._validate_budgets()
        self._validate_reconstruction()
        refitters = [name for name in methods if getattr(registry.get_solver_class(name), "can_refit", False)]
        if self.weight_update is not None and self.weight_update not in refitters:
            choices = " or ".join(map(repr, refitters))
            raise ValueError(f"weight_update must be None or {choices}, got {self.weight_update!r}")

    def _validate_reconstruction(self) -> None:
        if self.reconstruction not in (None, "block"):
            raise ValueError(f"reconstruction must be None or 'block', got {self.reconstruction!r}")
        one_of(("pruned", "dense"))("reconstruction_inputs", self.reconstruction_inputs)
        positive_int()("reconstruction_epochs", self.reconstruction_epochs)
        positive_int()("reconstruction_patience", self.reconstruction_patience)
        finite_positive()("reconstruction_lr", self.reconstruction_lr)
        in_interval(0.0, 0.5, closed_high=False)("reconstruction_holdout", self.reconstruction_holdout)

    def _validate_budgets(self) -> None:
        if isinstance(self.sparsity_profile, str) and self.sparsity_profile.lower() == "uniform":
            self.sparsity_profile = None
        if self.sparsity_profile not in (None, "owl"):
            raise ValueError(f"sparsity_profile must be None, 'uniform' or 'owl', got {self.sparsity_profile!r}")
        finite_positive("a number > 0 (scores above owl_m x the block mean count as outliers)")("owl_m", self.owl_m)
        in_interval(0.0, 0.5, closed_high=False)("owl_lambda", self.owl_lambda)
        budgets = self.layer_sparsity
        if budgets is not None:
            if self.sparsity_profile is not None:
                raise ValueError("give either sparsity_profile or layer_sparsity (explicit budgets), not both")
            if isinstance(budgets, dict):
                values = list(budgets.values())
                for regex in budgets:
                    try:
                        re.compile(regex)
                    except (re.error, TypeError) as err:
                        raise ValueError(
                            f"layer_sparsity: {regex!r} is not a valid regular expression ({err})"
                        ) from err
            elif isinstance(budgets, (list, tuple)):
                values = list(budgets)
                if not values:
                    raise ValueError("layer_sparsity is an empty list: give one sparsity per block, or leave it out")
            else:
                raise TypeError(
                    f"layer_sparsity must be a list (one sparsity per block) or a {{regex: sparsity}} dict, got {budgets!r}"
                )
            for value in values:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                    raise ValueError(f"layer_sparsity values must be fractions in [0, 1), got {value!r}")
        if (self.sparsity_profile or budgets is not None) and self.pattern is not None:
            raise ValueError(
                f"layer budgets give each block its own sparsity, which pattern {self.pattern!r} fixes for every "
                "layer; prune unstructured (no pattern) to use sparsity_profile or layer_sparsity"
            )

    def _normalise_pattern(self) -> None:
        if isinstance(self.pattern, str) and self.pattern.strip().lower() == "unstructured":
            self.pattern = None
        if isinstance(self.pattern, str) and self.pattern.strip().lower() in STRUCTURED_PATTERNS:
            self.pattern = self.pattern.strip().lower()
            offering = [m for m in registry.available_methods() if self.pattern in _patterns_of(m)]
            if self.pattern not in _patterns_of(self.method):
                raise ValueError(
                    f"pattern {self.pattern!r} is learned by method {' or '.join(map(repr, offering))} "
                    f"(SparsityCallback) only; {self.method!r} prunes unstructured or N:M"
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

    def _resolve_settings(self, given: dict[str, Any]) -> None:
        """Check `given` against the options of the methods this run uses and fill in their defaults."""
        owners = registry.option_owners()
        unknown = sorted(set(given) - set(owners))
        if unknown:
            hints = {
                name: difflib.get_close_matches(name, list(owners) + list(_COMMON_FIELDS), n=1) for name in unknown
            }
            described = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
            raise TypeError(f"SparsityConfig has no setting {described}; settings are {sorted(owners)}")
        used = registry.methods_used(self.method, self.weight_update, given)
        for name in given:
            if not set(owners[name]) & set(used):
                belongs = " or ".join(map(repr, owners[name]))
                raise ValueError(
                    f"{name} is a setting of method {belongs}, which this run does not use (it uses "
                    f"{', '.join(map(repr, used))}); remove it, or choose that method (or weight_update)"
                )
        for method in used:
            for option in registry.options_of(method):
                if option.name not in self.settings:
                    self.settings[option.name] = option.validate(given.get(option.name, option.default))

    def _validate_selection(self) -> None:
        for method in registry.methods_used(self.method, self.weight_update, self.settings):
            registry.get_solver_class(method).check_settings(self)
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

    # ------------------------------------------------------------------ method settings as attributes
    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: method settings (given or default), read flat
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        option = registry.find_option(name)
        if option is not None:  # a setting of a method this run does not use: its declared default
            return option.default
        raise AttributeError(f"{type(self).__name__!s} has no attribute or setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # after construction an assignment is checked like a constructor argument, and changing the
        # method (or an inner solver) re-selects the settings the run holds
        known = name in _COMMON_FIELDS or registry.find_option(name) is not None
        if not self.__dict__.get("_ready") or not known:
            object.__setattr__(self, name, value)
            return
        self.__dict__.update({k: v for k, v in self.replace(**{name: value}).__dict__.items() if k != "_ready"})

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also a config pickled by a version that kept every setting as a field."""
        if "settings" not in state:
            state = SparsityConfig.from_dict(state).__dict__
        self.__dict__.update(state)

    def replace(self, **changes: Any) -> SparsityConfig:
        """A copy with `changes` applied; settings of methods the new run no longer uses are dropped."""
        data = {**self._common(), **self.settings, **changes}
        common = {k: v for k, v in data.items() if k in _COMMON_FIELDS}
        given = {k: v for k, v in data.items() if k not in _COMMON_FIELDS}
        unused = _unused_settings(common, given)
        return SparsityConfig(**common, **{k: v for k, v in given.items() if k not in unused or k in changes})

    # ------------------------------------------------------------------ helpers
    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) when the pattern is N:M, else None."""
        return parse_nm(self.pattern) if self.pattern and self.pattern not in STRUCTURED_PATTERNS else None

    @property
    def ignore_patterns(self) -> list[str]:
        """User ignores plus the modules that are never pruned (lm_head, embeddings)."""
        return list(DEFAULT_IGNORE) + list(self.ignore)

    def block_budgets_phrase(self) -> str | None:
        """"per-block budgets 30%-70%" when explicit budgets give every block its own sparsity (a list),
        else None: describe() (the log, the progress bar, the card's title) and the card's target row
        then name the spread instead of `sparsity`, a default that applies to no block."""
        if not isinstance(self.layer_sparsity, list):
            return None
        return f"per-block budgets {min(self.layer_sparsity):.0%}-{max(self.layer_sparsity):.0%}"

    def describe(self) -> str:
        """Short human form, e.g. "sparsegpt 2:4" or "wanda 50%"."""
        amount = self.pattern if self.nm else f"{self.sparsity:.0%}"
        if self.pattern in STRUCTURED_PATTERNS:
            amount = f"{self.pattern} {amount}"
        if self.sparsity_profile:
            amount += f" {self.sparsity_profile}"
        elif (budgets := self.block_budgets_phrase()) is not None:
            amount = budgets
        elif self.layer_sparsity is not None:
            amount += " (layer budgets)"
        if self.reconstruction:
            amount += f" +{self.reconstruction} reconstruction"
        return f"{self.method} {amount}"

    @classmethod
    def recipe(cls, name: str, sparsity: float | str = 0.5, **overrides: Any) -> SparsityConfig:
        """The settings of preset `name` (optimum_sparse/recipes.py) at `sparsity`, with `overrides` on top.

        `sparsity` is a fraction (0.5) or an N:M pattern ("2:4"). `SparsityConfig.recipe("best", 0.7)`
        is the method and settings that measured best at 70% (docs/quality.md); a keyword given here
        wins over the preset, as an explicit flag does over `--recipe` on the command line.
        """
        clash = sorted({"sparsity", "pattern"} & set(overrides))
        if clash:
            raise ValueError(f"give the sparsity as recipe()'s `sparsity` argument (0.5 or '2:4'), not as {clash}")
        if isinstance(sparsity, str):
            amount: dict[str, Any] = {"pattern": sparsity, "sparsity": None}
        else:
            amount = {"sparsity": float(sparsity)}
        rule = recipe_rule(name, amount.get("sparsity"), amount.get("pattern"))  # refuses "channels" and the like
        logger.info("recipe %s at %s: %s", name, sparsity, rule.reason)
        return cls(**{**rule.settings, **amount, **overrides})

    @classmethod
    def field_names(cls) -> list[str]:
        """Every name a config accepts: the common fields and every registered method's settings."""
        return sorted(set(_COMMON_FIELDS) | set(registry.option_owners()))

    # ------------------------------------------------------------------ (de)serialisation
    def _common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _COMMON_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """One flat dict: the common fields and the used methods' settings (as earlier versions wrote it)."""
        return json.loads(json.dumps({**self._common(), **self.settings}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        """Read a flat dict; settings of methods the run does not use are dropped (older files hold all)."""
        data = dict(data)
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(
                f"this sparsity config has format_version {version}, newer than this library supports "
                f"({FORMAT_VERSION}); upgrade optimum-sparse"
            )
        owners = registry.option_owners()
        unknown = sorted(set(data) - set(_COMMON_FIELDS) - set(owners) - set(METADATA_KEYS) - {"settings"})
        if unknown:
            logger.warning("ignoring unknown sparsity config keys %s (written by a newer version?)", unknown)
        data = {**(data.pop("settings", None) or {}), **data}  # the nested form of dataclasses.asdict too
        old_metadata = "measured_sparsity" in data and "measured_layer_sparsity" not in data
        if old_metadata and isinstance(data.get("layer_sparsity"), dict):
            # a file from before layer budgets kept the measured per-layer sparsity under this name (a dict
            # of module names); a list was never written there, so a list is always a budget
            data.pop("layer_sparsity")
            logger.warning(
                "reading 'layer_sparsity' as the measured sparsity of a file written before layer budgets "
                "(it has measured_sparsity but no measured_layer_sparsity); to use it as budgets, remove "
                "measured_sparsity from the file"
            )
        common = {k: v for k, v in data.items() if k in _COMMON_FIELDS}
        given = {k: v for k, v in data.items() if k in owners}
        unused = _unused_settings(common, given)
        changed = sorted(k for k in unused if given[k] != registry.find_option(k).default)
        if changed:
            logger.warning("ignoring settings %s of methods this run (%s) does not use", changed, common.get("method"))
        return cls(**common, **{k: v for k, v in given.items() if k not in unused})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: str | os.PathLike, **metadata: Any) -> str:
        """Write `sparsity_config.json` (plus optional metadata such as measured sparsity)."""
        os.makedirs(save_directory, exist_ok=True)
        payload = {**self.to_dict(), "format_version": FORMAT_VERSION, **metadata}
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


_COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(SparsityConfig) if f.name != "settings")


def _unused_settings(common: dict[str, Any], given: dict[str, Any]) -> set[str]:
    """Names in `given` that no method of the run `common` describes declares (none if that run is invalid:
    the constructor then says what is wrong with it)."""
    owners = registry.option_owners()
    try:
        used = registry.methods_used(common.get("method", "sparsegpt"), common.get("weight_update"), given)
    except (TypeError, ValueError):
        return set()
    return {name for name in given if name in owners and not set(owners[name]) & set(used)}


def _patterns_of(method: str) -> tuple[str, ...]:
    return tuple(getattr(registry.get_solver_class(method), "patterns", ()))
