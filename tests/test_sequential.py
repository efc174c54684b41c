"""The layer-wise engine: faithful activations, sequential updates, and which layers get pruned."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import SEQ_LEN, build_model

from optimum_sparse.architecture import find_blocks, find_prunable_layers, get_weight
from optimum_sparse.blocks import capture_block_inputs, input_groups
from optimum_sparse.config import SparsityConfig
from optimum_sparse.masks import is_valid_nm, num_pruned
from optimum_sparse.sequential import prune


def _config(method: str = "wanda", **kwargs) -> SparsityConfig:
    return SparsityConfig(method=method, num_samples=4, seq_len=SEQ_LEN, device="cpu", **kwargs)


def _record_block(block: torch.nn.Module):
    """Hooks recording every hidden-state input and output of `block`; returns (inputs, outputs, remove)."""
    inputs, outputs = [], []

    def pre_hook(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def hook(module, args, kwargs, output):
        outputs.append((output[0] if isinstance(output, (tuple, list)) else output).detach().clone())

    handles = [
        block.register_forward_pre_hook(pre_hook, with_kwargs=True),
        block.register_forward_hook(hook, with_kwargs=True),
    ]
    return inputs, outputs, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_activations_equal_a_forward_of_the_pruned_model(arch, method, windows):
    """What the engine fed to (and computed in) the last block is what the pruned model computes itself.

    The Gemma model mixes sliding-window and global layers (different masks and rotary tables per block),
    so replaying block 0's arguments for every block would fail here.
    """
    model = build_model(arch)
    _, blocks = find_blocks(model)
    engine_in, engine_out, remove = _record_block(blocks[-1])
    try:
        prune(model, _config(method), windows, show_progress=False)
    finally:
        remove()
    # the engine stacks windows into batched calls: split every recorded call back into windows. The last
    # block ran at least once per window for statistics, then once more, pruned, to produce its outputs:
    # those final runs are the last len(windows) windows
    engine_in = [window for call in engine_in for window in call.split(1)]
    engine_out = [window for call in engine_out for window in call.split(1)]
    assert len(engine_out) >= 2 * len(windows)
    assert len(engine_in) >= len(engine_out)
    direct_in, direct_out, remove = _record_block(blocks[-1])
    try:
        with torch.no_grad():
            for row in windows:
                model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        remove()
    for engine, direct in zip(engine_in[-len(windows) :], direct_in):
        torch.testing.assert_close(engine, direct, rtol=1e-5, atol=1e-5)
    for engine, direct in zip(engine_out[-len(windows) :], direct_out):
        torch.testing.assert_close(engine, direct, rtol=1e-5, atol=1e-5)


def test_captured_block_inputs_replayed_by_hand_match_the_model(windows):
    """capture_block_inputs + running blocks by hand reproduces the model's own last-block inputs."""
    model = build_model("gemma")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    assert len(inputs.hidden) == len(windows)
    assert inputs.per_block is not None and len(inputs.per_block) == len(blocks)
    hidden = inputs.hidden
    with torch.no_grad():
        for index, block in enumerate(list(blocks)[:-1]):
            inputs.use_block(index)
            hidden = [inputs.run(block, h) for h in hidden]
        inputs.use_block(len(blocks) - 1)
        by_hand_out = [inputs.run(blocks[-1], h) for h in hidden]
    direct_in, direct_out, remove = _record_block(blocks[-1])
    with torch.no_grad():
        for row in windows:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    remove()
    for mine, theirs in zip(hidden + by_hand_out, direct_in + direct_out):
        torch.testing.assert_close(mine, theirs)


def test_pruned_logits_differ_from_dense_and_are_finite(arch, windows):
    model = build_model(arch)
    with torch.no_grad():
        dense = model(input_ids=windows).logits
    result = prune(model, _config("sparsegpt"), windows, show_progress=False)
    with torch.no_grad():
        pruned = model(input_ids=windows).logits
    assert torch.isfinite(pruned).all()
    assert (pruned - dense).abs().max() > 1e-3
    assert result.sparsity == pytest.approx(0.5)
    assert result.seconds > 0


