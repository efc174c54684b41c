"""`optimum-sparse prune | eval` end to end on a saved tiny Llama, and its error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import prune_args
from transformers import AutoModelForCausalLM

from optimum_sparse import cli
from optimum_sparse.config import CONFIG_NAME, SparsityConfig
from optimum_sparse.evaluation import sparsity_report

RECORD_KEYS = {"model", "method", "sparsity", "measured_sparsity", "ppl_dense", "ppl", "prune_seconds", "peak_rss_mb"}


def _eval_args(model: str, data: str, *extra: str) -> list[str]:
    args = ["eval", "--model", model, "--eval-data", data, "--eval-seq-len", "64", "--eval-max-windows", "2"]
    return args + ["--json", "--no-progress", *extra]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _leftovers(parent) -> list[str]:
    return [name for name in os.listdir(parent) if name.startswith(".tmp-optimum-sparse-")]


def test_prune_then_eval_end_to_end(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        saved_llama,
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--calibration-data",
        text_file,
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--eval-data",
        text_file,
        "--eval-seq-len",
        "64",
        "--eval-max-windows",
        "2",
        "--output",
        os.fspath(output),
        "--json",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    record = _last_json(capsys.readouterr().out)
    assert RECORD_KEYS <= set(record)
    assert record["model"] == saved_llama and record["method"] == "wanda" and record["sparsity"] == 0.5
    assert record["measured_sparsity"] == pytest.approx(0.5)
    assert record["ppl"] > 1 and record["ppl_dense"] > 1 and record["ppl"] != record["ppl_dense"]
    assert record["prune_seconds"] > 0 and record["peak_rss_mb"] > 0
    assert record["output"] == os.fspath(output)
    assert _leftovers(tmp_path) == []

    # the output is a plain transformers checkpoint with the measured sparsity, plus sparsity_config.json
    model = AutoModelForCausalLM.from_pretrained(output)
    assert sparsity_report(model)["total"] == pytest.approx(record["measured_sparsity"])
    saved = SparsityConfig.from_pretrained(output)
    assert saved.method == "wanda" and saved.sparsity == 0.5 and saved.num_samples == 4 and saved.seq_len == 32
    with open(output / CONFIG_NAME, encoding="utf-8") as handle:
        assert json.load(handle)["measured_sparsity"] == pytest.approx(0.5)

    assert cli.main(_eval_args(os.fspath(output), text_file)) == 0
    evaluated = _last_json(capsys.readouterr().out)
    assert evaluated["ppl"] == pytest.approx(record["ppl"], rel=1e-5)  # same model, same windows
    assert evaluated["measured_sparsity"] == pytest.approx(0.5)


def test_prune_learned_channels_then_slice_save_and_eval_the_smaller_model(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "sliced"
    extra = ["--method", "pg", "--sparsity", "0.4", "--set", "pattern=channels", "pg_objective=block"]
    extra += ["pg_block_steps=5", "--slice", "--output", os.fspath(output), "--json", "--skip-dense-eval"]
    extra += ["--eval-data", text_file, "--eval-seq-len", "64", "--eval-max-windows", "2"]
    assert cli.main(prune_args(saved_llama, text_file, *extra)) == 0
    record = _last_json(capsys.readouterr().out)
    assert record["parameters_sliced"] < 0.8 * record["parameters_dense"]
    assert record["output"] == os.fspath(output) and _leftovers(tmp_path) == []
    assert cli.main(_eval_args(os.fspath(output), text_file)) == 0  # the CLI reads the sliced checkpoint
    assert _last_json(capsys.readouterr().out)["ppl"] == pytest.approx(record["ppl"], rel=1e-5)


def test_uniform_widths_flag_slices_to_a_checkpoint_plain_transformers_loads(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "standard"
    extra = ["--method", "pg", "--sparsity", "0.4", "--set", "pattern=channels", "pg_objective=block", "pg_block_steps=3"]
    extra += ["--uniform-widths", "--slice", "--output", os.fspath(output), "--json"]
    assert cli.main(prune_args(saved_llama, text_file, *extra)) == 0
    assert _last_json(capsys.readouterr().out)["parameters_sliced"] < 0.8 * _parameter_count(saved_llama)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(output)  # no code of ours
    widths = {plain.model.layers[i].mlp.down_proj.in_features for i in range(len(plain.model.layers))}
    assert widths == {plain.config.intermediate_size} and plain.config.intermediate_size < 64


def test_uniform_widths_flag_refuses_an_unsupported_architecture_before_loading_calibration(tmp_path, text_file, capsys):
    from conftest import build_model

    build_model("opt").save_pretrained(tmp_path / "opt")
    extra = ["--method", "pg", "--set", "pattern=channels", "pg_objective=block", "--uniform-widths"]
    assert cli.main(prune_args(os.fspath(tmp_path / "opt"), text_file, *extra)) == 2
    assert "uniform_widths writes a standard checkpoint for the model types" in capsys.readouterr().err


def _parameter_count(model_dir: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


def test_slice_needs_channel_masks(saved_llama, text_file, capsys):
    assert cli.main(prune_args(saved_llama, text_file, "--method", "wanda", "--slice")) == 2
    assert "--set pattern=channels" in capsys.readouterr().err


def test_prune_nm_from_a_config_file(saved_llama, text_file, tmp_path, capsys):
    SparsityConfig(method="sparsegpt", ignore=[r"down_proj"], seed=7).save_pretrained(tmp_path / "cfg")
    output = tmp_path / "out"
    args = prune_args(saved_llama, text_file, "--config", os.fspath(tmp_path / "cfg"), "--sparsity", "2:4")
    assert cli.main(args + ["--output", os.fspath(output), "--json"]) == 0
    record = _last_json(capsys.readouterr().out)
    assert record["method"] == "sparsegpt" and record["sparsity"] == "2:4"
    saved = SparsityConfig.from_pretrained(output)
    assert saved.pattern == "2:4" and saved.ignore == [r"down_proj"] and saved.seed == 7
    layers = json.loads((output / CONFIG_NAME).read_text())["measured_layer_sparsity"]
    assert layers and not any("down_proj" in name for name in layers)
    assert all(value == pytest.approx(0.5) for value in layers.values())


def test_config_file_method_and_options_survive_the_default_flags(tmp_path):
    """A --config naming admm keeps admm and its options unless --method is given on the command line."""
    SparsityConfig(method="admm", admm_rho=1.0, dampening=0.1).save_pretrained(tmp_path / "cfg")
    parser = cli.build_parser()
    from_file = cli.config_from_args(parser.parse_args(["prune", "--config", os.fspath(tmp_path / "cfg")]))
    assert (from_file.method, from_file.admm_rho, from_file.dampening) == ("admm", 1.0, 0.1)
    flagged = cli.config_from_args(
        parser.parse_args(["prune", "--config", os.fspath(tmp_path / "cfg"), "--method", "sparsegpt"])
    )
    assert flagged.method == "sparsegpt" and flagged.dampening == 0.1
    # a method that reads neither setting does not inherit them from the file
    wanda = cli.config_from_args(parser.parse_args(["prune", "--config", os.fspath(tmp_path / "cfg"), "--method", "wanda"]))
    assert wanda.method == "wanda" and "dampening" not in wanda.settings and "admm_rho" not in wanda.settings
    assert cli.config_from_args(parser.parse_args(["prune"])).method == "sparsegpt"


def test_set_reaches_any_config_field_and_names_unknown_ones():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["prune", "--method", "pg", "--weight-update", "admm", "--set", "pg_objective=block", "admm_rho=2", "clip=inf"]
    )
    config = cli.config_from_args(args)
    assert (config.pg_objective, config.admm_rho, config.clip) == ("block", 2, float("inf"))
    with pytest.raises(ValueError, match="has no field 'no_such'"):
        cli.config_from_args(parser.parse_args(["prune", "--set", "no_such=1"]))
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli.config_from_args(parser.parse_args(["prune", "--set", "admm_rho"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.0"], r"sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], r"sparsity must be in [0, 1)"),
        (["--sparsity", "5:4"], "needs 1 <= N < M"),
        (["--sparsity", "abc:4"], "pattern must look like 'N:M'"),
        (["--method", "nope"], "method 'nope' is not registered"),
        (["--targets", "no_such_layer"], "match no linear layer"),
        (["--eval-seq-len", "0"], "--eval-seq-len must be a positive integer"),
    ],
)
def test_bad_prune_arguments_exit_2_with_the_error_on_stderr(saved_llama, text_file, extra, message, capsys):
    assert cli.main(prune_args(saved_llama, text_file, *extra)) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("optimum-sparse prune: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in captured.err


def test_unparseable_sparsity_is_an_argparse_error(saved_llama, text_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(prune_args(saved_llama, text_file, "--sparsity", "half"))
    assert exit_info.value.code == 2
    assert "--sparsity takes a fraction such as 0.5 or a pattern such as 2:4, got 'half'" in capsys.readouterr().err


def test_missing_files_are_reported_before_loading(saved_llama, text_file, tmp_path, capsys):
    missing = os.fspath(tmp_path / "missing.txt")
    assert cli.main(prune_args(saved_llama, missing)) == 2
    assert f"text file {missing!r} does not exist" in capsys.readouterr().err
    assert cli.main(_eval_args(saved_llama, missing)) == 2
    assert f"text file {missing!r} does not exist" in capsys.readouterr().err
    assert cli.main(_eval_args(os.fspath(tmp_path / "no-model"), text_file)) == 2
    assert "does not exist; pass a Hub id, a local directory or a .gguf file" in capsys.readouterr().err
    assert cli.main(["eval", "--model", saved_llama]) == 2
    assert "eval needs --eval-data" in capsys.readouterr().err


def test_failed_prune_leaves_no_output_directory(saved_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("far too short for a window", encoding="utf-8")
    output = tmp_path / "out"
    assert cli.main(prune_args(saved_llama, os.fspath(short), "--output", os.fspath(output))) == 2
    assert "fewer than one window of seq_len=32" in capsys.readouterr().err
    assert not output.exists()
    assert _leftovers(tmp_path) == []


def test_failure_while_saving_leaves_no_partial_output(saved_llama, text_file, tmp_path, monkeypatch, capsys):
    """The model files are already written when the failure happens: nothing may be left behind."""

    def fail(self, directory, **metadata):
        assert os.path.isfile(os.path.join(directory, "config.json"))  # after some work
        raise ValueError("disk full (simulated)")

    monkeypatch.setattr(SparsityConfig, "save_pretrained", fail)
    output = tmp_path / "out"
    args = prune_args(saved_llama, text_file, "--method", "magnitude", "--output", os.fspath(output))
    assert cli.main(args) == 2
    assert "disk full (simulated)" in capsys.readouterr().err
    assert not output.exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("precious", encoding="utf-8")
    args = prune_args(saved_llama, text_file, "--method", "magnitude", "--output", os.fspath(output))
    assert cli.main(args) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert cli.main(args + ["--overwrite"]) == 0
    assert not (output / "keep.txt").exists()
    assert (output / CONFIG_NAME).is_file()
    # an existing but empty directory is fine without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    args = prune_args(saved_llama, text_file, "--method", "magnitude", "--output", os.fspath(empty))
    assert cli.main(args) == 0
    assert (empty / CONFIG_NAME).is_file()


def test_output_that_is_a_file_is_refused(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "model.bin"
    output.write_text("not a directory", encoding="utf-8")
    args = prune_args(saved_llama, text_file, "--method", "magnitude", "--output", os.fspath(output))
    for extra in ([], ["--overwrite"]):
        assert cli.main(args + extra) == 2
        assert "is a file, not a directory; choose another path" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == "not a directory"


def test_module_help_runs_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "optimum_sparse.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "prune" in done.stdout and "eval" in done.stdout


def test_report_flag_prints_per_layer_and_total_sparsity(saved_llama, capsys):
    code = cli.main(
        [
            "prune",
            "--model",
            saved_llama,
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--report",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "model.layers.0.mlp.down_proj" in out
    total = [line for line in out.splitlines() if line.startswith("total")]
    assert total and abs(float(total[0].split()[-1]) - 0.5) < 1e-3


def test_owl_profile_and_block_reconstruction_flags_reach_the_config_and_the_saved_file(
    saved_llama, text_file, tmp_path, capsys
):
    output = tmp_path / "owl"
    extra = ["--method", "wanda", "--sparsity", "0.6", "--sparsity-profile", "owl", "--reconstruct", "block"]
    extra += ["--set", "owl_m=3", "reconstruction_epochs=2", "--output", os.fspath(output), "--json"]
    assert cli.main(prune_args(saved_llama, text_file, *extra)) == 0
    record = _last_json(capsys.readouterr().out)
    assert record["measured_sparsity"] == pytest.approx(0.6, abs=0.01)  # 32-wide rows round each budget
    assert record["sparsity_profile"] == "owl" and "layer_sparsity" not in record
    fits = record["reconstruction"]  # where the time went and how far each block's fit got
    assert fits["blocks"] == 2 and len(fits["best_epochs"]) == 2 and 2 <= fits["epochs_run"] <= 4
    assert 0 < fits["seconds"] <= record["prune_seconds"]
    assert fits["train_error_after"] <= fits["train_error_before"]
    saved = json.loads((output / CONFIG_NAME).read_text())
    assert saved["sparsity_profile"] == "owl" and saved["reconstruction"] == "block" and saved["owl_m"] == 3
    assert len(set(round(v, 3) for v in saved["block_sparsity"].values())) == 2  # two blocks, two budgets


def test_a_bad_reconstruction_value_exits_2_before_loading(tmp_path, text_file, capsys):
    code = cli.main(["prune", "--model", os.fspath(tmp_path / "missing"), "--reconstruct", "layer"])
    assert code == 2
    assert "reconstruction must be None or 'block'" in capsys.readouterr().err
