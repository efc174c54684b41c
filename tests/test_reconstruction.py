"""Block reconstruction after any mask: kept weights fitted to the dense block's output, masks exact."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, method_config

from optimum_sparse import SparsityConfig, prune
from optimum_sparse.architecture import get_weight


def _output_error(model, dense, windows) -> float:
    with torch.no_grad():
        pruned, reference = model(input_ids=windows).logits, dense(input_ids=windows).logits
    return float((pruned - reference).pow(2).sum() / reference.pow(2).sum())


def _pruned_pair(arch: str, windows, **settings):
    dense, model = build_model(arch), build_model(arch)
    config = method_config(device="cpu", **settings)
    return dense, model, prune(model, config, windows, show_progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_reconstruction_brings_the_pruned_model_closer_to_the_dense_one_with_the_same_masks(method, windows):
    dense, plain, plain_result = _pruned_pair("llama", windows, method=method, sparsity=0.7)
    _, rebuilt, result = _pruned_pair(
        "llama", windows, method=method, sparsity=0.7, reconstruction="block", reconstruction_holdout=0.25
    )
    assert set(result.masks) == set(plain_result.masks)
    first = [n for n in result.masks if ".layers.0." in n]  # later blocks see the reconstructed activations
    assert all(torch.equal(result.masks[n], plain_result.masks[n]) for n in first)
    for name, mask in result.masks.items():
        weight = get_weight(rebuilt.get_submodule(name))
        assert bool((weight[~mask] == 0).all())  # every pruned position still exactly zero
    reports = list(result.reconstruction.values())
    assert len(reports) == 2 and all(r.heldout_after <= r.heldout_before for r in reports)
    assert _output_error(rebuilt, dense, windows) < 0.9 * _output_error(plain, dense, windows)


def test_pruned_positions_get_zero_gradient_in_every_step(windows, monkeypatch):
    seen = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.extend((p, p.grad.detach().clone()) for group in self.param_groups for p in group["params"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    _, model, result = _pruned_pair(
        "llama", windows, method="magnitude", sparsity=0.5, reconstruction="block", reconstruction_epochs=1
    )
    names = {id(module.weight): name for name, module in model.named_modules() if name in result.masks}
    assert seen
    for param, grad in seen:
        mask = result.masks[names[id(param)]]
        assert bool((grad[~mask] == 0).all()) and bool((grad[mask] != 0).any())


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_dense_inputs_and_other_architectures(arch, windows):
    dense, plain, _ = _pruned_pair(arch, windows, method="wanda", sparsity=0.6)
    _, rebuilt, result = _pruned_pair(
        arch, windows, method="wanda", sparsity=0.6, reconstruction="block", reconstruction_inputs="dense"
    )
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    assert _output_error(rebuilt, dense, windows) < _output_error(plain, dense, windows)


def test_reconstruction_after_layer_budgets_and_after_a_refit_on_given_masks(windows):
    from optimum_sparse.refit import refit_weights

    dense, _, result = _pruned_pair("llama", windows, method="wanda", sparsity=0.6, sparsity_profile="owl")
    errors = {}
    for reconstruction in (None, "block"):
        model = build_model("llama")  # dense weights, the OWL run's masks given
        config = SparsityConfig(
            method="admm", reconstruction=reconstruction, device="cpu", admm_iterations=4, admm_gradual_steps=2
        )
        refit_weights(model, windows, masks=result.masks, config=config, show_progress=False)
        for name, mask in result.masks.items():
            assert bool((get_weight(model.get_submodule(name))[~mask] == 0).all())
        errors[reconstruction] = _output_error(model, dense, windows)
    assert errors["block"] < errors[None]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(reconstruction="layer"), "reconstruction must be None or 'block'"),
        (dict(reconstruction="block", reconstruction_inputs="mixed"), "reconstruction_inputs must be one of"),
        (dict(reconstruction="block", reconstruction_holdout=0.6), "reconstruction_holdout must be a number in"),
        (dict(reconstruction="block", reconstruction_epochs=0), "reconstruction_epochs must be a positive integer"),
    ],
)
def test_bad_reconstruction_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(method="wanda", **settings)


def test_reconstruction_after_a_refit_of_some_layers_only(windows):
    from optimum_sparse.refit import refit_weights

    _, _, result = _pruned_pair("llama", windows, method="wanda", sparsity=0.5)
    some = {name: mask for name, mask in result.masks.items() if "mlp" in name}
    model = build_model("llama")
    config = SparsityConfig(
        method="admm", reconstruction="block", device="cpu", admm_iterations=4, admm_gradual_steps=2
    )
    refit_weights(model, windows, masks=some, config=config, show_progress=False)
    assert all(bool((get_weight(model.get_submodule(n))[~m] == 0).all()) for n, m in some.items())
    assert float(get_weight(model.get_submodule("model.layers.0.self_attn.q_proj")).eq(0).float().mean()) == 0.0


def test_the_run_summary_adds_up_the_block_reports(windows):
    from optimum_sparse.reconstruction import summarize_reports

    _, _, result = _pruned_pair(
        "llama", windows, method="wanda", sparsity=0.6, reconstruction="block", reconstruction_holdout=0.25
    )
    reports = [result.reconstruction[i] for i in sorted(result.reconstruction)]
    summary = summarize_reports(result.reconstruction)
    assert summary["blocks"] == len(reports) == 2
    assert summary["epochs_run"] == sum(r.epochs for r in reports)
    assert summary["best_epochs"] == [r.best_epoch for r in reports]
    assert summary["seconds"] == pytest.approx(sum(r.seconds for r in reports)) and summary["seconds"] > 0
    assert summary["heldout_error_after"] == pytest.approx(sum(r.heldout_after for r in reports) / 2)
    assert summarize_reports({}) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_reconstruction_keeps_the_masks_and_brings_each_block_home(windows):
    """A model on the CPU pruned with device="cuda": each block is fitted on the GPU and moved back."""
    settings = dict(method="wanda", sparsity=0.6, reconstruction="block", reconstruction_holdout=0.25)
    cpu_model, gpu_model = build_model("llama"), build_model("llama")
    cpu = prune(cpu_model, SparsityConfig(device="cpu", **settings), windows, show_progress=False)
    gpu = prune(gpu_model, SparsityConfig(device="cuda", **settings), windows, show_progress=False)
    first = [name for name in cpu.masks if ".layers.0." in name]  # same inputs: Wanda picks the same masks
    assert all(torch.equal(gpu.masks[name], cpu.masks[name]) for name in first)
    for name, mask in gpu.masks.items():
        weight = get_weight(gpu_model.get_submodule(name))
        assert weight.device.type == "cpu" and bool((weight[~mask] == 0).all())
    for index, report in gpu.reconstruction.items():
        assert report.heldout_after <= report.heldout_before
        # float32 on both devices; the kernels' summation orders differ, so the fits agree only closely
        assert report.train_after == pytest.approx(cpu.reconstruction[index].train_after, rel=0.05)
