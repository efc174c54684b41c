"""A plain Trainer script ends with a SparseModel checkpoint (issue 16, part 1).

`trainer.save_model(d)` and `trainer.push_to_hub()` after a run with `SparsityCallback` or
`SparseFineTuneCallback` write the weights with their zeros, the masks file, sparsity_config.json and the
card, so that `SparseModel.from_pretrained(d)` restores the masks and plain transformers loads the same
weights. The Hub is out of reach here: `push_to_hub` runs against a stand-in for `transformers.trainer.hf_api`
that copies the folder it is asked to upload (minus the Trainer's ignore patterns) at the moment of upload.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import shutil

import pytest
import torch
import transformers.trainer
from conftest import SEQ_LEN, build_model
from huggingface_hub import ModelCard
from pg_helpers import Windows, make_trainer
from transformers import AutoModelForCausalLM

from optimum_sparse import SparseFineTuneCallback, SparseModel, SparsityCallback, SparsityConfig, load_sliced_model
from optimum_sparse.architecture import get_weight
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.checkpoint import MASKS_NAME, TEMP_PREFIX
from optimum_sparse.config import CONFIG_NAME
from optimum_sparse.sequential import prune

SPARSE_FILES = {CONFIG_NAME, MASKS_NAME, "README.md"}
NO_RECORD = "has no sparsity_config.json"


@pytest.fixture
def dataset(tokenizer, calibration_text) -> Windows:
    return Windows(sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0))


class FakeHub:
    """Stands in for `hf_api()`: creates no repo, and keeps a copy of each folder it is asked to upload."""

    def __init__(self, root) -> None:
        self.root = root
        self.uploads: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"me/{repo_id}"})()

    def upload_folder(self, *, folder_path, ignore_patterns=(), **kwargs):
        copy_dir = os.path.join(self.root, f"upload-{len(self.uploads)}")
        os.makedirs(copy_dir)
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path) and not any(fnmatch.fnmatch(name, p) for p in ignore_patterns):
                shutil.copy(path, copy_dir)
        self.uploads.append(copy_dir)
        return "commit"


def _logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check_sparse_checkpoint(directory, model, masks, ids) -> SparseModel:
    """`directory` restores `masks` with SparseModel, and plain transformers loads `model`'s very weights."""
    files = set(os.listdir(directory))
    assert SPARSE_FILES | {"config.json", "model.safetensors"} <= files
    assert not [name for name in files if name.startswith(TEMP_PREFIX)]
    loaded = SparseModel.from_pretrained(directory)
    assert set(loaded.masks) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask.cpu()), name
        assert not bool(get_weight(loaded.model.get_submodule(name))[~loaded.masks[name]].any()), name  # zeros
    plain = AutoModelForCausalLM.from_pretrained(directory)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in plain.state_dict().items())
    assert torch.equal(_logits(plain, ids), _logits(model, ids))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    return loaded


