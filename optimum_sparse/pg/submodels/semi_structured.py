"""2:4 sub-models instantiated as compressed semi-structured sparse weights (CUDA), cached while stale.

Policy gradients on stale sub-models (see `optimum_sparse.pg`) reuse a sampled sub-model for
`refresh_every` steps, which pays when instantiating one costs something. For a 2:4 mask on an
Ampere-or-newer GPU that instantiation is real: `torch.sparse.to_sparse_semi_structured(W0 * m)`
compresses each masked weight into its kept values plus metadata, and the sparse tensor-core matmul
then runs the forward pass on half the weights. Activating a sample swaps the compressed weights in
as the layers' `weight` parameters; the dense parameters are put back on `deactivate`, and the
most recent `capacity` compressed sub-models stay cached (keyed by a digest of the sample), so a
stale sample, or alternating between the samples of one step, never compresses twice.

Where torch cannot compress a layer (CPU tensors, float64, a shape the kernel rejects, a GPU older
than sm80) that layer falls back to masking in place (W0 * m written into the dense weight, as
`masking.WeightMasker` does), decided once per layer at the first activation and logged; the
sub-model computes the same function either way.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from optimum_sparse.pg.submodels.masking import WeightMasker

logger = logging.getLogger(__name__)

Converter = Callable[[torch.Tensor], torch.Tensor]


def default_converter() -> Converter | None:
    """torch's 2:4 compressor, or None when this torch has none."""
    return getattr(torch.sparse, "to_sparse_semi_structured", None)


class SemiStructuredMasker:
    """Instantiates 2:4 sub-models of `modules` as compressed weights where torch can, masked elsewhere.

    Args:
        modules: {name: linear} whose weights the masks cover ((out, in) masks, 2 of every 4 inputs kept).
        capacity: how many compressed sub-models stay cached (the samples of one step).
        converter: dense (masked) weight -> compressed weight; `torch.sparse.to_sparse_semi_structured`
            by default (tests pass their own to check the swapping on CPU).

    `instantiations` counts the compressed sub-models built, `seconds` the time spent building them,
    `compressed_layers` / `masked_layers` name the layers of each kind once decided; the latter are
    masked in place by a `WeightMasker`.
    """

    def __init__(self, modules: dict[str, nn.Module], capacity: int = 1, converter: Converter | None = None):
        self.modules = modules
        self.capacity = max(1, int(capacity))
        self.converter = converter if converter is not None else default_converter()
        self.parameters = {name: module.weight for name, module in modules.items()}  # the dense parameters
        self.in_place = WeightMasker({})  # the layers torch refuses to compress, once known
        self.compressed_layers: list[str] | None = None
        self.masked_layers: list[str] = []
        self.cache: OrderedDict[bytes, dict[str, nn.Parameter]] = OrderedDict()
        self.is_active = False
        self.instantiations = 0
        self.seconds = 0.0

    @torch.no_grad()
    def _build(self, masks: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
        """Compressed W0 * m of every compressible layer; the first call finds out which those are."""
        start = time.perf_counter()
        deciding = self.compressed_layers is None
        built, refused = {}, {}
        for name in self.parameters if deciding else self.compressed_layers:
            module, parameter = self.modules[name], self.parameters[name]
            reason = self._refusal(module)
            if reason is not None:
                refused[name] = reason
                continue
            masked = (parameter.detach() * masks[name].to(parameter.device, parameter.dtype)).contiguous()
            try:
                built[name] = nn.Parameter(self.converter(masked), requires_grad=False)
            except (RuntimeError, ValueError, NotImplementedError) as error:
                if not deciding:
                    raise
                refused[name] = str(error).splitlines()[0] if str(error) else type(error).__name__
        if deciding:
            self._record_decision(list(built), refused)
        if built and next(iter(built.values())).is_cuda:
            torch.cuda.synchronize()
        if built:
            self.seconds += time.perf_counter() - start
            self.instantiations += 1
        return built

    def _refusal(self, module: nn.Module) -> str | None:
        """Why `module` is masked in place without even trying to compress it (None: try)."""
        if self.converter is None:
            return "this torch has no torch.sparse.to_sparse_semi_structured"
        if type(module) is not nn.Linear:  # Conv1D keeps (in, out) weights: 2:4 would run along outputs
            return f"{type(module).__name__} is not an nn.Linear"
        return None

    def _record_decision(self, compressed: list[str], refused: dict[str, str]) -> None:
        """The refused layers are masked in place from now on (a `WeightMasker` keeps their dense weights)."""
        self.in_place = WeightMasker({name: self.modules[name] for name in refused})
        self.compressed_layers, self.masked_layers = compressed, list(refused)
        if refused:
            logger.info(
                "2:4 sub-models: %d of %d layers compressed (semi-structured), %d masked in place (%s)",
                len(compressed),
                len(self.parameters),
                len(refused),
                next(iter(refused.values())),
            )
        else:
            logger.info("2:4 sub-models: all %d layers compressed (semi-structured)", len(compressed))

    @torch.no_grad()
    def activate(self, masks: dict[str, torch.Tensor], key: bytes | None = None) -> None:
        """Make the modules compute W0 * masks; `key` (e.g. `sample_digest`) lets the compressed copy be reused."""
        built = self.cache.get(key) if key is not None else None
        if built is None:
            built = self._build(masks)
            if key is not None:
                self.cache[key] = built
                while len(self.cache) > self.capacity:
                    self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        for name, parameter in built.items():
            self.modules[name].weight = parameter
        self.in_place.activate(masks)
        self.is_active = True

    @torch.no_grad()
    def deactivate(self) -> None:
        """The dense parameters back in the modules (the compressed sub-models stay cached)."""
        if not self.is_active:
            return
        for name, parameter in self.parameters.items():
            self.modules[name].weight = parameter
        self.in_place.deactivate()
        self.is_active = False

    def remove(self) -> None:
        """Dense parameters back in the modules; the cache and the dense copies forgotten."""
        self.deactivate()
        self.cache.clear()
        self.in_place.remove()
