"""The files of a `SparseModel` checkpoint directory (docs/format.md): written, read back, uploaded.

`SparseModel.save_pretrained` writes the weights (a plain transformers checkpoint, or kept values +
bitmasks), the masks file and sparsity_config.json through here, then adds the tokenizer and the model
card; `SparseModel.from_pretrained` reads the record and the model back through here. Keeping the file
layout out of `optimum_sparse.modeling` leaves that module with the wrapper and its orchestration.

A model trained with a sparsity callback has its dense checkpoint written by transformers' own
`save_pretrained` (`Trainer.save_model`); `add_sparse_files` then adds the masks file, the record and
the card beside it, the record last, and `remove_sparse_files` clears an earlier record first.
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optimum_sparse.checkpoint import (
    COMPACT_WEIGHTS_NAME,
    MASKS_NAME,
    TEMP_PREFIX,
    read_compact,
    read_masks,
    write_compact,
    write_masks,
)
from optimum_sparse.config import CONFIG_NAME, SparsityConfig
from optimum_sparse.loading import is_hub_id, model_class, restore_generation_config

logger = logging.getLogger(__name__)

#: the files a SparseModel checkpoint adds to a transformers one; the record (sparsity_config.json) first
SPARSE_FILES = (CONFIG_NAME, MASKS_NAME, COMPACT_WEIGHTS_NAME)

# True while `write_model_files` has the model save itself: the caller writes the SparseModel files, so a
# model whose `save_pretrained` adds them (optimum_sparse.callbacks) writes only the transformers ones then
_WRITING_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("optimum_sparse_writing", default=False)


def writing_checkpoint() -> bool:
    """Whether the model is being saved by `write_model_files`, whose caller writes the SparseModel files."""
    return _WRITING_CHECKPOINT.get()


def _checkpoint_record(compact: bool) -> dict[str, Any]:
    """The `checkpoint` entry of sparsity_config.json (the weights file is added for a compact one)."""
    return {"format": "compact" if compact else "dense", "masks_file": MASKS_NAME}


def write_model_files(
    directory: str, model: nn.Module, masks: dict[str, torch.Tensor], compact: bool, **kwargs: Any
) -> tuple[dict[str, Any], list[str]]:
    """Write the weights and the masks file into `directory`.

    A compact checkpoint is rebuilt from its config when loaded, so the config records the exact class
    and dtype. `kwargs` go to transformers' `save_pretrained` (dense format only).

    Returns:
        the `checkpoint` record of sparsity_config.json, and the names of the weight files written.
    """
    checkpoint = _checkpoint_record(compact)
    if compact:
        write_compact(os.path.join(directory, COMPACT_WEIGHTS_NAME), model, masks)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.dtype = next(model.parameters()).dtype
        config.save_pretrained(directory)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and model.can_generate():
            generation_config.save_pretrained(directory)
        checkpoint["weights_file"] = COMPACT_WEIGHTS_NAME
        weight_files = [COMPACT_WEIGHTS_NAME]
    else:
        token = _WRITING_CHECKPOINT.set(True)
        try:
            model.save_pretrained(directory, **kwargs)
        finally:
            _WRITING_CHECKPOINT.reset(token)
        weight_files = [n for n in os.listdir(directory) if n.startswith("model") and ".safetensors" in n]
    write_masks(os.path.join(directory, MASKS_NAME), masks)
    return checkpoint, weight_files


def write_sparsity_record(
    directory: str,
    config: SparsityConfig,
    masks: dict[str, torch.Tensor],
    layer_sparsity: dict[str, float],
    checkpoint: dict[str, Any],
    *,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    calibration: str | None = None,
    command: str | None = None,
    fine_tuned: bool = False,
) -> float:
    """Write sparsity_config.json: the config plus what loading and the model card need to know.

    Beside the config it records the sparsity measured on the saved weights (per layer and over all
    pruned layers, weighted by size), the `checkpoint` record of `write_model_files`, and the metrics and
    provenance when there are any. Returns the overall measured sparsity.
    """
    numel = sum(mask.numel() for mask in masks.values())
    measured = sum(layer_sparsity[n] * m.numel() for n, m in masks.items()) / max(numel, 1)
    blocks: dict[str, list[int]] = {}
    for name, mask in masks.items():
        found = re.match(r"^(.*?\.\d+)\.", name)  # "model.layers.3.mlp.down_proj" -> "model.layers.3"
        block = found.group(1) if found else name
        counts = blocks.setdefault(block, [0, 0])
        counts[0] += int(round(layer_sparsity[name] * mask.numel()))
        counts[1] += mask.numel()
    metadata: dict[str, Any] = {
        "measured_sparsity": measured,
        "measured_layer_sparsity": layer_sparsity,
        "block_sparsity": {block: zeros / total for block, (zeros, total) in blocks.items()},
        "checkpoint": checkpoint,
    }
    provenance = dict(
        metrics=metrics, base_model=base_model, calibration=calibration, command=command, fine_tuned=fine_tuned
    )
    metadata.update({key: value for key, value in provenance.items() if value})  # only what is known
    config.save_pretrained(directory, **metadata)
    return measured


def remove_sparse_files(directory: str) -> list[str]:
    """Delete the SparseModel files from `directory`, sparsity_config.json first; returns the names removed.

    Called before new weights are saved into a directory that may hold an earlier SparseModel checkpoint,
    so that its record never describes weights it was not written for. Other files are left alone.
    """
    removed = []
    for name in SPARSE_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def add_sparse_files(
    directory: str, masks: dict[str, torch.Tensor], write_record: Callable[[str, dict[str, Any]], None]
) -> None:
    """Add the masks file and the record to `directory`, which already holds the model's dense checkpoint.

    The masks file and whatever `write_record(stage, checkpoint record)` writes (sparsity_config.json, the
    model card) go into a fresh folder inside `directory` first, then are moved in one by one with
    sparsity_config.json last: the directory claims to be a SparseModel checkpoint only once every other
    file is in place. A failure leaves the plain transformers checkpoint, which `SparseModel.from_pretrained`
    refuses with its usual message, never a record without its masks.
    """
    stage = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        write_masks(os.path.join(stage, MASKS_NAME), masks)
        write_record(stage, _checkpoint_record(compact=False))
        for name in sorted(os.listdir(stage), key=lambda name: name == CONFIG_NAME):
            os.replace(os.path.join(stage, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def upload_checkpoint(
    save: Callable[[str], Any],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create the Hub repo (and branch), let `save` write the checkpoint into a temporary folder, upload it.

    Saving first to a local folder reuses the atomic, validated `save_pretrained` path for the Hub too.
    Returns what `huggingface_hub.HfApi.upload_folder` returns.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision is not None and not create_pr:  # upload_folder fails on a branch that does not exist yet
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="optimum-sparse-push-") as tmp:
        folder = os.path.join(tmp, "checkpoint")
        save(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
        )


def checkpoint_directory(path: str, hf_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(local directory of a saved checkpoint, the `hf_kwargs` left for transformers).

    A Hub repo id is downloaded with `snapshot_download`, which takes the Hub options out of `hf_kwargs`;
    any other path that is not a directory cannot be a saved checkpoint, and the error says how to prune.
    """
    if os.path.isdir(path):
        return path, hf_kwargs
    if path.endswith(".gguf") or not is_hub_id(path):
        raise FileNotFoundError(
            f"{path!r} is not a directory saved by SparseModel.save_pretrained; to prune a model, pass "
            "sparsity_config=SparsityConfig(...)"
        )
    from huggingface_hub import snapshot_download

    hub = {k: hf_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in hf_kwargs}
    path = snapshot_download(path, **hub)
    return path, {k: v for k, v in hf_kwargs.items() if k not in hub}


