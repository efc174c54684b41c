"""`SparseModel`: wrapping, dense and compact checkpoints, loading errors, atomic saves, Hub upload, CLI --compact."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import build_model, build_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from optimum_sparse import SparseModel, SparsityConfig, cli
from optimum_sparse.architecture import get_weight
from optimum_sparse.checkpoint import COMPACT_WEIGHTS_NAME, MASKS_NAME, read_masks, write_masks
from optimum_sparse.config import CONFIG_NAME, FORMAT_VERSION
from optimum_sparse.masks import pack_mask, unpack_mask
from optimum_sparse.sequential import prune

IDS = torch.tensor([[1, 5, 9, 14, 20, 3, 7, 30, 41, 12, 8, 2]])


def _pruned(arch: str = "llama", **config) -> SparseModel:
    """A tiny model pruned one-shot with magnitude (no calibration data needed), wrapped."""
    model = build_model(arch)
    cfg = SparsityConfig(**{"method": "magnitude", "sparsity": 0.5, "device": "cpu", **config})
    result = prune(model, cfg, None, show_progress=False)
    return SparseModel(model, masks=result.masks, config=cfg)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _edit_json(path, **changes) -> None:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    data.update(changes)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)


def _snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


# ------------------------------------------------------------------------------------------- the wrapper
def test_wrapper_delegates_forward_generate_and_attributes_to_the_plain_model():
    sparse = _pruned()
    assert type(sparse.model).__name__ == "LlamaForCausalLM"
    assert sparse.config is sparse.model.config  # attribute access goes to the wrapped model
    assert torch.equal(_logits(sparse), _logits(sparse.model))
    out = sparse.generate(IDS[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, sparse.model.generate(IDS[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert len(sparse.masks) == 14 and all(mask.dtype == torch.bool for mask in sparse.masks.values())
    report = sparse.sparsity_report()
    assert report["total"] == pytest.approx(0.5)
    assert set(report["layers"]) == set(sparse.masks)


def test_forward_signature_is_the_wrapped_models_so_trainer_keeps_input_columns():
    import inspect

    params = inspect.signature(_pruned().forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)


def test_masks_default_to_the_zeros_of_the_pruned_layers():
    pruned = _pruned()
    again = SparseModel(pruned.model)  # no masks given: read from the weights
    assert set(again.masks) == set(pruned.masks)
    assert all(torch.equal(again.masks[name], pruned.masks[name]) for name in pruned.masks)
    assert again.sparsity_config.sparsity == pytest.approx(0.5)


def test_wrapping_rejects_masks_of_another_shape_or_module():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"q_proj has shape \[8, 8\] but the model's weight is \[32, 32\]"):
        SparseModel(model, masks={"model.layers.0.self_attn.q_proj": torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no such module"):
        SparseModel(model, masks={"model.layers.9.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)})


# ------------------------------------------------------------------------------------------- dense format
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights stored (in, out)
def test_dense_save_loads_in_plain_transformers_with_identical_logits(arch, tmp_path):
    sparse = _pruned(arch)
    sparse.save_pretrained(tmp_path / "ckpt")
    names = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", MASKS_NAME, CONFIG_NAME, "README.md"} <= names
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(plain) is type(sparse.model)
    assert torch.equal(_logits(plain), _logits(sparse))
    for name, mask in sparse.masks.items():  # zeros exactly where pruned
        assert torch.equal(get_weight(plain.get_submodule(name)) != 0, mask), name


def test_dense_save_then_sparse_model_load_restores_masks_config_and_metadata(tmp_path):
    sparse = _pruned(pattern="2:4")
    sparse.metrics = {"perplexity": 31.25}
    sparse.calibration = "none (magnitude needs no data)"
    sparse.save_pretrained(tmp_path / "ckpt", tokenizer=build_tokenizer())
    loaded = SparseModel.from_pretrained(tmp_path / "ckpt")
    assert set(loaded.masks) == set(sparse.masks)
    assert all(torch.equal(loaded.masks[name], sparse.masks[name]) for name in sparse.masks)
    assert loaded.sparsity_config == sparse.sparsity_config
    assert loaded.metrics == {"perplexity": 31.25}
    assert loaded.calibration == "none (magnitude needs no data)"
    assert loaded.tokenizer is not None and loaded.tokenizer("ab").input_ids == [4, 5]
    assert not loaded.model.training
    assert torch.equal(_logits(loaded), _logits(sparse))


def test_sparsity_config_json_records_config_measured_sparsity_and_version(tmp_path):
    sparse = _pruned(sparsity=0.7)
    sparse.save_pretrained(tmp_path / "ckpt")
    with open(tmp_path / "ckpt" / CONFIG_NAME, encoding="utf-8") as handle:
        data = json.load(handle)
    from optimum_sparse import __version__

    assert data["method"] == "magnitude" and data["sparsity"] == 0.7
    assert data["format_version"] == FORMAT_VERSION and data["library_version"] == __version__
    assert data["checkpoint"] == {"format": "dense", "masks_file": MASKS_NAME}
    assert set(data["measured_layer_sparsity"]) == set(sparse.masks)
    # magnitude at layer scope: exactly round(0.7 * numel) zeros in every layer
    for name, value in data["measured_layer_sparsity"].items():
        numel = sparse.masks[name].numel()
        assert value == pytest.approx(round(0.7 * numel) / numel), name
    assert data["measured_sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_masks_file_is_bit_packed_little_endian_with_shapes_in_metadata(tmp_path):
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = mask[1, 7] = True  # entries 0, 3 and 15 of the row-major mask
    assert pack_mask(mask).tolist() == [0b00001001, 0b10000000]
    odd = torch.rand(3, 5) > 0.5  # 15 entries: the last byte is padded
    assert torch.equal(unpack_mask(pack_mask(odd), (3, 5)), odd)
    path = tmp_path / MASKS_NAME
    write_masks(path, {"model.layers.0.mlp.up_proj": mask, "model.layers.0.mlp.down_proj": odd})
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        assert sorted(handle.keys()) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").tolist() == pack_mask(odd).tolist()
    assert metadata["format"] == "optimum-sparse-masks" and metadata["bitorder"] == "little"
    assert metadata["layout"] == "out_in" and metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["shapes"]) == {
        "model.layers.0.mlp.down_proj.weight": [3, 5],
        "model.layers.0.mlp.up_proj.weight": [2, 8],
    }
    back = read_masks(path)
    assert torch.equal(back["model.layers.0.mlp.up_proj"], mask) and torch.equal(
        back["model.layers.0.mlp.down_proj"], odd
    )


def test_model_card_states_method_sparsity_calibration_perplexity_and_loading(tmp_path):
    sparse = _pruned(pattern="2:4")
    sparse.base_model_id = "HuggingFaceTB/SmolLM2-135M"
    sparse.calibration = "wikitext2; 128 windows x 2048 tokens, seed 0"
    sparse.metrics = {"perplexity": 31.25}
    sparse.save_pretrained(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M" in card
    assert "| method | magnitude |" in card
    assert "| target sparsity | 2:4 (50%) |" in card
    assert "| measured sparsity | 50.00% of the weights of 14 pruned linear layers |" in card
    assert "| calibration | wikitext2; 128 windows x 2048 tokens, seed 0 |" in card
    assert "| pruned (this model) | 31.25 |" in card
    assert 'AutoModelForCausalLM.from_pretrained("<this repo or directory>")' in card
    assert 'SparseModel.from_pretrained("<this repo or directory>")' in card


# ------------------------------------------------------------------------------------------- compact format
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: transposed Conv1D weights and tied embeddings
def test_compact_save_then_load_restores_identical_weights(arch, tmp_path):
    sparse = _pruned(arch, sparsity=0.7)
    info = sparse.save_pretrained(tmp_path / "compact", compact=True)
    dense_info = sparse.save_pretrained(tmp_path / "dense")
    assert set(os.listdir(tmp_path / "compact")) >= {COMPACT_WEIGHTS_NAME, MASKS_NAME, CONFIG_NAME, "config.json"}
    assert "model.safetensors" not in os.listdir(tmp_path / "compact")
    assert info.format == "compact" and info.dense_weights_bytes == dense_info.dense_weights_bytes
    assert info.weights_bytes == os.path.getsize(tmp_path / "compact" / COMPACT_WEIGHTS_NAME) + os.path.getsize(
        tmp_path / "compact" / MASKS_NAME
    )
    assert info.weights_bytes < dense_info.weights_bytes and info.ratio < 0.9
    loaded = SparseModel.from_pretrained(tmp_path / "compact")
    expected, got = sparse.model.state_dict(), loaded.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert all(torch.equal(loaded.masks[name], sparse.masks[name]) for name in sparse.masks)
    if arch == "gpt2":
        assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight  # still tied
    assert torch.equal(_logits(loaded), _logits(sparse))


def test_compact_checkpoint_keeps_the_dtype(tmp_path):
    sparse = _pruned()
    sparse.model.to(torch.bfloat16)
    sparse.save_pretrained(tmp_path / "compact", compact=True)
    loaded = SparseModel.from_pretrained(tmp_path / "compact")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), sparse.model.parameters()))


def test_plain_transformers_cannot_read_a_compact_checkpoint(tmp_path):
    _pruned().save_pretrained(tmp_path / "compact", compact=True)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")


# ------------------------------------------------------------------------------------------- pruning on load
def test_from_pretrained_with_a_config_loads_and_prunes_a_local_model(saved_llama, text_file):
    config = SparsityConfig(method="wanda", sparsity=0.5, num_samples=4, seq_len=32, device="cpu")
    sparse = SparseModel.from_pretrained(
        saved_llama, sparsity_config=config, calibration=text_file, show_progress=False
    )
    assert sparse.sparsity_config is config and len(sparse.masks) == 14
    assert sparse.sparsity_report()["total"] == pytest.approx(0.5)
    assert sparse.base_model_id == saved_llama and sparse.tokenizer is not None
    assert sparse.calibration == f"{text_file}; 4 windows x 32 tokens, seed 0"
    assert next(sparse.model.parameters()).dtype == torch.float32


def test_from_pretrained_passes_gguf_file_to_model_and_tokenizer(tmp_path, monkeypatch):
    """A `.gguf` path becomes (its directory, gguf_file=name); no real GGUF parsing (that costs a real file)."""
    import transformers

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    calls = {}

    def fake_model(source, **kwargs):
        calls["model"] = (source, kwargs)
        return build_model("llama")

    def fake_tokenizer(source, **kwargs):
        calls["tokenizer"] = (source, kwargs)
        return build_tokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    config = SparsityConfig(method="magnitude", sparsity=0.5, device="cpu")
    sparse = SparseModel.from_pretrained(os.fspath(gguf), sparsity_config=config, show_progress=False)
    assert calls["model"] == (os.fspath(tmp_path), {"gguf_file": "tiny.gguf", "dtype": torch.float32})
    assert calls["tokenizer"] == (os.fspath(tmp_path), {"gguf_file": "tiny.gguf"})
    assert sparse.sparsity_report()["total"] == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SparseModel.from_pretrained(os.fspath(tmp_path / "missing.gguf"), sparsity_config=config)


def test_from_pretrained_downloads_a_hub_checkpoint_with_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    sparse = _pruned()
    sparse.save_pretrained(tmp_path / "snapshot", compact=True)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return os.fspath(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = SparseModel.from_pretrained("me/tiny-sparse", revision="v1", dtype=torch.float32)
    assert calls == [("me/tiny-sparse", {"revision": "v1"})]
    assert all(torch.equal(loaded.masks[name], sparse.masks[name]) for name in sparse.masks)
    assert torch.equal(_logits(loaded), _logits(sparse))
    with pytest.raises(FileNotFoundError, match="not a directory saved by SparseModel.save_pretrained"):
        SparseModel.from_pretrained(os.fspath(tmp_path / "no-such-dir"))


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "ckpt"
    _pruned().save_pretrained(directory)
    return directory


def test_loading_a_saved_model_leaves_the_trainer_machinery_unimported(saved):
    """A fresh interpreter: the Trainer callback modules come only with fine-tuning, not with loading."""
    code = (
        "import sys\n"
        "from optimum_sparse import SparseModel\n"
        f"sparse = SparseModel.from_pretrained({os.fspath(saved)!r})\n"
        "assert sparse.masks, 'no masks loaded'\n"
        "print(sorted(name for name in ('transformers.trainer_callback', 'optimum_sparse.callbacks') "
        "if name in sys.modules))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not an installed copy
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_loading_rejects_masks_of_another_shape(saved):
    masks = read_masks(saved / MASKS_NAME)
    masks["model.layers.0.mlp.up_proj"] = torch.ones(32, 64, dtype=torch.bool)  # (in, out) instead of (out, in)
    write_masks(saved / MASKS_NAME, masks)
    with pytest.raises(ValueError, match=r"up_proj has shape \[32, 64\] but the model's weight is \[64, 32\]"):
        SparseModel.from_pretrained(saved)


def test_loading_rejects_a_config_from_a_newer_format_version(saved):
    _edit_json(saved / CONFIG_NAME, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}, newer than this library"):
        SparseModel.from_pretrained(saved)


def test_loading_rejects_a_masks_file_from_a_newer_format_version(saved):
    masks = read_masks(saved / MASKS_NAME)
    tensors = {f"{name}.weight": pack_mask(mask) for name, mask in masks.items()}
    shapes = {f"{name}.weight": list(mask.shape) for name, mask in masks.items()}
    metadata = {
        "format": "optimum-sparse-masks",
        "format_version": str(FORMAT_VERSION + 1),
        "shapes": json.dumps(shapes),
    }
    save_file(tensors, saved / MASKS_NAME, metadata=metadata)
    with pytest.raises(ValueError, match="newer than this library supports"):
        SparseModel.from_pretrained(saved)


def test_loading_rejects_a_missing_masks_file_the_config_names(saved):
    os.remove(saved / MASKS_NAME)
    with pytest.raises(FileNotFoundError, match=f"says the masks are in {MASKS_NAME}"):
        SparseModel.from_pretrained(saved)


def test_loading_rejects_a_damaged_sparsity_config(saved):
    (saved / CONFIG_NAME).write_text('{"method": "magnitude", ', encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        SparseModel.from_pretrained(saved)


def test_loading_rejects_an_unknown_checkpoint_format(saved):
    _edit_json(saved / CONFIG_NAME, checkpoint={"format": "blocked-csr", "masks_file": MASKS_NAME})
    with pytest.raises(ValueError, match="unknown checkpoint format 'blocked-csr'"):
        SparseModel.from_pretrained(saved)


def test_loading_a_directory_not_saved_by_this_library_says_how_to_prune_it(saved_llama):
    with pytest.raises(FileNotFoundError, match="pass sparsity_config=SparsityConfig"):
        SparseModel.from_pretrained(saved_llama)


def test_compact_loading_rejects_values_that_do_not_fit_the_masks(tmp_path):
    _pruned().save_pretrained(tmp_path / "compact", compact=True)
    masks = read_masks(tmp_path / "compact" / MASKS_NAME)
    masks["model.layers.1.mlp.up_proj"][0, :] = True  # more kept entries than stored values
    write_masks(tmp_path / "compact" / MASKS_NAME, masks)
    with pytest.raises(ValueError, match=r"holds \d+ values but its mask keeps \d+ weights"):
        SparseModel.from_pretrained(tmp_path / "compact")


def test_saving_refuses_nonzero_weights_where_the_masks_prune(tmp_path):
    sparse = _pruned()
    name, mask = next(iter(sparse.masks.items()))
    with torch.no_grad():
        get_weight(sparse.model.get_submodule(name))[~mask] = 1.0
    with pytest.raises(ValueError, match="non-zero weights where its mask prunes them"):
        sparse.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    sparse.apply_masks().save_pretrained(tmp_path / "ckpt")
    assert torch.equal(SparseModel.from_pretrained(tmp_path / "ckpt").masks[name], mask)


# ------------------------------------------------------------------------------------------- atomic writes
def test_failure_during_save_leaves_the_old_directory_untouched(saved, monkeypatch):
    before = _snapshot(saved)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("optimum_sparse.sparse_checkpoint.write_masks", fail)
    with pytest.raises(OSError, match="disk full"):
        _pruned(sparsity=0.7).save_pretrained(saved, compact=True)
    assert _snapshot(saved) == before
    assert os.listdir(saved.parent) == ["ckpt"]  # no temporary directory left behind


def test_saving_over_a_checkpoint_replaces_it_as_a_whole(saved):
    _pruned(sparsity=0.7).save_pretrained(saved, compact=True)
    assert "model.safetensors" not in os.listdir(saved)  # the old dense weights are gone
    assert SparseModel.from_pretrained(saved).sparsity_config.sparsity == 0.7


def test_saved_directory_gets_the_umask_permissions_not_0700(tmp_path):
    _pruned().save_pretrained(tmp_path / "ckpt")
    os.mkdir(tmp_path / "plain")
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)


def test_saving_over_the_working_directory_is_refused(saved, monkeypatch):
    monkeypatch.chdir(saved)
    with pytest.raises(ValueError, match="current working directory"):
        _pruned().save_pretrained(".")
    assert os.path.samefile(os.getcwd(), saved) and MASKS_NAME in os.listdir(saved)


def test_saving_into_a_non_checkpoint_directory_needs_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a model checkpoint"):
        _pruned().save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


# ------------------------------------------------------------------------------------------- Hub upload
@pytest.mark.parametrize("compact", [False, True])
def test_push_to_hub_uploads_the_saved_files(compact, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["create"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), kwargs=kwargs)
        with open(os.path.join(folder_path, CONFIG_NAME), encoding="utf-8") as handle:
            uploaded["format"] = json.load(handle)["checkpoint"]["format"]
        return "commit-url"

    def create_branch(self, repo_id, *, branch, **kwargs):
        uploaded["branch"] = (repo_id, branch)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = _pruned().push_to_hub("me/tiny-sparse", compact=compact, private=True, revision="v1")
    weights = COMPACT_WEIGHTS_NAME if compact else "model.safetensors"
    assert result == "commit-url"
    assert uploaded["create"] == ("me/tiny-sparse", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert uploaded["repo_id"] == "me/tiny-sparse" and uploaded["format"] == ("compact" if compact else "dense")
    assert uploaded["files"] == sorted(
        ["README.md", "config.json", "generation_config.json", CONFIG_NAME, MASKS_NAME, weights]
    )
    assert uploaded["kwargs"]["commit_message"] == "Upload magnitude 50% model (optimum-sparse)"
    assert uploaded["branch"] == ("me/tiny-sparse", "v1") and uploaded["kwargs"]["revision"] == "v1"


# ------------------------------------------------------------------------------------------- CLI
def test_cli_prune_compact_output_loads_with_sparse_model_and_cli_eval(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    args = ["prune", "--model", saved_llama, "--method", "magnitude", "--sparsity", "2:4", "--device", "cpu"]
    assert cli.main(args + ["--output", os.fspath(output), "--compact", "--no-progress", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["checkpoint_ratio"] < 0.9 and record["checkpoint_weights_mb"] < record["dense_weights_mb"]
    assert COMPACT_WEIGHTS_NAME in os.listdir(output) and "tokenizer.json" in os.listdir(output)
    sparse = SparseModel.from_pretrained(output)
    assert sparse.sparsity_config.pattern == "2:4" and len(sparse.masks) == 14
    assert sparse.sparsity_report()["total"] == pytest.approx(0.5)
    for mask in sparse.masks.values():  # 2 kept in every group of 4 inputs
        assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2)
    evaluate = ["eval", "--model", os.fspath(output), "--eval-data", text_file, "--eval-seq-len", "32"]
    assert cli.main(evaluate + ["--eval-max-windows", "2", "--no-progress", "--json"]) == 0  # eval reads it too
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["measured_sparsity"] == pytest.approx(0.5) and 1 < record["ppl"] < 1000


def test_cli_compact_without_output_is_an_input_error(saved_llama, capsys):
    assert cli.main(["prune", "--model", saved_llama, "--method", "magnitude", "--compact", "--no-progress"]) == 2
    assert "--compact describes how --output is saved" in capsys.readouterr().err


def test_a_model_dequantised_from_gguf_saves_like_a_plain_model(tmp_path):
    """transformers leaves a GGUF quantizer on dequantised models and refuses to save them; we drop it."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_sparse.loading import forget_gguf_quantizer

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.config.quantization_config = {"quant_method": "gguf"}
    forget_gguf_quantizer(model)
    assert model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
