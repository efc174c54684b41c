"""SparsityConfig serialisation, and a clear error for every bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import SEQ_LEN, build_model

from optimum_sparse.architecture import find_prunable_layers
from optimum_sparse.calibration import get_calibration_data
from optimum_sparse.config import CONFIG_NAME, FORMAT_VERSION, SparsityConfig, parse_nm
from optimum_sparse.evaluation import perplexity
from optimum_sparse.sequential import prune
from optimum_sparse.solvers import available_methods, get_solver_class

# ---------------------------------------------------------------------------- serialisation


def _custom_config() -> SparsityConfig:
    return SparsityConfig(
        method="wanda",
        pattern="4:8",
        targets=[r"mlp\."],
        ignore=[r"down_proj"],
        mask_scope="row",
        num_samples=16,
        seq_len=256,
        seed=3,
        weight_update="admm",
        dampening=0.05,
        sequential_update=True,
        device="cpu",
    )


def test_dict_and_json_round_trip():
    config = _custom_config()
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert SparsityConfig.from_dict(json.loads(config.to_json_string())) == config
    assert config.to_dict()["pattern"] == "4:8" and config.to_dict()["sparsity"] == 0.5


def test_save_pretrained_writes_sparsity_config_json(tmp_path, caplog):
    config = _custom_config()
    path = config.save_pretrained(tmp_path / "out", measured_sparsity=0.4999, measured_layer_sparsity={"a": 0.5})
    assert os.path.basename(path) == CONFIG_NAME == "sparsity_config.json"
    with open(path, encoding="utf-8") as handle:
        payload = json.load(handle)
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["measured_sparsity"] == 0.4999 and payload["measured_layer_sparsity"] == {"a": 0.5}
    assert payload["library_version"]
    assert payload["method"] == "wanda" and payload["targets"] == [r"mlp\."]
    with caplog.at_level(logging.WARNING):
        assert SparsityConfig.from_pretrained(tmp_path / "out") == config
        assert SparsityConfig.from_pretrained(path) == config  # the file itself works too
    assert "unknown" not in caplog.text  # library metadata is not reported as unknown keys


def test_pattern_implies_sparsity():
    assert SparsityConfig(pattern="2:4").sparsity == 0.5
    assert SparsityConfig(pattern="1:4").sparsity == 0.75
    assert SparsityConfig(pattern=" 4 : 8 ").pattern == "4:8"
    assert SparsityConfig(pattern="2:4").nm == (2, 4)
    assert SparsityConfig(pattern="2:4", sparsity=0.5).sparsity == 0.5  # consistent: accepted
    assert SparsityConfig().sparsity == 0.5 and SparsityConfig().pattern is None
    assert SparsityConfig(sparsity=0).sparsity == 0.0
    assert SparsityConfig(method="wanda", pattern="2:4").describe() == "wanda 2:4"
    assert SparsityConfig(method="magnitude", sparsity=0.7).describe() == "magnitude 70%"


def test_sparsity_contradicting_pattern_is_an_error():
    with pytest.raises(ValueError, match=r"sparsity=0\.6 contradicts pattern '2:4'.*give only one"):
        SparsityConfig(pattern="2:4", sparsity=0.6)


def test_unknown_keys_are_tolerated_with_a_warning(caplog):
    data = {**SparsityConfig(method="wanda").to_dict(), "future_option": 1, "another": "x"}
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.config"):
        config = SparsityConfig.from_dict(data)
    assert config.method == "wanda"
    assert "future_option" in caplog.text and "another" in caplog.text


def test_newer_format_version_is_rejected():
    data = {**SparsityConfig().to_dict(), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match=r"format_version 2, newer than this library supports.*upgrade"):
        SparsityConfig.from_dict(data)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sparsity_config.json at"):
        SparsityConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparsityConfig(sparsity=sparsity)


@pytest.mark.parametrize("sparsity", [True, "0.5"])
def test_sparsity_of_wrong_type_is_rejected(sparsity):
    with pytest.raises(TypeError, match="sparsity must be a float"):
        SparsityConfig(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4"])
def test_nm_pattern_needs_n_below_m(pattern):
    with pytest.raises(ValueError, match=r"needs 1 <= N < M"):
        SparsityConfig(pattern=pattern)


@pytest.mark.parametrize("pattern", ["abc", "2/4", "2:", ""])
def test_malformed_nm_pattern_is_rejected(pattern):
    with pytest.raises(ValueError, match=r"pattern must look like 'N:M'"):
        parse_nm(pattern)
    if pattern:  # "" means no pattern
        with pytest.raises(ValueError, match=r"pattern must look like 'N:M'"):
            SparsityConfig(pattern=pattern)


def test_block_size_need_not_be_a_multiple_of_m():
    # SparseGPT rounds its column blocks down to a multiple of M itself
    assert SparsityConfig(pattern="3:7").nm == (3, 7)
    assert SparsityConfig(pattern="3:7", block_size=126).nm == (3, 7)


def test_width_not_divisible_by_m_names_the_layer():
    model = build_model("llama", hidden_size=36, num_attention_heads=2, num_key_value_heads=1)  # 2 heads of 18
    config = SparsityConfig(method="magnitude", pattern="4:8")
    with pytest.raises(
        ValueError,
        match=r"pattern 4:8 needs input widths divisible by 8, but model\.layers\.0\.self_attn\.q_proj has 36 inputs; exclude it with ignore",
    ):
        prune(model, config, show_progress=False)
    # the suggested fix works: only layers reading the 64-wide MLP activations are left
    fixed = SparsityConfig(method="magnitude", pattern="4:8", ignore=[r"self_attn", r"gate_proj", r"up_proj"])
    result = prune(model, fixed, show_progress=False)
    assert sorted(result.masks) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_width_not_divisible_by_7_with_3_7_pattern():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"needs input widths divisible by 7"):
        find_prunable_layers(model, SparsityConfig(pattern="3:7", block_size=126))


def test_target_regex_matching_nothing_is_an_error():
    config = SparsityConfig(targets=[r"mlp", r"no_such_layer"])
    with pytest.raises(ValueError, match=r"\['no_such_layer'\] match no linear layer.*module names look like"):
        prune(build_model("llama"), config, show_progress=False)


def test_ignoring_everything_is_an_error():
    with pytest.raises(ValueError, match="no layer left to prune"):
        find_prunable_layers(build_model("opt"), SparsityConfig(ignore=[r".*"]))


def test_invalid_regex_is_rejected():
    with pytest.raises(ValueError, match=r"targets: 'mlp\(' is not a valid regular expression"):
        SparsityConfig(targets=["mlp("])


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match=r"method 'sparsegtp' is not registered; choose one of \[.*'sparsegpt'"):
        SparsityConfig(method="sparsegtp")
    with pytest.raises(ValueError, match=r"unknown pruning method 'nope'"):
        get_solver_class("nope")
    assert {"magnitude", "wanda", "sparsegpt"} <= set(available_methods())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mask_scope", "column", "mask_scope must be None, 'row' or 'layer'"),
        ("num_samples", 0, "num_samples must be a positive integer"),
        ("seq_len", 1.5, "seq_len must be a positive integer"),
        ("dampening", 0.0, "dampening must be > 0"),
        ("device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_other_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        SparsityConfig(**{field: value})


def test_calibration_text_shorter_than_one_window(tokenizer):
    with pytest.raises(ValueError, match=r"calibration text has 11 tokens, fewer than one window of seq_len=32"):
        get_calibration_data(["short text."], tokenizer, num_samples=2, seq_len=32)
    config = SparsityConfig(method="wanda", num_samples=2, seq_len=SEQ_LEN, device="cpu")
    with pytest.raises(ValueError, match="fewer than one window"):
        prune(build_model("llama"), config, ["too short"], tokenizer, show_progress=False)


def test_missing_calibration_file(tokenizer, tmp_path):
    missing = os.fspath(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"text file '.*nope\.txt' does not exist"):
        get_calibration_data(missing, tokenizer, model=build_model("llama"), num_samples=2, seq_len=8)


def test_missing_eval_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text file '.*missing\.txt' does not exist"):
        perplexity(build_model("llama"), tokenizer, os.fspath(tmp_path / "missing.txt"), seq_len=8)


def test_eval_text_shorter_than_one_window():
    with pytest.raises(ValueError, match="evaluation text has 10 tokens, fewer than one window of 32"):
        perplexity(build_model("llama"), data=torch.arange(10), seq_len=32, show_progress=False)


def test_row_hardening_is_for_per_weight_masks():
    assert SparsityConfig(method="pg", pattern="unstructured", sparsity=0.5, harden_scope="row").harden_scope == "row"
    with pytest.raises(ValueError, match="harden_scope='row' is for per-weight masks"):
        SparsityConfig(method="pg", pattern="channels", sparsity=0.5, harden_scope="row")


# ---------------------------------------------------------------------------- method settings

#: sparsity_config.json files written by the version before settings moved into the solvers (every
#: method's settings in each file), and the configs they were written from, spelled as users spell them
LEGACY = Path(__file__).resolve().parent / "data" / "legacy_configs"
LEGACY_SPELLINGS = {
    "wanda_2of4": dict(method="wanda", pattern="2:4", num_samples=32, seq_len=512),
    "admm_rho2": dict(method="admm", sparsity=0.6, admm_rho=2, admm_iterations=30),
    "sparsegpt_block64": dict(method="sparsegpt", sparsity=0.5, block_size=64, dampening=0.05),
    "wanda_admm_refit": dict(method="wanda", sparsity=0.6, weight_update="admm", admm_cg_steps=4),
    "sparsellm_inner_sparsegpt": dict(method="sparsellm", sparsity=0.7, inner_solver="sparsegpt", beta=50.0),
    "pg_channels_block": dict(
        method="pg", pattern="channels", sparsity=0.3, pg_objective="block", samples_per_step=2, pg_block_lr=0.01
    ),
    "magnitude_ties": dict(method="magnitude", sparsity=0.7, prune_ties=True),
    "pg_final_admm": dict(
        method="pg", sparsity=0.5, final_weight_update="admm", admm_iterations=30, admm_rho=0.5, refresh_every=4, clip=3.0
    ),
}


@pytest.mark.parametrize("name", sorted(LEGACY_SPELLINGS))
def test_files_written_by_the_previous_version_load_to_the_same_config(name, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = SparsityConfig.from_pretrained(LEGACY / f"{name}.json")
    assert loaded == SparsityConfig(**LEGACY_SPELLINGS[name])
    assert caplog.text == ""  # the other methods' settings it holds are defaults: dropped silently
    written = json.loads((LEGACY / f"{name}.json").read_text())
    assert all(written[key] == value for key, value in loaded.to_dict().items() if key in written)
    added_since = {"uniform_widths", "width_multiple", "sparsity_profile", "owl_m", "owl_lambda", "layer_sparsity"}
    added_since |= {name for name in loaded.to_dict() if name.startswith("reconstruction")}
    # (settings and fields newer than those files: at their defaults)
    assert set(loaded.to_dict()) - set(written) <= added_since


def test_a_setting_of_a_method_the_run_does_not_use_names_that_method():
    with pytest.raises(ValueError, match=r"admm_iterations is a setting of method 'admm', which this run does not use"):
        SparsityConfig(method="wanda", admm_iterations=10)
    with pytest.raises(ValueError, match=r"block_size is a setting of method 'sparsegpt'"):
        SparsityConfig(method="sparsellm", block_size=64)  # inner solver admm
    # the same settings are accepted where the run uses their method
    assert SparsityConfig(method="wanda", weight_update="admm", admm_iterations=20).admm_iterations == 20
    assert SparsityConfig(method="sparsellm", inner_solver="sparsegpt", block_size=64).block_size == 64


def test_an_unknown_setting_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match=r"no setting 'admm_rh' \(did you mean 'admm_rho'\?\)"):
        SparsityConfig(method="admm", admm_rh=2)


def test_settings_read_and_assign_flat_and_replace_drops_what_the_new_method_does_not_use():
    config = SparsityConfig(method="admm", admm_rho=2)
    assert config.admm_rho == 2 and config.settings["admm_rho"] == 2
    config.admm_rho = 3
    assert config.to_dict()["admm_rho"] == 3
    with pytest.raises(ValueError, match="admm_rho must be > 0"):
        config.admm_rho = -1
    wanda = config.replace(method="wanda")
    assert "admm_rho" not in wanda.settings and wanda.method == "wanda"
    with pytest.raises(ValueError, match="admm_rho is a setting of method 'admm'"):
        config.replace(method="wanda", admm_rho=2)


def test_a_file_with_settings_of_a_replaced_method_warns_and_drops_them(caplog):
    data = {**SparsityConfig(method="admm", admm_rho=2).to_dict(), "method": "wanda"}
    with caplog.at_level(logging.WARNING, logger="optimum_sparse.config"):
        config = SparsityConfig.from_dict(data)
    assert config.method == "wanda" and "admm_rho" not in config.settings
    assert "admm_rho" in caplog.text


def test_copies_pickles_and_dataclass_helpers_keep_settings_apart_and_whole():
    config = SparsityConfig(method="sparsellm", sparsity=0.7)
    twin = copy.copy(config)
    twin.admm_rho = 5
    assert config.admm_rho is None and twin.admm_rho == 5
    assert pickle.loads(pickle.dumps(twin)) == twin
    assert dataclasses.replace(twin, seed=3).seed == 3
    assert SparsityConfig.from_dict(dataclasses.asdict(twin)) == twin


def test_changing_the_inner_solver_or_weight_update_reselects_the_settings():
    config = SparsityConfig(method="sparsellm", sparsity=0.7)
    config.inner_solver = "sparsegpt"
    assert "block_size" in config.settings and "admm_rho" not in config.settings
    assert SparsityConfig.from_dict(config.to_dict()) == config
    config.weight_update = "admm"
    assert config.admm_iterations == 20 and "admm_iterations" in config.settings
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        config.sparsity = 2


def test_a_config_pickled_by_the_previous_version_unpickles():
    """That version kept every setting of every method as a field of the dataclass."""
    state = {**SparsityConfig(method="admm")._common(), "admm_rho": 3, "block_size": 128, "refresh_every": 1}
    config = SparsityConfig.__new__(SparsityConfig)
    config.__setstate__(state)
    assert config == SparsityConfig(method="admm", admm_rho=3)
