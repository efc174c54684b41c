"""Sliced channel sub-models (built once per sample, swapped in while stale) against masked ones."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, SEQ_LEN, VOCAB_SIZE, build_model
from pg_helpers import Windows, make_trainer

from optimum_sparse import SparsityCallback, SparsityConfig
from optimum_sparse.calibration import sample_windows, tokenize
from optimum_sparse.pg.submodels.instances import SlicedSubModels
from optimum_sparse.pg.submodels.masking import ChannelMasker
from optimum_sparse.structured.units import find_channel_groups


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliced_sub_model_equals_masked_and_is_cached(arch):
    masked_model, model = build_model(arch), build_model(arch)
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    masker = ChannelMasker(find_channel_groups(masked_model))
    groups = find_channel_groups(model)
    instances = SlicedSubModels(groups, capacity=2)
    dense, size = _logits(model, ids), _num_parameters(model)

    generator = torch.Generator().manual_seed(1)
    first = torch.rand(sum(g.num_units for g in groups), generator=generator) < 0.5
    second = first.clone()
    for group in groups[-2:]:  # the last block loses every KV group and every channel
        second[group.units] = False
    for keep in (first, second):
        masker.activate(keep)
        instances.activate(keep)
        assert _num_parameters(model) < size
        sliced, expected = _logits(model, ids), _logits(masked_model, ids)
        assert torch.allclose(sliced, expected, atol=1e-5), (sliced - expected).abs().max()
        instances.deactivate()
        assert torch.equal(_logits(model, ids), dense) and _num_parameters(model) == size

    # stale reuse swaps the cached layers in again: no new instantiation
    instances.activate(first)
    masker.activate(first)
    assert instances.instantiations == 2 and instances.seconds > 0
    assert torch.allclose(_logits(model, ids), _logits(masked_model, ids), atol=1e-5)
    instances.activate(torch.ones_like(first))  # a third mask evicts the least recently used (second)
    assert instances.instantiations == 3 and len(instances.cache) == 2
    instances.remove()
    assert torch.equal(_logits(model, ids), dense) and not instances.cache


@pytest.fixture
def dataset(tokenizer, calibration_text) -> Windows:
    return Windows(sample_windows(tokenize(calibration_text, tokenizer), 16, SEQ_LEN, seed=0))


def test_trainer_sliced_and_masked_sub_models_learn_the_same_scores(dataset, tmp_path):
    scores, histories = {}, {}
    for submodels in ("sliced", "masked"):
        model = build_model("llama")
        config = SparsityConfig(
            method="pg", pattern="channels", sparsity=0.3, refresh_every=3, num_samples=8, pg_submodels=submodels
        )
        callback = SparsityCallback(config)
        trainer = make_trainer(model, dataset, callback, tmp_path / submodels, steps=6)
        trainer.train()
        scores[submodels] = callback.learner.scores.detach().clone()
        histories[submodels] = callback.history
        if submodels == "sliced":
            logged = [entry for entry in trainer.state.log_history if "pg_instantiations" in entry]
            assert logged and logged[-1]["pg_instantiation_seconds"] > 0
    assert torch.allclose(scores["sliced"], scores["masked"], atol=1e-5)
    # one instantiation per refresh (steps 0 and 3), reused for the stale steps in between
    assert [h["instantiations"] for h in histories["sliced"]] == [1, 1, 1, 2, 2, 2]
    assert [h["refreshes"] for h in histories["sliced"]] == [1, 1, 1, 2, 2, 2]
    assert "instantiations" not in histories["masked"][0]
