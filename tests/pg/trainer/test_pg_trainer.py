"""SparsityCallback driving a plain transformers.Trainer on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from conftest import SEQ_LEN, build_model
from pg_helpers import Windows, make_trainer
from transformers import Trainer

from optimum_sparse import SparsityCallback, SparsityConfig, load_sliced_model, save_sliced_model
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.masks import is_valid_nm


@pytest.fixture
def dataset(tokenizer, calibration_text) -> Windows:
    return Windows(sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0))


def _trainer(model, dataset, callback, tmp_path, steps: int = 4, **overrides) -> Trainer:
    return make_trainer(model, dataset, callback, tmp_path, steps, **overrides)


def test_trainer_learns_channel_scores(dataset, tmp_path):
    model = build_model("llama")
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, refresh_every=2, num_samples=8)
    callback = SparsityCallback(config)
    trainer = _trainer(model, dataset, callback, tmp_path, steps=5)
    learner = callback.learner
    assert learner is not None  # prepared by on_init_end
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["pg_mask_scores.scores"]

    seen: list[torch.Tensor] = []
    original_project = learner.project

    def spy_project():
        original_project()
        seen.append(learner.scores.detach().clone())
        # no gradient ever reaches the frozen base weights
        assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("pg_"))

    learner.project = spy_project
    trainer.train()
    assert len(seen) == 5
    costs = callback.space.costs
    for scores in seen:  # on budget after every step
        kept = float((scores.double().cpu() * costs).sum())
        assert kept == pytest.approx(callback.space.budget, rel=1e-6)
        assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0
    assert not torch.allclose(seen[0], seen[-1])
    history = callback.history
    assert len(history) == 5 and history[-1]["refreshes"] == 3.0  # steps 0, 2, 4
    assert [h["staleness"] for h in history] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert all(h["ratio_max"] <= config.clip + 1e-6 for h in history)
    logged = [entry for entry in trainer.state.log_history if "pg_expected_sparsity" in entry]
    assert logged and {"loss", "pg_baseline", "pg_clipped_fraction", "pg_refreshes"} <= set(logged[0])

    # the model ends hardened: its forward is its own again, nothing trainable was added, masks written
    assert "forward" not in model.__dict__ and not hasattr(model, "pg_mask_scores")
    assert all(p.requires_grad for p in model.parameters())
    assert 0.3 <= callback.space.sparsity_of(callback.hard_mask) < 0.3 + 1536 / 18432
    for name, parameter in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if name.endswith("weight") and module_name in callback.masks:
            mask = callback.masks[module_name]
            assert torch.equal(parameter.detach(), dense[name] * mask)
        else:
            assert torch.equal(parameter.detach(), dense[name])
    # the pruned model and its sliced version compute the same logits
    ids = dataset.ids[:2]
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    kept = callback.slice_model()
    with torch.no_grad():
        sliced = model(input_ids=ids).logits
    assert torch.allclose(masked, sliced, atol=1e-5)
    # ... and the sliced model saves and reloads as itself (widths recorded in the config)
    assert model.config.sliced_units == kept
    save_sliced_model(model, tmp_path / "sliced")
    with torch.no_grad():
        assert torch.equal(load_sliced_model(tmp_path / "sliced")(input_ids=ids).logits, sliced)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_trainer_weight_masks(dataset, tmp_path, pattern):
    model = build_model("llama")
    config = SparsityConfig(
        method="pg",
        pattern=pattern,
        sparsity=None if pattern == "2:4" else 0.5,
        preconditioner="adam",
        samples_per_step=2,
        num_samples=8,
        harden_scope="layer",
    )
    callback = SparsityCallback(config)
    trainer = _trainer(
        model,
        dataset,
        callback,
        tmp_path,
        steps=3,
        optim="adamw_torch",
        learning_rate=0.01,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    before = callback.learner.scores.detach().clone()
    trainer.train()
    assert not torch.equal(before, callback.learner.scores.detach())
    assert len(callback.history) == 3
    for name, mask in callback.masks.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight == 0, ~mask) or bool((weight[~mask] == 0).all())
        if pattern == "2:4":
            assert is_valid_nm(mask, 2, 4) and int(mask.sum()) * 2 == mask.numel()
        else:
            assert int((~mask).sum()) == round(mask.numel() * 0.5)


def test_eval_uses_hard_mask_and_config_validation(dataset, tmp_path):
    model = build_model("opt")
    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.5, init="uniform")
    callback = SparsityCallback(config)
    trainer = _trainer(model, dataset, callback, tmp_path, steps=2)
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert metrics["eval_loss"] > 0
    with pytest.raises(ValueError, match="clip"):
        SparsityConfig(method="pg", clip=0.5)
    with pytest.raises(ValueError, match="refresh_every"):
        SparsityConfig(method="pg", refresh_every=0)
    with pytest.raises(ValueError, match="preconditioner"):
        SparsityConfig(method="pg", preconditioner="newton")
    with pytest.raises(ValueError, match="SparsityCallback"):
        from optimum_sparse import prune

        prune(build_model("llama"), config)


def test_final_admm_refit_keeps_the_mask(dataset, tmp_path):
    model = build_model("llama")
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = SparsityConfig(
        method="pg", sparsity=0.5, final_weight_update="admm", admm_iterations=4, admm_gradual_steps=2
    )
    callback = SparsityCallback(config, calibration=dataset.ids[:4])
    _trainer(model, dataset, callback, tmp_path, steps=2).train()
    changed = 0
    for name, mask in callback.masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert bool((weight[~mask] == 0).all())
        changed += int(not torch.allclose(weight, dense[f"{name}.weight"] * mask))
    assert changed == len(callback.masks)  # every layer's kept weights were refitted
