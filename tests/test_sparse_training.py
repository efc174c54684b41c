"""Fine-tuning a pruned model keeps its zeros: Trainer with SparseFineTuneCallback, and LoRA merged with merge_and_mask."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from transformers import Trainer, TrainingArguments

from optimum_sparse import SparseFineTuneCallback, SparseModel, SparsityConfig, merge_and_mask
from optimum_sparse.architecture import get_weight
from optimum_sparse.mask_buffers import MASK_BUFFER, masked_modules
from optimum_sparse.sequential import prune

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 14, 20, 3, 7, 30, 41, 12, 8, 2]])
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _pruned(arch: str = "llama") -> SparseModel:
    model = build_model(arch)
    config = SparsityConfig(method="magnitude", sparsity=0.5, device="cpu")
    return SparseModel(model, masks=prune(model, config, None, show_progress=False).masks, config=config)


def _data() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, 60, (16, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(model, tmp_path, callbacks=(), steps: int = 4, learning_rate: float = 1e-2) -> None:
    """A few AdamW steps with weight decay: every weight with a gradient moves."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_data(), callbacks=list(callbacks)).train()


def _nonzero_where_pruned(sparse: SparseModel, model=None) -> int:
    model = sparse.model if model is None else model
    return sum(int((get_weight(model.get_submodule(n)) != 0)[~mask].sum()) for n, mask in sparse.masks.items())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------------------- full fine-tuning
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain-model", "sparse-model"])
def test_trainer_with_the_callback_keeps_exactly_the_pruned_zeros(wrapped, tmp_path):
    sparse = _pruned()
    before = {name: get_weight(sparse.model.get_submodule(name)).clone() for name in sparse.masks}
    _train(sparse if wrapped else sparse.model, tmp_path, [SparseFineTuneCallback(sparse)])
    for name, mask in sparse.masks.items():
        weight = get_weight(sparse.model.get_submodule(name))
        assert torch.equal(weight != 0, mask), name  # zeros exactly where pruned, nowhere else
        assert not torch.equal(weight[mask], before[name][mask]), f"{name}: kept weights did not train"
    assert sparse.sparsity_report()["total"] == 0.5


def test_trainer_without_the_callback_fills_the_pruned_weights_in(tmp_path):
    """The control of the test above: plain AdamW does move pruned weights."""
    sparse = _pruned()
    _train(sparse.model, tmp_path)
    assert _nonzero_where_pruned(sparse) > 0.9 * sum(int((~mask).sum()) for mask in sparse.masks.values())


def test_callback_keeps_transposed_gpt2_masks_and_trained_model_saves_and_reloads(tmp_path):
    sparse = _pruned("gpt2")
    _train(sparse.model, tmp_path, [SparseFineTuneCallback(sparse.masks)], steps=2)
    assert _nonzero_where_pruned(sparse) == 0
    assert len(masked_modules(sparse.model)) == len(sparse.masks)
    sparse.save_pretrained(tmp_path / "ckpt")
    loaded = SparseModel.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(loaded.masks[name], sparse.masks[name]) for name in sparse.masks)
    assert torch.equal(_logits(loaded), _logits(sparse.eval()))  # eval: Trainer left GPT-2's dropout on


def test_mask_buffers_zero_gradients_stay_out_of_the_state_dict_and_can_be_removed():
    sparse = _pruned()
    keys = set(sparse.model.state_dict())
    sparse.keep_masks()
    name = "model.layers.0.mlp.up_proj"
    module = sparse.model.get_submodule(name)
    assert torch.equal(module._buffers[MASK_BUFFER], sparse.masks[name])
    assert set(sparse.model.state_dict()) == keys  # non-persistent: never saved
    sparse.model(IDS, labels=IDS).loss.backward()
    grad = module.weight.grad
    assert torch.all(grad[~sparse.masks[name]] == 0) and torch.any(grad[sparse.masks[name]] != 0)
    sparse.keep_masks(False)
    assert masked_modules(sparse.model) == []
    sparse.model.zero_grad()
    sparse.model(IDS, labels=IDS).loss.backward()
    assert torch.any(module.weight.grad[~sparse.masks[name]] != 0)  # hook removed too


def test_from_pretrained_keep_masks_registers_the_buffers_for_training(tmp_path):
    _pruned().save_pretrained(tmp_path / "ckpt")
    sparse = SparseModel.from_pretrained(tmp_path / "ckpt", keep_masks=True)
    assert len(masked_modules(sparse.model)) == len(sparse.masks) == 14
    _train(sparse.model, tmp_path, [SparseFineTuneCallback()], steps=2)  # the buffers alone are enough
    assert _nonzero_where_pruned(sparse) == 0


