"""The files of a pruned checkpoint beside the transformers ones (see docs/format.md).

- `sparsity_masks.safetensors`: one bit-packed uint8 tensor per pruned weight, keyed by the weight's
  parameter name (`model.layers.0.self_attn.q_proj.weight`); the (out, in) shapes live in the file's
  metadata. Bit `i % 8` of byte `i // 8` (little bit order) is entry `i` of the row-major (out, in) mask.
- `sparse_model.safetensors` (compact checkpoints only): every tensor of the state dict, except that a
  pruned weight is replaced by `<name>.weight.kept_values`, its kept entries in the row-major order of the
  (out, in) mask. The mask comes from `sparsity_masks.safetensors`.

Directories are written next to their destination and renamed into place (`save_directory_atomically`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from optimum_sparse.architecture import is_transposed
from optimum_sparse.config import FORMAT_VERSION
from optimum_sparse.masks import pack_mask, unpack_mask

logger = logging.getLogger(__name__)

MASKS_NAME = "sparsity_masks.safetensors"
COMPACT_WEIGHTS_NAME = "sparse_model.safetensors"
MASKS_FORMAT = "optimum-sparse-masks"
COMPACT_FORMAT = "optimum-sparse-compact"
VALUES_SUFFIX = ".kept_values"
TEMP_PREFIX = ".tmp-optimum-sparse-"
# files whose presence says "this directory is a model checkpoint" (safe to replace as a whole)
CHECKPOINT_MARKERS = ("config.json", "sparsity_config.json")


def weight_key(module_name: str) -> str:
    """Parameter name of a pruned module's weight (the key used in both safetensors files)."""
    return f"{module_name}.weight"


def module_name_of(key: str) -> str:
    if not key.endswith(".weight"):
        raise ValueError(f"mask key {key!r} does not name a weight (expected '<module>.weight')")
    return key[: -len(".weight")]


def _check_version(metadata: dict[str, str], expected_format: str, path: str) -> None:
    found = metadata.get("format")
    if found != expected_format:
        raise ValueError(f"{path} is not an optimum-sparse file (format {found!r}, expected {expected_format!r})")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise ValueError(f"{path}: unreadable format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}, newer than this library supports ({FORMAT_VERSION}); "
            "upgrade optimum-sparse"
        )


