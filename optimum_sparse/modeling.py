"""`SparseModel`: a pruned transformers model with its masks, in the shape of `peft.PeftModel`.

```python
from optimum_sparse import SparseModel, SparsityConfig

sparse = SparseModel.from_pretrained("HuggingFaceTB/SmolLM2-135M", sparsity_config=SparsityConfig(method="wanda"),
                                     calibration="wikitext2")          # load + prune one-shot
sparse.save_pretrained("smollm2-wanda")                               # plain transformers checkpoint + masks
sparse.save_pretrained("smollm2-wanda-compact", compact=True)          # kept values + bitmasks, smaller
sparse = SparseModel.from_pretrained("smollm2-wanda")                 # back, with masks and config
sparse.push_to_hub("me/smollm2-wanda")
```

The checkpoint format is described in docs/format.md.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import tempfile
from typing import Any

import torch
from torch import nn

from optimum_sparse.architecture import get_weight
from optimum_sparse.callbacks import (
    MASK_BUFFER,
    register_mask_buffers,
    remove_mask_buffers,
    resolve_module,
    weight_module,
)
from optimum_sparse.checkpoint import (
    COMPACT_WEIGHTS_NAME,
    MASKS_NAME,
    CheckpointInfo,
    dense_weights_bytes,
    directory_bytes,
    read_compact,
    read_masks,
    save_directory_atomically,
    write_compact,
    write_masks,
)
from optimum_sparse.config import CONFIG_NAME, FORMAT_VERSION, SparsityConfig

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
# keyword arguments of `from_pretrained` that also apply to the tokenizer
_TOKENIZER_KWARGS = (
    "gguf_file",
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool CPU masks, each matching its module's (out, in) weight, or a ValueError naming the mismatch."""
    checked: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        try:
            module = weight_module(model.get_submodule(name))
        except AttributeError:
            raise ValueError(
                f"mask for {name!r}: {type(model).__name__} has no such module; the masks belong to another model"
            ) from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"mask for {name!r}: that module has no 2-D weight to mask")
        expected = tuple(get_weight(module).shape)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"mask for {name} has shape {list(mask.shape)} but the model's weight is {list(expected)} (out, in); "
                "the masks belong to a different model or architecture"
            )
        checked[name] = mask.detach().to("cpu", torch.bool)
    return checked


def _describe_calibration(calibration: Any, config: SparsityConfig) -> str:
    from optimum_sparse.solvers import get_solver_class

    if not get_solver_class(config.method).requires_calibration and config.weight_update is None:
        return f"none ({config.method} needs no data)"
    if calibration is None:
        source = "text sampled from the model itself"
    elif isinstance(calibration, (str, os.PathLike)):
        source = os.fspath(calibration)
    elif isinstance(calibration, torch.Tensor):
        source = f"token ids {list(calibration.shape)}"
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], str):
        source = f"{len(calibration)} texts"
    else:
        source = type(calibration).__name__
    return f"{source}; {config.num_samples} windows x {config.seq_len} tokens, seed {config.seed}"


def _saved_tokenizer(directory: str):
    """The tokenizer saved beside a checkpoint, so that saving or pushing it again keeps it; else None."""
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        logger.warning("%s: tokenizer files present but not loadable (%s)", directory, err)
        return None