def test_callback_without_any_masks_says_how_to_provide_them(tmp_path):
    with pytest.raises(ValueError, match="found no masks on the Trainer's model"):
        _train(build_model("llama"), tmp_path, [SparseFineTuneCallback()], steps=1)


# ------------------------------------------------------------------------------------------- LoRA
def _lora(model, arch: str = "llama"):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch], fan_in_fan_out=arch == "gpt2"
    )
    return peft.get_peft_model(model, config)


def _masked_delta_model(peft_model, sparse: SparseModel, arch: str):
    """Reference: the base model plus each LoRA delta restricted to the kept weights (built by hand)."""
    state = {key: value.clone() for key, value in sparse.model.state_dict().items() if "lora_" not in key}
    for name, module in peft_model.get_base_model().named_modules():
        if not hasattr(module, "get_delta_weight"):
            continue
        delta = module.get_delta_weight("default").detach()  # in the base weight's own layout
        mask = sparse.masks[name].t() if arch == "gpt2" else sparse.masks[name]
        state[f"{name}.weight"] = module.get_base_layer().weight.detach() + delta * mask
    reference = build_model(arch)
    reference.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items()})
    return reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_then_merge_and_mask_keeps_the_zeros_and_the_kept_weights_update(arch, tmp_path):
    sparse = _pruned(arch)
    peft_model = _lora(sparse.model, arch)
    _train(peft_model, tmp_path)
    peft_model.eval()  # Trainer leaves the model in train mode (GPT-2 has dropout)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.any(p != 0) for p in lora_b)  # LoRA trained (B starts at zero)
    reference = _masked_delta_model(peft_model, sparse, arch)
    unmerged = _logits(peft_model)
    merged = merge_and_mask(peft_model, sparse)
    assert _nonzero_where_pruned(sparse, merged) == 0
    for name, mask in sparse.masks.items():
        assert torch.equal(get_weight(merged.get_submodule(name)) != 0, mask), name
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(merged), unmerged, atol=1e-4)  # the unmasked delta did touch pruned weights


def test_plain_merge_and_unload_loses_the_zeros(tmp_path):
    """The control: merging without re-masking fills the pruned weights of the adapted layers in."""
    sparse = _pruned()
    peft_model = _lora(sparse.model)
    _train(peft_model, tmp_path, steps=2)
    merged = peft_model.merge_and_unload()
    assert _nonzero_where_pruned(sparse, merged) > 0


@pytest.mark.parametrize("source", ["buffers", "dict", "zeros"])
def test_merge_and_mask_finds_the_masks_in_buffers_a_dict_or_the_base_zeros(source, tmp_path):
    sparse = _pruned()
    if source == "buffers":
        sparse.keep_masks()
    peft_model = _lora(sparse.model)
    _train(peft_model, tmp_path, [SparseFineTuneCallback()] if source == "buffers" else (), steps=2)
    merged = merge_and_mask(peft_model, dict(sparse.masks) if source == "dict" else None)
    for name, mask in sparse.masks.items():
        assert torch.equal(get_weight(merged.get_submodule(name)) != 0, mask), name


def test_saving_with_unmerged_adapters_is_refused_and_saving_the_merged_model_works(tmp_path):
    sparse = _pruned()
    peft_model = _lora(sparse.model)
    with pytest.raises(ValueError, match="carries an adapter"):
        sparse.save_pretrained(tmp_path / "ckpt")
    merged = SparseModel(merge_and_mask(peft_model, sparse), sparse.masks, sparse.sparsity_config)
    merged.save_pretrained(tmp_path / "ckpt", compact=True)
    loaded = SparseModel.from_pretrained(tmp_path / "ckpt")
    assert "lora" not in " ".join(loaded.model.state_dict())
    assert all(torch.equal(loaded.masks[name], sparse.masks[name]) for name in sparse.masks)


def test_merge_and_mask_rejects_masks_of_the_wrong_shape(tmp_path):
    sparse = _pruned()
    peft_model = _lora(sparse.model)
    with pytest.raises(ValueError, match=r"has shape \[4, 4\] but the weight is \[32, 32\]"):
        merge_and_mask(peft_model, {"model.layers.0.self_attn.q_proj": torch.ones(4, 4, dtype=torch.bool)})