# ---------------------------------------------------------------------------------------------- masks
def write_masks(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> None:
    """`sparsity_masks.safetensors`: bit-packed (out, in) masks keyed by weight name, shapes in metadata."""
    tensors = {weight_key(name): pack_mask(mask) for name, mask in masks.items()}
    shapes = {weight_key(name): list(mask.shape) for name, mask in masks.items()}
    metadata = {
        "format": MASKS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": "out_in",
        "bitorder": "little",
        "shapes": json.dumps(shapes, sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of `write_masks`: {module name: bool mask (out, in)}."""
    path = os.fspath(path)
    masks: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        _check_version(metadata, MASKS_FORMAT, path)
        if metadata.get("layout", "out_in") != "out_in" or metadata.get("bitorder", "little") != "little":
            raise ValueError(f"{path}: unsupported mask layout {metadata.get('layout')!r}/{metadata.get('bitorder')!r}")
        shapes = json.loads(metadata.get("shapes", "{}"))
        for key in handle.keys():
            if key not in shapes:
                raise ValueError(f"{path}: mask {key!r} has no shape in the file's metadata")
            shape = tuple(int(d) for d in shapes[key])
            packed = handle.get_tensor(key)
            expected = math.ceil(math.prod(shape) / 8)
            if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
                raise ValueError(
                    f"{path}: mask {key!r} should be {expected} packed uint8 bytes for shape {list(shape)}, got "
                    f"{packed.dtype} {list(packed.shape)}"
                )
            masks[module_name_of(key)] = unpack_mask(packed, shape)
    return masks


# ---------------------------------------------------------------------------------------------- compact
def _dedupe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); return (unique tensors, {alias: original})."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state_dict.items():
        ident = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = tensor
    return unique, aliases


def dense_weights_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors take in a dense checkpoint (tied tensors once, headers not counted)."""
    unique, _ = _dedupe(model.state_dict())
    return sum(t.numel() * t.element_size() for t in unique.values())


def write_compact(path: str | os.PathLike, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """`sparse_model.safetensors`: dense tensors, except pruned weights stored as their kept values."""
    unique, aliases = _dedupe(model.state_dict())
    sparse: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    transposed = {weight_key(name): is_transposed(model.get_submodule(name)) for name in masks}
    for key, tensor in unique.items():
        tensor = tensor.detach()
        if key not in transposed:
            tensors[key] = tensor.cpu().contiguous()
            continue
        mask = masks[module_name_of(key)]
        out_in = tensor.t() if transposed[key] else tensor
        tensors[key + VALUES_SUFFIX] = out_in.cpu()[mask].contiguous()
        sparse[key] = {"shape": list(tensor.shape), "transposed": transposed[key]}
    missing = sorted(set(transposed) - set(sparse))
    if missing:
        raise ValueError(f"pruned weights {missing} are not in the model's state dict (aliased or renamed?)")
    metadata = {
        "format": COMPACT_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sparse": json.dumps(sparse, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def read_compact(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full state dict of a compact checkpoint, pruned weights rebuilt from kept values and masks."""
    path = os.fspath(path)
    state_dict: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        _check_version(metadata, COMPACT_FORMAT, path)
        sparse = json.loads(metadata.get("sparse", "{}"))
        aliases = json.loads(metadata.get("aliases", "{}"))
        for key in handle.keys():
            if not key.endswith(VALUES_SUFFIX):
                state_dict[key] = handle.get_tensor(key)
                continue
            name = key[: -len(VALUES_SUFFIX)]
            info = sparse.get(name)
            module = module_name_of(name)
            if info is None:
                raise ValueError(f"{path}: {key!r} has no entry in the file's 'sparse' metadata")
            if module not in masks:
                raise ValueError(f"{path} stores the pruned weight {name!r} but {MASKS_NAME} has no mask for it")
            mask = masks[module]
            shape = tuple(info["shape"])
            out_in = (shape[1], shape[0]) if info["transposed"] else shape
            if tuple(mask.shape) != out_in:
                raise ValueError(
                    f"mask for {module} has shape {list(mask.shape)} but {path} stores a weight of (out, in) shape "
                    f"{list(out_in)}"
                )
            values = handle.get_tensor(key)
            kept = int(mask.sum())
            if values.numel() != kept:
                raise ValueError(f"{path}: {key!r} holds {values.numel()} values but its mask keeps {kept} weights")
            dense = values.new_zeros(out_in)
            dense[mask] = values
            state_dict[name] = dense.t().contiguous() if info["transposed"] else dense
    for alias, original in aliases.items():
        state_dict[alias] = state_dict[original]
    return state_dict


# ---------------------------------------------------------------------------------------------- directories
def directory_bytes(directory: str | os.PathLike, names: list[str] | None = None) -> int:
    """Total size of the files in a directory (or of the given names in it)."""
    directory = os.fspath(directory)
    names = names if names is not None else os.listdir(directory)
    return sum(os.path.getsize(os.path.join(directory, n)) for n in names if os.path.isfile(os.path.join(directory, n)))


def _make_sibling_dir(parent: str) -> str:
    """A new empty directory in `parent` with the permissions of `os.mkdir` (umask applied).

    Not `tempfile.mkdtemp`: its directories are 0700, and the renamed checkpoint would keep that mode,
    unreadable to anyone else sharing the models.
    """
    while True:
        path = os.path.join(parent, TEMP_PREFIX + secrets.token_hex(6))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def save_directory_atomically(output: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Run `write(tmp)` into a fresh sibling directory, then swap it in for `output`.

    A failure inside `write` leaves `output` exactly as it was (absent, or with its old contents). An
    existing non-empty `output` is replaced as a whole when it looks like a checkpoint (it holds a
    config.json or sparsity_config.json) or when `overwrite` is set; otherwise nothing is written, so that
    a mistyped path cannot wipe unrelated files.
    """
    output = os.path.abspath(os.fspath(output))
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output!r} is a file, not a directory; choose another path")
    cwd = os.getcwd()
    if os.path.commonpath([cwd, output]) == output:  # the process would be left in a deleted directory
        raise ValueError(f"cannot replace {output!r}: it is (or contains) the current working directory")
    existing = os.path.isdir(output) and bool(os.listdir(output))
    if existing and not overwrite and not any(os.path.exists(os.path.join(output, m)) for m in CHECKPOINT_MARKERS):
        raise FileExistsError(
            f"{output!r} is not empty and does not look like a model checkpoint; saving would replace its contents. "
            "Choose an empty or new directory, or pass overwrite=True"
        )
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_sibling_dir(parent)
    old = None
    try:
        write(tmp)
        if os.path.exists(output):
            old = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
            os.rmdir(old)
            os.replace(output, old)
        try:
            os.replace(tmp, output)
        except OSError:
            if old is not None:  # put the old directory back
                os.replace(old, output)
                old = None
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.exists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)


@dataclass
class CheckpointInfo:
    """What `SparseModel.save_pretrained` wrote."""

    directory: str
    format: str  # "dense" or "compact"
    total_bytes: int  # every file in the directory (tokenizer and model card included)
    weights_bytes: int  # the weight files (and, for compact, the masks they need)
    dense_weights_bytes: int  # the model's tensors stored densely (what a dense checkpoint's weights take)

    @property
    def ratio(self) -> float:
        """weights_bytes / dense_weights_bytes (below 1 for a compact checkpoint of a sparse model)."""
        return self.weights_bytes / max(self.dense_weights_bytes, 1)