def read_sparsity_record(directory: str) -> tuple[dict[str, Any], SparsityConfig]:
    """(sparsity_config.json as saved, the `SparsityConfig` in it), or an error that says what is wrong.

    The raw record is returned too: it carries the checkpoint layout, metrics and provenance that are
    not part of the config.
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}, so it was not saved by SparseModel.save_pretrained; to prune "
            "this model, pass sparsity_config=SparsityConfig(...)"
        )
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the checkpoint is damaged") from None
    try:
        config = SparsityConfig.from_dict(raw)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    return raw, config


def read_model_files(
    directory: str, checkpoint: dict[str, Any], hf_kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """(the transformers model, its masks or None when no masks file is recorded) of a saved checkpoint.

    Args:
        directory: the checkpoint directory.
        checkpoint: the `checkpoint` record of its sparsity_config.json (format, file names).
        hf_kwargs: passed to transformers' `from_pretrained` (dtype, device_map, ...).
    """
    config_path = os.path.join(directory, CONFIG_NAME)
    masks_file = checkpoint.get("masks_file")
    masks = None
    if masks_file:
        masks_path = os.path.join(directory, masks_file)
        if not os.path.isfile(masks_path):
            raise FileNotFoundError(
                f"{config_path} says the masks are in {masks_file}, but {directory} has no such file; the "
                "checkpoint is incomplete (copy the file back or save the model again)"
            )
        masks = read_masks(masks_path)
    fmt = checkpoint.get("format", "dense")
    if fmt == "compact":
        model = _read_compact_model(directory, checkpoint, masks, hf_kwargs)
    elif fmt == "dense":
        from transformers import AutoConfig

        model = model_class(AutoConfig.from_pretrained(directory)).from_pretrained(directory, **hf_kwargs)
    else:
        raise ValueError(f"{config_path}: unknown checkpoint format {fmt!r} (written by a newer version?)")
    return model, masks


def _read_compact_model(
    directory: str, checkpoint: dict[str, Any], masks: dict[str, torch.Tensor] | None, hf_kwargs: dict[str, Any]
) -> nn.Module:
    """Rebuild the model from its config and the dense state dict expanded from kept values + masks."""
    from transformers import AutoConfig

    weights = os.path.join(directory, checkpoint.get("weights_file", COMPACT_WEIGHTS_NAME))
    if masks is None:
        raise FileNotFoundError(f"{directory}: a compact checkpoint needs its masks file ({MASKS_NAME})")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{directory} is a compact checkpoint but has no {os.path.basename(weights)}")
    config = AutoConfig.from_pretrained(directory)
    state_dict = read_compact(weights, masks)
    model = model_class(config).from_pretrained(None, config=config, state_dict=state_dict, **hf_kwargs)
    restore_generation_config(model, directory)
    return model


def saved_tokenizer(directory: str) -> Any:
    """The tokenizer saved beside a checkpoint, so that saving or pushing it again keeps it; else None."""
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        logger.warning("%s: tokenizer files present but not loadable (%s)", directory, err)
        return None