def test_sequential_update_groups_layers_by_shared_input(windows):
    model = build_model("llama")
    config = _config("sparsegpt")
    _, blocks = find_blocks(model)
    layers = find_prunable_layers(model, config)[0]
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    groups = [[layer.name.rsplit(".", 1)[-1] for layer in group] for group in input_groups(blocks[0], layers, inputs)]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _output_error(model, dense_logits, windows) -> float:
    with torch.no_grad():
        return float((model(input_ids=windows).logits - dense_logits).pow(2).mean())


def test_sequential_update_is_valid_and_not_worse_for_sparsegpt(windows):
    dense = build_model("llama")
    with torch.no_grad():
        dense_logits = dense(input_ids=windows).logits
    results, output_errors = {}, {}
    for sequential in (False, True):
        model = build_model("llama")
        results[sequential] = prune(
            model, _config("sparsegpt", sparsity=0.5, sequential_update=sequential), windows, show_progress=False
        )
        output_errors[sequential] = _output_error(model, dense_logits, windows)
        for name, mask in results[sequential].masks.items():
            assert int((~mask).sum()) == num_pruned(mask.numel(), 0.5), name
            assert torch.all(get_weight(model.get_submodule(name))[~mask] == 0), name
    plain, seq = results[False], results[True]
    assert plain.layer_errors.keys() == seq.layer_errors.keys() == plain.masks.keys()
    assert all(0 < e < 1 for e in seq.layer_errors.values())
    # q/k/v of block 0 see the same inputs either way; later groups are calibrated on pruned outputs
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        assert seq.layer_errors[name] == pytest.approx(plain.layer_errors[name], rel=1e-5)
    later = [n for n in plain.layer_errors if ".layers.1." in n or "mlp" in n]
    assert any(abs(seq.layer_errors[n] - plain.layer_errors[n]) > 1e-6 for n in later)
    mean = {k: sum(r.layer_errors.values()) / len(r.layer_errors) for k, r in results.items()}
    assert mean[True] <= mean[False] * 1.05, mean
    assert output_errors[True] <= output_errors[False] * 1.05, output_errors


# ---------------------------------------------------------------------------- which layers are pruned


def test_lm_head_and_embeddings_are_never_pruned(arch, windows):
    model = build_model(arch)
    before = {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if re.search(r"embed|wte|wpe|lm_head|embed_positions", name)
    }
    assert before, "no embedding parameters found"
    result = prune(model, _config("magnitude", sparsity=0.7), windows, show_progress=False)
    assert not any(re.search(r"lm_head|embed|wte|wpe", name) for name in result.masks)
    blocks_name, _ = find_blocks(model)
    assert all(name.startswith(blocks_name + ".") for name in result.masks)
    after = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_targets_restrict_pruning_to_matching_layers(windows):
    model = build_model("llama")
    attention = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" in n}
    result = prune(model, _config(targets=[r"mlp\.(gate|up)_proj"]), windows, show_progress=False)
    assert sorted(result.masks) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up"))
    for name, value in attention.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == 0.0


def test_ignore_excludes_matching_layers(windows):
    model = build_model("llama")
    down = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    result = prune(model, _config(ignore=[r"down_proj$", r"layers\.0\.self_attn"]), windows, show_progress=False)
    assert not any(name.endswith("down_proj") or "layers.0.self_attn" in name for name in result.masks)
    assert "model.layers.1.self_attn.q_proj" in result.masks
    assert len(result.masks) == 2 * 7 - 2 - 4
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, down)


def test_string_target_is_accepted_as_one_pattern():
    config = _config(targets="q_proj", ignore="layers\\.1")
    assert config.targets == ["q_proj"] and config.ignore == ["layers\\.1"]
    layers = find_prunable_layers(build_model("llama"), config)
    assert [layer.name for group in layers.values() for layer in group] == ["model.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_conv1d_layers_are_pruned_along_their_input_dimension(method, windows):
    """GPT-2's Conv1D stores (in, out): N:M groups must run along dim 0 of the stored weight."""
    model = build_model("gpt2")
    result = prune(model, _config(method, pattern="2:4"), windows, show_progress=False)
    names = {n.split(".", 3)[-1] for n in result.masks}
    assert names == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    for name, mask in result.masks.items():
        module = model.get_submodule(name)
        stored = module.weight  # (in, out)
        assert mask.shape == (stored.shape[1], stored.shape[0])
        nonzero = stored != 0
        # groups of 4 consecutive inputs (down a column of the stored weight) keep exactly 2
        along_inputs = nonzero.t().reshape(stored.shape[1], -1, 4).sum(-1)
        assert torch.all(along_inputs == 2), name
        assert is_valid_nm(mask, 2, 4)
        # ... while groups along the output dimension (the wrong one) are not 2:4
        along_outputs = nonzero.reshape(stored.shape[0], -1, 4).sum(-1)
        assert not torch.all(along_outputs <= 2), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows[:1]).logits).all()


