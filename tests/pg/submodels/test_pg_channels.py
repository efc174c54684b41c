"""Channel units: enumeration, costs, masking by hooks, and slicing into a smaller dense model."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, INTERMEDIATE, VOCAB_SIZE, build_model

from optimum_sparse.config import SparsityConfig
from optimum_sparse.pg.estimation.estimator import ScoreFunctionEstimator
from optimum_sparse.pg.learner import StaleSubModelLearner
from optimum_sparse.pg.submodels.masking import ChannelMasker
from optimum_sparse.pg.trainer.callback import build_space
from optimum_sparse.structured.slicing import slice_channels
from optimum_sparse.structured.units import find_channel_groups, unit_costs


def _random_keep(groups, generator) -> torch.Tensor:
    keep = torch.rand(sum(g.num_units for g in groups), generator=generator) < 0.5
    for group in groups:
        if group.kind == "attention":
            keep[group.offset] = True  # at least one KV group per attention module
    return keep


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliced_model_equals_masked_model(arch):
    model = build_model(arch)
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    groups = find_channel_groups(model)
    keep = _random_keep(groups, torch.Generator().manual_seed(1))
    masker = ChannelMasker(groups)
    dense = _logits(model, ids)
    masker.activate(keep)
    masked = _logits(model, ids)
    assert not torch.allclose(masked, dense, atol=1e-4)
    masker.deactivate()
    assert torch.allclose(_logits(model, ids), dense)
    masker.remove()
    params_before = sum(p.numel() for p in model.parameters())
    slice_channels(groups, keep)
    sliced = _logits(model, ids)
    assert torch.allclose(sliced, masked, atol=1e-5), (sliced - masked).abs().max()
    removed = float(unit_costs(groups).mul((~keep).double()).sum())
    assert params_before - sum(p.numel() for p in model.parameters()) == int(removed)


def test_llama_units_and_costs():
    model = build_model("llama")  # 4 query heads, 2 KV heads (GQA), head_dim 8, hidden 32
    groups = find_channel_groups(model)
    assert [g.kind for g in groups] == ["attention", "mlp"] * 2
    attention, mlp = groups[0], groups[1]
    assert attention.num_units == 2 and attention.heads_per_unit == 2
    assert attention.unit_cost == 2 * 8 * 32 + 8 * 32 + 8 * 32 + 32 * 2 * 8  # q rows, k rows, v rows, o columns
    assert mlp.num_units == INTERMEDIATE and mlp.unit_cost == 3 * 32
    assert [g.offset for g in groups] == [0, 2, 2 + INTERMEDIATE, 4 + INTERMEDIATE]
    # all units cover all weights of the blocks' linears (Llama has no biases)
    linears = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert int(unit_costs(groups).sum()) == linears


def test_sliced_llama_attributes_and_generation():
    model = build_model("llama")
    groups = find_channel_groups(model)
    keep = torch.ones(sum(g.num_units for g in groups), dtype=torch.bool)
    keep[groups[0].offset + 1] = False  # drop one KV group (2 query heads) of block 0
    keep[groups[1].offset : groups[1].offset + 10] = False  # and 10 MLP channels
    slice_channels(groups, keep)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 16 and layer.self_attn.k_proj.out_features == 8
    assert layer.self_attn.o_proj.in_features == 16 and layer.mlp.down_proj.in_features == INTERMEDIATE - 10
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_every_attention_group_pruned_is_refused():
    model = build_model("opt")
    groups = find_channel_groups(model)
    keep = torch.ones(sum(g.num_units for g in groups), dtype=torch.bool)
    keep[groups[0].units] = False
    with pytest.raises(ValueError, match="KV group"):
        slice_channels(groups, keep)


def test_wanda_init_spreads_the_budget_over_layers_whose_metric_scale_differs():
    """Activation norms grow with depth: a per-layer z-score keeps every layer, not just the deep ones."""
    from optimum_sparse.pg.spaces.channel_space import ChannelSpace

    model = build_model("llama")
    space = ChannelSpace(model, sparsity=0.5)
    metric = torch.rand(space.num_units, generator=torch.Generator().manual_seed(0)) + 0.5
    for depth, group in enumerate(space.groups):
        metric[group.offset : group.offset + group.num_units] *= 100.0**depth  # deeper: larger metric
    hard = space.harden(space.init_from_metric(metric))
    assert space.sparsity_of(hard) == pytest.approx(0.5, abs=0.05)
    for group in space.groups:
        if group.kind == "mlp":
            kept = float(hard[group.offset : group.offset + group.num_units].float().mean())
            assert 0.2 < kept < 0.8, f"{group.name} keeps {kept:.2f} of its channels"


@pytest.mark.parametrize("sharing", [1.0, 0.5])
def test_layer_sharing_mixes_each_units_gradient_with_its_layer_mean(sharing):
    config = SparsityConfig(method="pg", pattern="channels", sparsity=0.3, layer_sharing=sharing)
    space = build_space(build_model("llama"), config)

    def gradient(layer_sharing: float) -> torch.Tensor:
        learner = StaleSubModelLearner(space, ScoreFunctionEstimator(), seed=0, layer_sharing=layer_sharing)
        learner.estimator.baseline = 1.0
        learner.training_loss(lambda: torch.tensor(2.5)).backward()
        learner.deactivate()
        return learner.scores.grad.clone()

    plain, shared = gradient(0.0), gradient(sharing)
    for group in space.groups:
        units = slice(group.offset, group.offset + group.num_units)
        expected = (1 - sharing) * plain[units] + sharing * plain[units].mean()
        torch.testing.assert_close(shared[units], expected)
        if sharing == 1.0:  # a layer's scores move together
            assert torch.allclose(shared[units], shared[units][0].expand(group.num_units))
    assert not torch.allclose(plain, shared)


def test_layer_sharing_is_refused_outside_channels():
    with pytest.raises(ValueError, match="layer_sharing applies to pattern 'channels'"):
        SparsityConfig(method="pg", pattern="unstructured", sparsity=0.5, layer_sharing=0.5)
    with pytest.raises(ValueError, match=r"layer_sharing must be a number in \[0, 1\]"):
        SparsityConfig(method="pg", pattern="channels", sparsity=0.5, layer_sharing=2)