# ------------------------------------------------------------------------------------------- SparsityCallback
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "channels"])
def test_sparsity_callback_run_saves_a_sparse_model_checkpoint(pattern, dataset, tmp_path):
    model = build_model("llama")
    sparsity = {"unstructured": 0.5, "2:4": None, "channels": 0.3}[pattern]
    config = SparsityConfig(method="pg", pattern=pattern, sparsity=sparsity, num_samples=8, refresh_every=2)
    callback = SparsityCallback(config)
    trainer = make_trainer(model, dataset, callback, tmp_path / "out", steps=3, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(tmp_path / "final")

    loaded = _check_sparse_checkpoint(tmp_path / "final", model, callback.masks, dataset.ids[:2])
    assert loaded.sparsity_config == config
    record = json.loads((tmp_path / "final" / CONFIG_NAME).read_text())
    assert record["measured_sparsity"] == pytest.approx(loaded.measured_sparsity)
    assert record["measured_sparsity"] >= (0.3 if pattern == "channels" else 0.5)
    assert "3 steps of SparsityCallback" in record["calibration"]
    card = ModelCard.load(tmp_path / "final" / "README.md")  # the Hub's parser reads its metadata
    assert "Masks learned on the training loss" in card.text and "SparsityCallback(config)" in card.text
    assert card.data.library_name == "transformers" and card.data.tags[:3] == ["optimum-sparse", "sparse", "pruned"]

    # the checkpoint saved during training holds the dense model and the scores, not unfinished masks
    during = tmp_path / "out" / "checkpoint-2"
    assert not SPARSE_FILES & set(os.listdir(during)) and (during / "pg_mask_learning_rank0.pt").is_file()
    with pytest.raises(FileNotFoundError, match=NO_RECORD):
        SparseModel.from_pretrained(during)


def test_sparsity_callback_push_to_hub_uploads_the_sparse_model_files(dataset, tmp_path, monkeypatch):
    hub = FakeHub(tmp_path)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    model = build_model("llama")
    callback = SparsityCallback(SparsityConfig(method="pg", sparsity=0.5, num_samples=8))
    trainer = make_trainer(model, dataset, callback, tmp_path / "out", steps=2)
    trainer.train()
    trainer.push_to_hub()  # saves into args.output_dir, writes the Trainer's card there, uploads the folder

    (uploaded,) = hub.uploads
    _check_sparse_checkpoint(uploaded, model, callback.masks, dataset.ids[:2])
    # the Trainer replaces README.md with its training summary, which keeps our tags (model.model_tags)
    card = open(os.path.join(uploaded, "README.md"), encoding="utf-8").read()
    assert "generated_from_trainer" in card and "- optimum-sparse" in card and "- unstructured-sparsity" in card


def test_a_sliced_channel_model_saves_as_a_sliced_checkpoint(dataset, tmp_path):
    model = build_model("llama")
    callback = SparsityCallback(SparsityConfig(method="pg", pattern="channels", sparsity=0.3, num_samples=8))
    trainer = make_trainer(model, dataset, callback, tmp_path / "out", steps=2)
    trainer.train()
    target = tmp_path / "model"
    trainer.save_model(target)  # masked, full-size: a SparseModel checkpoint
    assert SPARSE_FILES <= set(os.listdir(target))

    callback.slice_model()
    sliced = _logits(model, dataset.ids[:2])
    trainer.save_model(target)  # the same directory, now a sliced checkpoint: the old record must go
    assert not {CONFIG_NAME, MASKS_NAME} & set(os.listdir(target))
    with pytest.raises(FileNotFoundError, match=NO_RECORD):
        SparseModel.from_pretrained(target)
    assert torch.equal(_logits(load_sliced_model(target), dataset.ids[:2]), sliced)


# ------------------------------------------------------------------------------------------- SparseFineTuneCallback
def _pruned(arch: str = "llama") -> SparseModel:
    model = build_model(arch)
    config = SparsityConfig(method="magnitude", sparsity=0.5, device="cpu")
    return SparseModel(model, masks=prune(model, config, None, show_progress=False).masks, config=config)


def _fine_tune(model, dataset, callback, output_dir, **overrides):
    """A few AdamW steps with weight decay on the weights (every weight with a gradient moves)."""
    settings = dict(steps=3, optim="adamw_torch", learning_rate=1e-2, weight_decay=0.1)
    settings.update(overrides)
    return make_trainer(model, dataset, callback, output_dir, **settings)


@pytest.mark.parametrize("source", ["sparse-model", "dict", "buffers"])
def test_fine_tune_callback_run_saves_a_sparse_model_checkpoint(source, dataset, tmp_path):
    sparse = _pruned()
    sparse.metrics = {"perplexity": 12.5}
    before = {name: get_weight(sparse.model.get_submodule(name)).clone() for name in sparse.masks}
    if source == "buffers":
        sparse.keep_masks()
    callback = SparseFineTuneCallback({"sparse-model": sparse, "dict": dict(sparse.masks), "buffers": None}[source])
    trainer = _fine_tune(sparse.model, dataset, callback, tmp_path / "out", save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model()  # no argument: args.output_dir, the folder push_to_hub uploads

    out = tmp_path / "out"
    loaded = _check_sparse_checkpoint(out, sparse.model, sparse.masks, dataset.ids[:2])
    assert loaded.fine_tuned and "then fine-tuned with its zeros kept" in (out / "README.md").read_text()
    name = "model.layers.0.mlp.up_proj"
    assert not torch.equal(get_weight(loaded.model.get_submodule(name)), before[name])  # the trained weights
    if source == "sparse-model":  # what sparse.save_pretrained writes, with the same config and metrics
        sparse.save_pretrained(tmp_path / "direct")
        for file in (CONFIG_NAME, "README.md"):
            assert (out / file).read_text() == (tmp_path / "direct" / file).read_text()
        assert loaded.metrics == {"perplexity": 12.5}
    else:  # the config is not known: one recording the masks' sparsity
        assert loaded.sparsity_config.sparsity == 0.5
    # the masks are final from the start, so checkpoints during training carry them too
    assert SPARSE_FILES <= set(os.listdir(out / "checkpoint-2"))
    assert set(SparseModel.from_pretrained(out / "checkpoint-2").masks) == set(sparse.masks)


def test_fine_tuned_gpt2_saves_through_a_given_state_dict(dataset, tmp_path):
    """Conv1D weights are stored (in, out); FSDP and DeepSpeed hand their own state dict to save_pretrained."""
    sparse = _pruned("gpt2")
    _fine_tune(sparse.model, dataset, SparseFineTuneCallback(sparse), tmp_path / "out", steps=2).train()
    sparse.model.save_pretrained(tmp_path / "ckpt", state_dict=sparse.model.state_dict())
    _check_sparse_checkpoint(tmp_path / "ckpt", sparse.model, sparse.masks, dataset.ids[:2])
    record = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert record["measured_sparsity"] == pytest.approx(0.5)


def test_saves_that_cannot_carry_the_masks_write_the_plain_checkpoint_and_say_why(dataset, tmp_path, caplog):
    sparse = _pruned()
    model = sparse.model
    trainer = _fine_tune(model, dataset, SparseFineTuneCallback(sparse), tmp_path / "out", steps=1)
    trainer.train()
    trainer.save_model(tmp_path / "ckpt")
    assert SPARSE_FILES <= set(os.listdir(tmp_path / "ckpt"))

    # a state dict without the masked weights (a sharded save): the weights only
    state = {k: v for k, v in model.state_dict().items() if "layers.0.mlp" not in k}
    with caplog.at_level(logging.WARNING, logger="optimum_sparse"):
        model.save_pretrained(tmp_path / "ckpt", state_dict=state)
    assert "lacks masked weights" in caplog.text
    assert not {CONFIG_NAME, MASKS_NAME} & set(os.listdir(tmp_path / "ckpt"))  # the old record went first

    # weights no longer zero where pruned: saved, but not as a SparseModel checkpoint
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").weight.fill_(1.0)
    trainer.save_model(tmp_path / "stray")
    assert "non-zero weights where its mask prunes them" in caplog.text
    assert (tmp_path / "stray" / "model.safetensors").is_file() and not (tmp_path / "stray" / CONFIG_NAME).exists()

    # other ranks, copies and SparseModel.save_pretrained itself add nothing
    sparse.apply_masks()
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank" / CONFIG_NAME).exists()
    copy.deepcopy(model).save_pretrained(tmp_path / "copy")
    assert not SPARSE_FILES & set(os.listdir(tmp_path / "copy"))
    sparse.save_pretrained(tmp_path / "direct", compact=True)
    assert "model.safetensors" not in os.listdir(tmp_path / "direct")  # compact: no dense weights added
    assert SparseModel.from_pretrained(tmp_path / "direct").masks.keys() == sparse.masks.keys()


def test_a_peft_model_keeps_saving_its_adapter(dataset, tmp_path):
    peft = pytest.importorskip("peft")
    sparse = _pruned()
    peft_model = peft.get_peft_model(sparse.model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    trainer = _fine_tune(peft_model, dataset, SparseFineTuneCallback(sparse), tmp_path / "out", steps=1)
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert "adapter_config.json" in files and not {CONFIG_NAME, MASKS_NAME} & files
