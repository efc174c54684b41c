"""Pictures (`optimum_sparse.plots`) and `optimum-sparse report`: real PNGs from real reports, bad input refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import build_model

from optimum_sparse import cli, plots
from optimum_sparse.config import SparsityConfig
from optimum_sparse.evaluation import sparsity_report
from optimum_sparse.sequential import prune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path) -> np.ndarray:
    """The image as an array, after checking the file is a PNG that matplotlib reads back at a readable size."""
    from matplotlib.image import imread

    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    image = imread(os.fspath(path))
    height, width = image.shape[:2]
    assert width >= 700 and height >= 300  # about 800 pixels wide: docs width
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return image


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(".tmp-optimum-sparse-")]


def _pruned_report(method: str = "magnitude", sparsity: float = 0.5) -> dict:
    model = build_model("llama")
    prune(model, SparsityConfig(method=method, sparsity=sparsity), show_progress=False)
    return sparsity_report(model)


def test_ppl_vs_sparsity_draws_methods_dense_line_and_nm_points(tmp_path):
    records = [
        {"method": "dense", "sparsity": "dense", "ppl": 21.38},
        {"method": "wanda", "sparsity": 0.5, "ppl": 40.46},
        {"method": "wanda", "sparsity": "2:4", "ppl": 105.26},
        {"method": "wanda", "sparsity": "70%", "ppl": 557.33},
        {"method": "sparsegpt", "sparsity": 0.5, "ppl": 31.61},
        {"method": "sparsegpt", "sparsity": 0.7, "ppl": 99.0},
    ]
    path = tmp_path / "ppl.png"
    assert plots.ppl_vs_sparsity_plot(records, path) == os.fspath(path)
    _read_png(path)
    assert _leftovers(tmp_path) == []


def test_ppl_vs_sparsity_names_what_a_record_lacks(tmp_path):
    with pytest.raises(ValueError, match=r"record 1 .* lacks \['ppl'\]"):
        plots.ppl_vs_sparsity_plot(
            [{"method": "a", "sparsity": 0.5, "ppl": 3.0}, {"method": "b", "sparsity": 0.5}], tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="N:M"):
        plots.ppl_vs_sparsity_plot([{"method": "a", "sparsity": "2:x", "ppl": 3.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no pruned records"):
        plots.ppl_vs_sparsity_plot([{"method": "dense", "sparsity": "dense", "ppl": 3.0}], tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_parse_sparsity_reads_fractions_percentages_and_patterns():
    assert plots.parse_sparsity(0.5) == (0.5, None)
    assert plots.parse_sparsity("70%") == (pytest.approx(0.7), None)
    assert plots.parse_sparsity("2:4") == (0.5, "2:4")
    assert plots.parse_sparsity("dense") == (0.0, None)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.parse_sparsity(50)


def test_layer_sparsity_plot_of_a_real_report(tmp_path):
    report = _pruned_report()
    assert len(report["layers"]) == 14 and report["total"] == pytest.approx(0.5, abs=1e-3)
    path = plots.layer_sparsity_plot(report, tmp_path / "layers.png", title="tiny llama, magnitude 50%")
    _read_png(path)


def test_layer_sparsity_plot_refuses_names_without_a_block_index(tmp_path):
    with pytest.raises(ValueError, match="no block index"):
        plots.layer_sparsity_plot({"layers": {"lm_head": 0.5}, "total": 0.5}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no layers"):
        plots.layer_sparsity_plot({"layers": {}}, tmp_path / "x.png")


def test_channels_per_block_plot_from_kept_units_and_from_a_config(tmp_path):
    units = {f"model.layers.{b}.mlp": 682 + 171 * (b == 11) for b in range(30)}
    units |= {f"model.layers.{b}.self_attn": 2 - (b == 11) for b in range(30)}
    _read_png(plots.channels_per_block_plot(units, tmp_path / "units.png", dense_mlp=1536, dense_kv=3))
    config = {"intermediate_size": 1536, "num_key_value_heads": 3, "sliced_units": units}
    _read_png(plots.channels_per_block_plot(config, tmp_path / "config.png"))


def test_kept_units_from_config_knows_the_dense_widths_unless_the_shape_is_standard():
    units = {
        "model.layers.0.mlp": 40,
        "model.layers.0.self_attn": 1,
        "model.layers.1.mlp": 48,
        "model.layers.1.self_attn": 2,
    }
    kept, mlp, kv = plots.kept_units_from_config(
        {"intermediate_size": 64, "num_key_value_heads": 2, "sliced_units": units}
    )
    assert kept == units and (mlp, kv) == (64, 2)
    uniform = {
        "model.layers.0.mlp": 48,
        "model.layers.0.self_attn": 1,
        "model.layers.1.mlp": 48,
        "model.layers.1.self_attn": 1,
    }
    # uniform_widths: the config's own fields were set to the kept widths, the dense ones are gone
    assert plots.kept_units_from_config({"intermediate_size": 48, "num_key_value_heads": 1, "sliced_units": uniform})[
        1:
    ] == (None, None)
    with pytest.raises(ValueError, match="not a channel-sliced checkpoint"):
        plots.kept_units_from_config({"intermediate_size": 64})


@pytest.mark.parametrize(
    "path, error, message",
    [("plot.jpg", ValueError, "should end in .png"), ("missing/plot.png", FileNotFoundError, "does not exist")],
)
def test_check_png_path_names_the_fix(tmp_path, path, error, message):
    with pytest.raises(error, match=message):
        plots.check_png_path(tmp_path / path)


# ---------------------------------------------------------------------------- optimum-sparse report


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, saved_llama) -> str:
    """The tiny Llama pruned to 50% by magnitude and saved by the CLI."""
    output = tmp_path_factory.mktemp("report") / "pruned"
    args = ["prune", "--model", saved_llama, "--method", "magnitude", "--sparsity", "0.5"]
    assert cli.main([*args, "--output", os.fspath(output), "--no-progress", "--log-level", "WARNING"]) == 0
    return os.fspath(output)


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_report_prints_the_layers_and_draws_them(pruned_dir, tmp_path, capsys):
    plot = tmp_path / "layers.png"
    assert cli.main(["report", pruned_dir, "--plot", os.fspath(plot), "--json", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "total" in out
    record = _last_json(out)
    assert record["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(record["layers"]) == 14 and all(v == pytest.approx(0.5, abs=1e-2) for v in record["layers"].values())
    assert record["plot"] == os.fspath(plot) and "channels_plot" not in record
    _read_png(plot)


def test_report_of_a_sliced_model_also_draws_the_channels_per_block(saved_llama, text_file, tmp_path, capsys):
    sliced = tmp_path / "sliced"
    flags = [
        "--method",
        "pg",
        "--sparsity",
        "0.4",
        "--set",
        "pattern=channels",
        "pg_objective=block",
        "pg_block_steps=2",
    ]
    flags += ["--calibration-data", text_file, "--num-samples", "4", "--seq-len", "32", "--device", "cpu"]
    prune_args = ["prune", "--model", saved_llama, *flags, "--slice", "--output", os.fspath(sliced), "--no-progress"]
    assert cli.main(prune_args) == 0
    capsys.readouterr()
    plot = tmp_path / "report.png"
    assert cli.main(["report", os.fspath(sliced), "--plot", os.fspath(plot), "--json"]) == 0
    record = _last_json(capsys.readouterr().out)
    assert record["channels_plot"] == os.fspath(tmp_path / "report-channels.png")
    assert sum(v for k, v in record["sliced_units"].items() if k.endswith("mlp")) < 2 * 64  # channels were removed
    _read_png(plot)
    _read_png(record["channels_plot"])


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing-model", "does not exist"),
        ("plot.svg", "should end in .png"),
        ("no-such-dir/plot.png", "does not exist; create"),
    ],
)
def test_report_bad_input_exits_2_before_loading(pruned_dir, tmp_path, capsys, target, message):
    model = os.fspath(tmp_path / "missing") if target == "missing-model" else pruned_dir
    plot = tmp_path / ("plot.png" if target == "missing-model" else target)
    assert cli.main(["report", model, "--plot", os.fspath(plot)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("optimum-sparse report: error:") and message in captured.err
    assert "model.layers.0" not in captured.out  # refused before any model was loaded and reported
    assert not plot.exists()


def test_docs_pictures_draw_from_the_committed_data(tmp_path):
    """benchmarks/plots.py turns docs/data/*.json into the docs images (small enough for the repo)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "plots.py"
    spec = importlib.util.spec_from_file_location("docs_plots", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, draw in module.PICTURES.items():
        path = draw(os.fspath(tmp_path / f"{name}.png"))
        _read_png(path)
        assert os.path.getsize(path) < 150 * 1024


def test_prune_plot_draws_the_pruned_models_sparsity_per_layer(saved_llama, text_file, tmp_path, capsys):
    from optimum_sparse import cli

    plot = tmp_path / "pruned.png"
    args = ["prune", "--model", saved_llama, "--method", "wanda", "--calibration-data", text_file, "--num-samples", "4"]
    args += ["--seq-len", "32", "--device", "cpu", "--no-progress", "--json", "--plot", str(plot)]
    assert cli.main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["plot"] == str(plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
