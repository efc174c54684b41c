"""2:4 sub-models as compressed semi-structured weights: swapped in, cached while stale, masked where torch refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_SIZE, build_model

from optimum_sparse import SparsityConfig
from optimum_sparse.masks import is_valid_nm
from optimum_sparse.pg.spaces.weight_space import NMSpace
from optimum_sparse.pg.submodels.masking import WeightMasker, sample_digest
from optimum_sparse.pg.submodels.semi_structured import SemiStructuredMasker

CONFIG = SparsityConfig(method="pg", pattern="2:4", samples_per_step=2)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


class RecordingConverter:
    """Stands in for torch's compressor on CPU: returns the masked weight, counts calls, refuses some shapes."""

    def __init__(self, refuse_rows: int | None = None):
        self.calls = 0
        self.refuse_rows = refuse_rows

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape[0] == self.refuse_rows:
            raise RuntimeError(f"shape {tuple(weight.shape)} is not supported")
        self.calls += 1
        return weight.clone()


def _space_with(model, converter: RecordingConverter) -> NMSpace:
    space = NMSpace(model, CONFIG)
    assert isinstance(space.masker, SemiStructuredMasker)
    space.masker.converter = converter
    return space


def _masked_reference(arch: str = "llama"):
    """A second copy of the model, masked in place by the reference masker."""
    model = build_model(arch)
    space = NMSpace(model, SparsityConfig(method="pg", pattern="2:4", pg_submodels="masked"))
    assert isinstance(space.masker, WeightMasker)
    return model, space


def test_compressed_sub_models_compute_the_masked_model_and_are_reused_while_stale():
    model = build_model("llama")
    converter = RecordingConverter()
    space = _space_with(model, converter)
    dense_parameters = {name: module.weight for name, module in space.layout.modules.items()}
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = _logits(model, ids)
    samples = space.sample(space.initial_scores(), 2, generator=torch.Generator().manual_seed(1))
    reference_model, reference = _masked_reference()
    layers = len(dense_parameters)

    for index in (0, 1, 0, 1):  # two samples of one step, alternated as the learner does
        space.activate(samples[index])
        reference.activate(samples[index])
        for name, module in space.layout.modules.items():
            assert module.weight is not dense_parameters[name]
            assert is_valid_nm(module.weight.detach() != 0, 2, 4)
        assert torch.allclose(_logits(model, ids), _logits(reference_model, ids), atol=1e-6)
    assert converter.calls == 2 * layers  # each sample compressed once
    assert space.instantiation_stats()["instantiations"] == 2

    space.deactivate()
    for name, module in space.layout.modules.items():
        assert module.weight is dense_parameters[name]
    assert torch.equal(_logits(model, ids), dense)

    space.activate(space.sample(space.initial_scores(), 1, generator=torch.Generator().manual_seed(2))[0])
    assert len(space.masker.cache) == 2  # capacity = samples_per_step: the oldest sample was evicted
    hard = space.harden(space.initial_scores())
    masks = space.finalize(hard)
    for name, module in space.layout.modules.items():
        assert module.weight is dense_parameters[name]
        assert torch.equal(module.weight.detach() != 0, masks[name] & (dense_parameters[name].detach() != 0))
    assert not space.masker.cache


def test_layers_torch_cannot_compress_are_masked_in_place():
    model = build_model("llama")
    refused_rows = model.config.intermediate_size  # gate_proj and up_proj
    space = _space_with(model, RecordingConverter(refuse_rows=refused_rows))
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = _logits(model, ids)
    sample = space.sample(space.initial_scores(), 1, generator=torch.Generator().manual_seed(3))[0]
    reference_model, reference = _masked_reference()

    space.activate(sample)
    reference.activate(sample)
    masked = sorted(space.masker.masked_layers)
    assert masked and all(name.endswith(("gate_proj", "up_proj")) for name in masked)
    assert len(space.masker.compressed_layers) + len(masked) == len(space.layout.modules)
    assert torch.allclose(_logits(model, ids), _logits(reference_model, ids), atol=1e-6)
    space.deactivate()
    assert torch.equal(_logits(model, ids), dense)


def test_conv1d_layers_are_masked_in_place():
    model = build_model("gpt2")  # Conv1D keeps (in, out) weights: 2:4 over inputs is not torch's layout
    space = _space_with(model, RecordingConverter())
    ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = _logits(model, ids)
    sample = space.sample(space.initial_scores(), 1, generator=torch.Generator().manual_seed(3))[0]
    reference_model, reference = _masked_reference("gpt2")
    space.activate(sample)
    reference.activate(sample)
    assert space.masker.compressed_layers == [] and len(space.masker.masked_layers) == len(space.layout.modules)
    assert torch.allclose(_logits(model, ids), _logits(reference_model, ids), atol=1e-6)
    space.deactivate()
    assert torch.equal(_logits(model, ids), dense)


def test_on_cpu_every_layer_falls_back_to_masking(caplog):
    model = build_model("llama")
    space = NMSpace(model, CONFIG)  # torch's own compressor: CUDA only
    sample = space.sample(space.initial_scores(), 1, generator=torch.Generator().manual_seed(4))[0]
    reference_model, reference = _masked_reference()
    ids = torch.randint(3, VOCAB_SIZE, (1, 8), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO", logger="optimum_sparse.pg.submodels.semi_structured"):
        space.activate(sample)
    reference.activate(sample)
    assert space.masker.compressed_layers == [] and len(space.masker.masked_layers) == len(space.layout.modules)
    assert "0 of 14 layers compressed" in caplog.text and "CUDA" in caplog.text
    assert torch.equal(_logits(model, ids), _logits(reference_model, ids))
    assert space.instantiation_stats() == {}


def test_sample_digest_tells_samples_apart():
    space = NMSpace(build_model("llama"), CONFIG)
    samples = space.sample(space.initial_scores(), 2, generator=torch.Generator().manual_seed(5))
    assert sample_digest(samples[0]) == sample_digest(samples[0].clone())
    assert sample_digest(samples[0]) != sample_digest(samples[1])


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="semi-structured sparse tensors need a CUDA GPU with compute capability >= 8.0",
)
def test_cuda_sub_models_are_semi_structured_tensors():
    from torch.sparse import SparseSemiStructuredTensor

    model = build_model("llama", hidden_size=128, intermediate_size=256).half().cuda()
    space = NMSpace(model, CONFIG)
    ids = torch.randint(3, VOCAB_SIZE, (2, 64), device="cuda")
    sample = space.sample(space.initial_scores().cuda(), 1)[0]
    masks = space.weight_masks(sample)
    space.activate(sample)
    assert space.masker.masked_layers == []
    assert all(isinstance(m.weight.data, SparseSemiStructuredTensor) for m in space.layout.modules.values())
    compressed = _logits(model, ids).float()
    space.deactivate()
    with torch.no_grad():
        for name, module in space.layout.modules.items():
            module.weight.mul_(masks[name].to(module.weight.dtype))
    assert torch.allclose(compressed, _logits(model, ids).float(), atol=2e-2, rtol=2e-2)