def _model_class(config):
    """The transformers class named in config.json's `architectures`, else the causal-LM auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _call_wrapped(self: SparseModel, *args: Any, labels=None, **kwargs: Any):
    if labels is not None:
        kwargs["labels"] = labels
    return self.model(*args, **kwargs)


class _DelegatedForward:
    """`SparseModel.forward`: calls the wrapped model, and shows that model's forward signature.

    `Trainer` drops every dataset column that `inspect.signature(model.forward)` does not name, and looks
    for `labels` in the class's forward: a bare `(*args, **kwargs)` would leave it an empty batch.
    """

    def __get__(self, instance: SparseModel | None, owner: type | None = None):
        if instance is None:
            return _call_wrapped
        model = instance.model

        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any):
            return model(*args, **kwargs)

        return forward


class SparseModel(nn.Module):
    """A pruned transformers model plus its masks and `SparsityConfig`.

    Attribute access, `forward` and `generate` go to the wrapped model (`.model`, a plain transformers
    model whose pruned weights are zeros), as with `peft.PeftModel`.

    Args:
        model: a transformers model (already pruned, or to be described by `masks`).
        masks: {module name: bool mask (out, in), True = kept}; default: the model's current non-zeros in
            the layers that `config` targets (layers without any zero are left out).
        config: the `SparsityConfig` the model was pruned with; default: one recording the masks' sparsity
            (method "magnitude", as the real method is unknown).
    """

    def __init__(
        self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None, config: SparsityConfig | None = None
    ) -> None:
        super().__init__()
        if isinstance(model, SparseModel):
            raise TypeError("model is already a SparseModel")
        self.model = model
        if masks is None:
            from optimum_sparse.refit import masks_from_zeros

            finder = config if config is not None else SparsityConfig(method="magnitude")
            masks = {name: mask for name, mask in masks_from_zeros(model, finder).items() if not bool(mask.all())}
            if not masks:
                logger.warning("SparseModel: the model has no zero weight in its prunable layers; no masks recorded")
        self.masks: dict[str, torch.Tensor] = _check_masks(model, masks)
        if config is None:
            total = sum(mask.numel() for mask in self.masks.values())
            pruned = total - sum(int(mask.sum()) for mask in self.masks.values())
            config = SparsityConfig(method="magnitude", sparsity=min(round(pruned / max(total, 1), 4), 0.9999))
        self.sparsity_config: SparsityConfig = config
        #: measured results shown in the model card and sparsity_config.json, e.g. {"perplexity": 31.5}
        self.metrics: dict[str, Any] = {}
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
        #: the model that was pruned (a Hub id goes into the model card's `base_model`)
        self.base_model_id: str | None = name_or_path or None
        #: how the calibration data were chosen (for the model card)
        self.calibration: str | None = None
        #: saved beside the model by `save_pretrained` when set
        self.tokenizer = None

    # ------------------------------------------------------------------ delegation (as in peft.PeftModel)
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not initialised yet: avoid infinite recursion
                raise
            return getattr(self.model, name)

    forward = _DelegatedForward()

    def generate(self, *args: Any, **kwargs: Any):
        return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ masks
    def _module(self, name: str) -> nn.Module:
        return resolve_module(self.model, name)

    @torch.no_grad()
    def apply_masks(self) -> SparseModel:
        """Set every pruned weight back to zero (e.g. after training without the callback)."""
        for name, mask in self.masks.items():
            module = self._module(name)
            buffer = module._buffers.get(MASK_BUFFER)
            if buffer is not None:
                module.weight.masked_fill_(~buffer, 0)
            else:
                weight = get_weight(module)
                weight.masked_fill_(~mask.to(weight.device), 0)
        return self

    def keep_masks(self, enabled: bool = True) -> SparseModel:
        """Register the masks as `sparse_mask` buffers with gradient-masking hooks (or remove them).

        Gradients of pruned weights are then zero; `SparseFineTuneCallback` also re-zeroes the weights
        after every optimizer step, which keeps the sparsity exact whatever the optimizer does.
        """
        if enabled:
            register_mask_buffers(self.model, self.masks)
            self.apply_masks()
        else:
            remove_mask_buffers(self.model)
        return self

    def _layer_sparsity(self) -> dict[str, float]:
        result = {}
        for name in self.masks:
            weight = get_weight(self._module(name))
            result[name] = int((weight == 0).sum()) / max(weight.numel(), 1)
        return result

    @property
    def measured_sparsity(self) -> float:
        """Fraction of zeros over the pruned layers' weights."""
        zeros = numel = 0
        for name in self.masks:
            weight = get_weight(self._module(name))
            zeros += int((weight == 0).sum())
            numel += weight.numel()
        return zeros / max(numel, 1)

    def sparsity_report(self) -> dict:
        """Measured zeros per prunable linear of the blocks and in total (see `evaluation.sparsity_report`)."""
        from optimum_sparse.evaluation import sparsity_report

        return sparsity_report(self.model)

    def _check_zeros(self) -> None:
        for name, mask in self.masks.items():
            if self.model.get_submodule(name) is not self._module(name):
                raise ValueError(
                    f"{name} carries an adapter (PEFT); merge it first, keeping the zeros: "
                    "SparseModel(merge_and_mask(peft_model, sparse), sparse.masks, sparse.sparsity_config)"
                )
            weight = get_weight(self._module(name)).detach()
            stray = int((weight != 0).logical_and_(~mask.to(weight.device)).sum())
            if stray:
                raise ValueError(
                    f"{name} has {stray} non-zero weights where its mask prunes them (trained without "
                    "SparseFineTuneCallback?); call .apply_masks() to zero them before saving"
                )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        compact: bool = False,
        tokenizer=None,
        overwrite: bool = False,
        **kwargs: Any,
    ) -> CheckpointInfo:
        """Save the model, its masks, `sparsity_config.json` and a model card, atomically.

        Args:
            save_directory: written in a temporary sibling directory, then renamed into place; a failure
                leaves an existing directory untouched. An existing checkpoint directory is replaced as a
                whole; any other non-empty directory needs `overwrite=True`.
            compact: store pruned weights as kept values + bitmasks (only `SparseModel.from_pretrained`
                reads that); default: a standard transformers checkpoint with zeros where pruned.
            tokenizer: saved alongside (default: `self.tokenizer`, when set).
            kwargs: passed to transformers' `save_pretrained` (dense format), e.g. `max_shard_size`.
        Returns:
            `CheckpointInfo` with the sizes on disk (and the dense size, for comparison).
        """
        self._check_zeros()
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        info: dict[str, int] = {}

        def write(directory: str) -> None:
            info.update(self._write(directory, compact, tokenizer, **kwargs))

        save_directory = os.fspath(save_directory)
        save_directory_atomically(save_directory, write, overwrite=overwrite)
        result = CheckpointInfo(
            directory=save_directory,
            format="compact" if compact else "dense",
            total_bytes=directory_bytes(save_directory),
            weights_bytes=info["weights_bytes"],
            dense_weights_bytes=info["dense_weights_bytes"],
        )
        logger.info(
            "saved %s checkpoint to %s: weights %.1f MiB (dense: %.1f MiB, ratio %.2f)",
            result.format,
            save_directory,
            result.weights_bytes / 2**20,
            result.dense_weights_bytes / 2**20,
            result.ratio,
        )
        return result

    def _write(self, directory: str, compact: bool, tokenizer, **kwargs: Any) -> dict[str, int]:
        model = self.model
        checkpoint: dict[str, Any] = {"format": "compact" if compact else "dense", "masks_file": MASKS_NAME}
        if compact:
            write_compact(os.path.join(directory, COMPACT_WEIGHTS_NAME), model, self.masks)
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
            model.save_pretrained(directory, **kwargs)
            weight_files = [n for n in os.listdir(directory) if n.startswith("model") and ".safetensors" in n]
        write_masks(os.path.join(directory, MASKS_NAME), self.masks)
        layer_sparsity = self._layer_sparsity()
        numel = sum(mask.numel() for mask in self.masks.values())
        measured = sum(layer_sparsity[n] * m.numel() for n, m in self.masks.items()) / max(numel, 1)
        metadata: dict[str, Any] = {
            "measured_sparsity": measured,
            "layer_sparsity": layer_sparsity,
            "checkpoint": checkpoint,
        }
        for key, value in (("metrics", self.metrics), ("base_model", self.base_model_id)):
            if value:
                metadata[key] = value
        if self.calibration:
            metadata["calibration"] = self.calibration
        self.sparsity_config.save_pretrained(directory, **metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, MODEL_CARD_NAME), "w", encoding="utf-8") as handle:
            handle.write(self.model_card(compact=compact, measured_sparsity=measured))
        return {
            "weights_bytes": directory_bytes(directory, weight_files + [MASKS_NAME]),
            "dense_weights_bytes": dense_weights_bytes(model),
        }

    def model_card(self, compact: bool = False, measured_sparsity: float | None = None) -> str:
        """The README.md written by `save_pretrained`: YAML front matter, what was done, how to load it."""
        from huggingface_hub import ModelCardData

        config = self.sparsity_config
        measured = self.measured_sparsity if measured_sparsity is None else measured_sparsity
        base = self.base_model_id if _is_hub_id(self.base_model_id) else None
        class_name = type(self.model).__name__
        causal = class_name.endswith(("ForCausalLM", "LMHeadModel"))
        tags = ["optimum-sparse", "sparse", "pruned", config.method]
        tags.append(f"{config.pattern}-sparsity" if config.pattern else "unstructured-sparsity")
        data = ModelCardData(
            library_name="transformers",
            base_model=base,
            tags=tags,
            pipeline_tag="text-generation" if causal else None,
        )
        amount = f"{config.pattern} ({config.sparsity:.0%})" if config.pattern else f"{config.sparsity:.0%}"
        method = config.method + (f" + {config.weight_update} weight update" if config.weight_update else "")
        rows = [
            ("method", method),
            ("target sparsity", amount),
            ("measured sparsity", f"{measured:.2%} of the weights of {len(self.masks)} pruned linear layers"),
            ("calibration", self.calibration or "not recorded"),
            ("checkpoint format", "compact (kept values + bitmasks)" if compact else "dense (zeros where pruned)"),
        ]
        if self.base_model_id:
            rows.insert(0, ("base model", f"[{base}](https://huggingface.co/{base})" if base else self.base_model_id))
        for key, value in self.metrics.items():
            rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
        table = "\n".join(f"| {key} | {value} |" for key, value in rows)
        auto = "AutoModelForCausalLM" if causal else class_name
        subject = f"`{base}`" if base else f"a {class_name}"
        if compact:
            plain = (
                "This checkpoint uses the compact format (kept values + bitmasks): plain `transformers` cannot read "
                "it. Load it with `SparseModel` below; `sparse.model` is then a regular transformers model, and "
                "`sparse.save_pretrained(dir)` writes a plain checkpoint."
            )
        else:
            plain = (
                "A standard transformers checkpoint (safetensors, zeros where pruned):\n\n"
                f"```python\nfrom transformers import {auto}\n\n"
                f'model = {auto}.from_pretrained("<this repo or directory>")\n```'
            )
        lines = [
            "---",
            data.to_yaml(),
            "---",
            "",
            f"# {base or class_name}: {config.describe()} with optimum-sparse",
            "",
            f"A pruned copy of {subject}: {measured:.1%} of the weights of its {len(self.masks)} pruned linear "
            f"layers are zero. Pruned one-shot, block by block, with optimum-sparse (`{config.method}`); embeddings "
            "and `lm_head` stay dense.",
            "",
            "| | |",
            "|---|---|",
            table,
            "",
            "## Loading",
            "",
            plain,
            "",
            "With its masks and pruning config (`pip install optimum-sparse`):",
            "",
            "```python",
            "from optimum_sparse import SparseModel",
            "",
            'sparse = SparseModel.from_pretrained("<this repo or directory>")',
            "sparse.masks              # {module name: bool mask (out, in)}",
            "sparse.sparsity_config    # how it was pruned",
            "```",
            "",
            "## Fine-tuning without losing the zeros",
            "",
            "```python",
            "from optimum_sparse import SparseFineTuneCallback",
            "",
            "trainer = Trainer(model=sparse.model, args=args, train_dataset=data,",
            "                  callbacks=[SparseFineTuneCallback(sparse)])",
            "```",
            "",
            "LoRA adapters train as usual on `sparse.model`; `optimum_sparse.merge_and_mask(peft_model, sparse.masks)` "
            "merges them and keeps exactly these zeros.",
            "",
            "## Files",
            "",
            f"- `{MASKS_NAME}`: one bit-packed mask per pruned weight (checkpoint format version {FORMAT_VERSION})",
            f"- `{CONFIG_NAME}`: the pruning config, measured per-layer sparsity, metrics, library version",
        ]
        if compact:
            lines.append(f"- `{COMPACT_WEIGHTS_NAME}`: dense tensors, and the kept values of each pruned weight")
        return "\n".join(lines) + "\n"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        compact: bool = False,
        tokenizer=None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ):
        """Save to a temporary directory and upload it with `huggingface_hub.HfApi.upload_folder`."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id
        if revision is not None and not create_pr:  # upload_folder fails on a branch that does not exist yet
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="optimum-sparse-push-") as tmp:
            folder = os.path.join(tmp, "checkpoint")
            self.save_pretrained(folder, compact=compact, tokenizer=tokenizer)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"Upload {self.sparsity_config.describe()} model (optimum-sparse)",
                create_pr=create_pr,
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        sparsity_config: SparsityConfig | None = None,
        calibration=None,
        tokenizer=None,
        *,
        show_progress: bool = True,
        keep_masks: bool = False,
        **hf_kwargs: Any,
    ) -> SparseModel:
        """Prune a model one-shot, or load one saved by this library.

        - With `sparsity_config`: load the base model (Hub id, local directory, or a `.gguf` file / `gguf_file=`)
          with transformers (float32 unless `dtype=` says otherwise) and prune it with `optimum_sparse.prune`
          on `calibration` (see `prune`; the tokenizer is loaded from the same place when not given).
        - Without: `pretrained_model_name_or_path` is a checkpoint saved by `save_pretrained` (a directory
          or a Hub repo, dense or compact); its masks and config come back with it.

        `keep_masks=True` registers the mask buffers at once (see `keep_masks`), ready for fine-tuning.
        `hf_kwargs` go to transformers' `from_pretrained` (dtype, revision, token, device_map, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if sparsity_config is not None:
            sparse = cls._prune_pretrained(path, sparsity_config, calibration, tokenizer, show_progress, hf_kwargs)
            return sparse.keep_masks() if keep_masks else sparse
        if not os.path.isdir(path):
            if path.endswith(".gguf") or not _is_hub_id(path):
                raise FileNotFoundError(
                    f"{path!r} is not a directory saved by SparseModel.save_pretrained; to prune a model, pass "
                    "sparsity_config=SparsityConfig(...)"
                )
            from huggingface_hub import snapshot_download

            hub = {k: hf_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in hf_kwargs}
            path = snapshot_download(path, **hub)
            hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in hub}
        sparse = cls._load_saved(path, hf_kwargs)
        return sparse.keep_masks() if keep_masks else sparse

    @classmethod
    def _prune_pretrained(cls, path, config, calibration, tokenizer, show_progress, hf_kwargs) -> SparseModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from optimum_sparse.loading import _split_gguf, check_model_reference, forget_gguf_quantizer, resolve_dtype
        from optimum_sparse.sequential import prune

        check_model_reference(path)
        source, gguf = _split_gguf(path)
        kwargs = {**gguf, **hf_kwargs}
        kwargs["dtype"] = resolve_dtype(kwargs.get("dtype", "float32"))
        logger.info("loading %s", path)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        forget_gguf_quantizer(model)
        model.eval()
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    source, **{k: kwargs[k] for k in _TOKENIZER_KWARGS if k in kwargs}
                )
            except (OSError, ValueError) as err:  # no tokenizer files: fine when the method needs no text
                logger.warning("no tokenizer loaded from %s (%s)", path, err)
        result = prune(model, config, calibration, tokenizer, show_progress=show_progress)
        sparse = cls(model, masks=result.masks, config=config)
        sparse.base_model_id = path
        sparse.calibration = _describe_calibration(calibration, config)
        sparse.tokenizer = tokenizer
        sparse.pruning_result = result
        return sparse

    @classmethod
    def _load_saved(cls, directory: str, hf_kwargs: dict[str, Any]) -> SparseModel:
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
        checkpoint = raw.get("checkpoint") or {}
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
            model = cls._load_compact(directory, checkpoint, masks, hf_kwargs)
        elif fmt == "dense":
            from transformers import AutoConfig

            model_class = _model_class(AutoConfig.from_pretrained(directory))
            model = model_class.from_pretrained(directory, **hf_kwargs)
        else:
            raise ValueError(f"{config_path}: unknown checkpoint format {fmt!r} (written by a newer version?)")
        model.eval()
        if masks is None:
            logger.info("%s has no masks file: taking the masks from the model's zeros", directory)
        sparse = cls(model, masks=masks, config=config)
        sparse.metrics = dict(raw.get("metrics") or {})
        sparse.base_model_id = raw.get("base_model") or sparse.base_model_id
        sparse.calibration = raw.get("calibration")
        sparse.tokenizer = _saved_tokenizer(directory)
        try:
            sparse._check_zeros()
        except ValueError as err:
            logger.warning("%s: %s", directory, err)
        return sparse

    @staticmethod
    def _load_compact(directory: str, checkpoint: dict, masks, hf_kwargs: dict[str, Any]) -> nn.Module:
        from transformers import AutoConfig

        weights = os.path.join(directory, checkpoint.get("weights_file", COMPACT_WEIGHTS_NAME))
        if masks is None:
            raise FileNotFoundError(f"{directory}: a compact checkpoint needs its masks file ({MASKS_NAME})")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{directory} is a compact checkpoint but has no {os.path.basename(weights)}")
        config = AutoConfig.from_pretrained(directory)
        state_dict = read_compact(weights, masks)
        model = _model_class(config).from_pretrained(None, config=config, state_dict=state_dict, **hf_kwargs)
        restore_generation_config(model, directory)
        return model


def restore_generation_config(model: nn.Module, directory: str) -> None:
    """Give a model built without `from_pretrained(directory)` the generation config saved there, if any."""
    from transformers import GenerationConfig

    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)


def is_compact_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local directory holding a compact checkpoint (which only `SparseModel` can load)."""
    config_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(config_path):
        return False
    with open(config_path, encoding="utf-8") as handle:
        return (json.load(handle).get("checkpoint") or {}).get("format") == "compact"
