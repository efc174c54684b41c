"""Resume a pruning run after a crash: every finished block is recorded, a restart continues after it.

Pruning a 70B model block by block takes hours; losing them to a crash at block 60 of 80 is what users
hit. With a resume directory the engine records, after each block: the block's pruned weights and masks,
the calibration activations the next block needs (pruned and, with block reconstruction, dense), the
run's bookkeeping and the random state. Started again with the same config and model, `prune` checks
that they are the same run (a fingerprint of both), restores the finished blocks and continues at the
first unfinished one, ending with the result an uninterrupted run gives, bit for bit.

Files (each written under a temporary name and renamed into place, so a crash while writing leaves the
previous record intact): `run.json` (fingerprint), `block_N.safetensors` (weights), `masks_N.pt`,
`state.pt` (activations, bookkeeping, random state and the count of finished blocks; written last, so
it is the record of truth) and `progress.json` ({"done": blocks finished}, for people).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from optimum_sparse.blocks import BlockInputs, PruningResult
from optimum_sparse.config import SparsityConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
STATE_FILE = "state.pt"
#: PruningResult fields carried across a restart (masks are stored per block)
_RESULT_FIELDS = ("layer_sparsity", "layer_errors", "block_reports", "budgets", "reconstruction")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the model being pruned: its config and a digest of its first weights."""
    config = getattr(model, "config", None)
    described = config.to_dict() if config is not None else {"class": type(model).__name__}
    described = {k: v for k, v in described.items() if k not in ("_name_or_path", "transformers_version", "dtype")}
    digest = hashlib.sha256()
    for _, tensor in list(model.state_dict().items())[:4]:
        digest.update(tensor.detach().flatten()[:65536].float().cpu().numpy().tobytes())
    return {"config": json.loads(json.dumps(described, default=str)), "weights_sha256": digest.hexdigest()}


def _describe(calibration: Any) -> Any:
    """What identifies the calibration data: a path with its size, a digest of token ids, or its repr."""
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        return {"source": path, "bytes": os.path.getsize(path)} if os.path.isfile(path) else {"source": path}
    if isinstance(calibration, torch.Tensor):
        return {"tokens_sha256": hashlib.sha256(calibration.detach().cpu().numpy().tobytes()).hexdigest()}
    if isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        return {"texts_sha256": hashlib.sha256("\x00".join(calibration).encode()).hexdigest()}
    return {"source": repr(type(calibration).__name__)}


def _atomic(path: str, write) -> None:
    temporary = f"{path}.tmp"
    write(temporary)
    os.replace(temporary, path)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return found


class ResumeLog:
    """The resume directory of one run (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, config: SparsityConfig, model: nn.Module, calibration: Any = None):
        self.directory = os.fspath(directory)
        run = {"config": config.to_dict(), "model": model_fingerprint(model), "calibration": _describe(calibration)}
        self.run = json.loads(json.dumps(run, default=str))

    def finished_blocks(self) -> int:
        """Blocks a previous run finished (0 for a new directory); a different run is refused."""
        os.makedirs(self.directory, exist_ok=True)
        run_path = os.path.join(self.directory, RUN_FILE)
        done = self._done()
        if done == 0:  # nothing finished (or a first attempt that failed early): this run takes the directory
            _atomic(run_path, lambda p: _write_json(p, self.run))
            return 0
        with open(run_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
        differences = _differences(recorded, self.run)
        if differences:
            raise ValueError(
                f"--resume-dir {self.directory} holds another run ({'; '.join(differences[:3])}); resume with "
                "the same config and model, or give a new directory"
            )
        return done

    def _done(self) -> int:
        """Finished blocks, as the last complete state file says (it is written last, in one rename)."""
        path = self._path(STATE_FILE)
        return int(torch.load(path, weights_only=False)["done"]) if os.path.exists(path) else 0

    def record(
        self,
        index: int,
        block: nn.Module,
        layer_names: list[str],
        inputs: BlockInputs | None,
        result: PruningResult,
        dense,
    ) -> None:
        """After block `index`: its weights and masks (of `layer_names`), and what the next block needs."""
        weights = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        _atomic(self._path(f"block_{index}.safetensors"), lambda p: save_file(weights, p))
        masks = {name: result.masks[name] for name in layer_names if name in result.masks}
        _atomic(self._path(f"masks_{index}.pt"), lambda p: torch.save(masks, p))
        state = {
            "done": index + 1,
            "hidden": [h.cpu() for h in inputs.hidden] if inputs is not None else None,
            "dense_hidden": [h.cpu() for h in dense.hidden] if dense is not None else None,
            "result": {name: getattr(result, name) for name in _RESULT_FIELDS},
            "seconds": result.seconds,
            "rng": torch.get_rng_state(),
        }
        _atomic(self._path(STATE_FILE), lambda p: torch.save(state, p))
        _atomic(self._path(PROGRESS_FILE), lambda p: _write_json(p, {"done": index + 1}))

    def restore(
        self, done: int, blocks: nn.ModuleList, inputs: BlockInputs | None, result: PruningResult, dense
    ) -> float:
        """Put the `done` finished blocks back; returns the seconds the earlier run had spent."""
        for index in range(done):
            weights = load_file(self._path(f"block_{index}.safetensors"))
            device = next(blocks[index].parameters()).device
            blocks[index].load_state_dict({k: v.to(device) for k, v in weights.items()})
            for name, mask in torch.load(self._path(f"masks_{index}.pt")).items():
                result.record_mask(name, mask)
        state = torch.load(self._path(STATE_FILE), weights_only=False)
        if inputs is not None:
            device = inputs.hidden[0].device
            inputs.hidden = [h.to(device) for h in state["hidden"]]
        if dense is not None:
            dense.hidden = [h.to(inputs.hidden[0].device) for h in state["dense_hidden"]]
        for name in _RESULT_FIELDS:
            setattr(result, name, state["result"][name])
        torch.set_rng_state(state["rng"])
        logger.info("resuming from %s: %d blocks already pruned", self.directory, done)
        return float(state["seconds"])

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