def test_magnitude_needs_no_calibration_data():
    model = build_model("opt")
    result = prune(model, _config("magnitude", pattern="4:8"), None, show_progress=False)
    assert result.sparsity == pytest.approx(0.5)
    assert result.layer_errors == {}


def test_on_block_done_is_called_once_per_block_in_order(windows):
    seen = []
    prune(build_model("qwen2"), _config(), windows, show_progress=False, on_block_done=seen.append)
    assert seen == [0, 1]


def test_batched_window_replay_matches_one_window_at_a_time(arch, windows):
    """run_windows stacks windows into one block call; every architecture gives the per-window result."""
    model = build_model(arch)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    inputs.batch_tokens = 8192  # on CPU the default is one window per call
    inputs.use_block(0)
    with torch.no_grad():
        one_by_one = [inputs.run(blocks[0], h) for h in inputs.hidden]
        batched = inputs.run_windows(blocks[0])
    assert inputs.batch_tokens > 0, "batching fell back to one window per call"
    assert len(batched) == len(one_by_one) == len(windows)
    for mine, theirs in zip(batched, one_by_one):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_batched_window_replay_falls_back_when_a_block_refuses_batches(windows):
    """A block that only takes batch size 1 still gets every window, one at a time."""
    model = build_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    block = blocks[0]
    original_forward = block.forward

    def single_only(hidden_states, *args, **kwargs):
        if hidden_states.shape[0] != 1:
            raise RuntimeError("batch size must be 1")
        return original_forward(hidden_states, *args, **kwargs)

    block.forward = single_only
    inputs.batch_tokens = 8192
    with torch.no_grad():
        outputs = inputs.run_windows(block)
    assert inputs.batch_tokens == 0
    assert [tuple(o.shape) for o in outputs] == [tuple(h.shape) for h in inputs.hidden]


def test_activations_stay_on_the_cpu_and_blocks_run_on_the_pruning_device(windows):
    """The engine keeps calibration activations on the CPU and sends each window to the block's device."""
    model = build_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    assert inputs.device == torch.device("cpu") and all(h.device.type == "cpu" for h in inputs.hidden)
    seen = []
    handle = blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    with torch.no_grad():
        outputs = inputs.run_windows(blocks[0])
    handle.remove()
    assert len(seen) == len(windows) and all(o.device.type == "cpu" for o in outputs)
    assert all(s.device == inputs.compute_device for s in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_activations_stay_on_the_cpu_and_outputs_come_back(windows):
    model = build_model("llama").cuda()
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, windows, torch.device("cuda"))
    assert all(h.device.type == "cpu" for h in inputs.hidden) and inputs.compute_device.type == "cuda"
    with torch.no_grad():
        outputs = inputs.run_windows(blocks[0])
        direct = [inputs.run(blocks[0], h) for h in inputs.hidden]
    assert all(o.device.type == "cpu" for o in outputs) and all(d.device.type == "cuda" for d in direct)
    for mine, theirs in zip(outputs, direct):
        torch.testing.assert_close(mine, theirs.cpu())
    result = prune(build_model("llama").cuda(), SparsityConfig(method="sparsegpt", device="cuda"), windows)
    assert result.sparsity == pytest.approx(0.5, abs=0.01)


def test_a_block_run_must_be_prepared_once_before_its_blocks(windows):
    from optimum_sparse.sequential import BlockRun

    config = SparsityConfig(method="magnitude", reconstruction="block", device="cpu")
    run = BlockRun(build_model("llama"), config, windows)
    with pytest.raises(RuntimeError, match="prepare"):
        run.prune_block(0)  # would prune without the reconstruction the config asks for
    run.prepare()
    run.prune_block(0)
    assert 0 in run.result.reconstruction
    with pytest.raises(RuntimeError, match="once per run"):
        run.prepare()
