"""benchmarks/quality_matrix.py: the docs' quality matrix is printed from measured cells, never typed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_matrix.py"


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("quality_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.fspath(SCRIPT), *args], capture_output=True, text=True)


def test_the_matrix_has_every_method_profile_and_reconstruction_but_no_owl_at_n_m(matrix):
    cells = matrix.all_cells()
    assert len(cells) == 2 * (4 * 3 + 2)  # OWL is refused with 2:4: two variants per method there
    assert "sparsellm+owl+recon@0.8" in cells and "admm+recon@2:4" in cells
    assert not any(cell.endswith("@2:4") and "+owl" in cell for cell in cells)


def test_the_committed_data_prints_a_table_with_each_measured_cell(matrix):
    result = _run()
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    data = matrix.load_data()
    assert len(summary["cells"]) == len(matrix.by_key(data))
    table = result.stdout.split("\n\n")[0].splitlines()
    assert table[0].startswith("| method | budgets | reconstruction | 50% | 2:4 | 70% | 80% |")
    owl_row = next(line for line in table if line.startswith("| admm | OWL | none |"))
    assert owl_row.split("|")[5].strip() == "n/a"
    best = min(c["ppl"] for c in data["cells"] if c["sparsity"] == "0.5")
    assert f"**{best:.2f}**" in "\n".join(table)
    assert set(summary["missing"]).isdisjoint(matrix.by_key(data))


def test_contributions_name_each_part_against_the_plain_cell_and_owl_against_reconstruction(matrix):
    cells = {
        "admm@0.7": {"ppl": 60.0},
        "admm+owl@0.7": {"ppl": 57.0},
        "admm+recon@0.7": {"ppl": 48.0},
        "admm+owl+recon@0.7": {"ppl": 45.6},
    }
    (line,) = matrix.contributions(cells)
    assert line == (
        "admm 0.7: OWL 60.00 -> 57.00 (-5.0%); reconstruction 60.00 -> 48.00 (-20.0%); "
        "both 60.00 -> 45.60 (-24.0%); OWL on top of reconstruction 48.00 -> 45.60 (-5.0%)"
    )


def _ppl_table_output(path: Path, rows: list[dict]) -> None:
    """What ppl_table.py prints: a markdown table, then its JSON summary as the last line."""
    path.write_text("| method | sparsity | ppl |\n" + json.dumps({"benchmark": "ppl_table", "results": rows}) + "\n")


def test_imported_runs_replace_their_cells_with_their_conditions_and_command(tmp_path):
    data = tmp_path / "matrix.json"
    shutil.copy(SCRIPT.parents[1] / "docs" / "data" / "quality_matrix.json", data)
    out = tmp_path / "run.out"
    record = {"row": "admm+owl", "sparsity": "0.7", "ppl": 55.5, "prune_seconds": 300.0, "peak_rss_mb": 2000.0}
    _ppl_table_output(out, [{**record, "calibration": "wikitext"}])
    result = _run("--data", os.fspath(data), "--import", os.fspath(out), "--conditions", "one thread, quiet")
    assert result.returncode == 0, result.stderr
    cells = {(c["row"], c["sparsity"]): c for c in json.loads(data.read_text())["cells"]}
    cell = cells["admm+owl", "0.7"]
    assert cell["ppl"] == 55.5 and cell["conditions"] == "one thread, quiet"
    assert cell["command"] == "python benchmarks/ppl_table.py --rows admm+owl --sparsities 0.7 --no-dense"
    assert "admm+owl@0.7" not in json.loads(result.stdout.strip().splitlines()[-1])["missing"]
    assert "admm 0.7: OWL" in result.stdout  # its contribution against the plain ADMM cell
    assert not (tmp_path / "matrix.json.tmp").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--run", "--cells", "admm@0.6"], "unknown cells ['admm@0.6']"),
        (["--import", "x.out"], "--import needs --conditions"),
        (["--run", "--workers", "0"], "--workers and --threads must be positive"),
    ],
)
def test_bad_requests_are_refused_before_any_run(args, message, tmp_path):
    data = tmp_path / "matrix.json"
    shutil.copy(SCRIPT.parents[1] / "docs" / "data" / "quality_matrix.json", data)
    before = data.read_text()
    result = _run("--data", os.fspath(data), *args)
    assert result.returncode == 2 and message in result.stderr
    assert data.read_text() == before


def test_an_unfinished_output_is_refused_and_the_data_left_alone(tmp_path):
    data = tmp_path / "matrix.json"
    shutil.copy(SCRIPT.parents[1] / "docs" / "data" / "quality_matrix.json", data)
    before = data.read_text()
    out = tmp_path / "half.out"
    out.write_text("")  # a run still under way has printed nothing yet
    result = _run("--data", os.fspath(data), "--import", os.fspath(out), "--conditions", "x")
    assert result.returncode == 2 and "has no ppl_table.py JSON line" in result.stderr
    assert data.read_text() == before


def test_sigterm_stops_every_running_cell_and_no_queued_cell_starts(matrix):
    cells = matrix.Cells()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(run=cells.run(["sleep", "60"], dict(os.environ))))
    worker.start()
    deadline = time.monotonic() + 10
    while not cells.running and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(SystemExit) as stopped:
        cells.stop(signal.SIGTERM, None)
    worker.join(timeout=10)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert outcome["run"][0] == -signal.SIGTERM  # the cell's process was terminated, not waited out
    assert cells.stopping.is_set() and not cells.running


def test_stopping_ppl_table_also_stops_the_prune_it_started(saved_llama):
    psutil = pytest.importorskip("psutil")
    script = SCRIPT.parent / "ppl_table.py"
    args = ["--model", saved_llama, "--rows", "sparsegpt", "--sparsities", "0.5", "--no-dense"]
    table = subprocess.Popen([sys.executable, os.fspath(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parent = psutil.Process(table.pid)
    deadline = time.monotonic() + 30
    while not (children := parent.children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children, "ppl_table.py started no CLI process"
    table.send_signal(signal.SIGTERM)
    table.communicate(timeout=30)
    assert table.returncode == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"the prune outlived ppl_table.py: {alive}"
