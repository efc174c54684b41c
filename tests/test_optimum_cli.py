"""`optimum-cli sparse ...` through the installed optimum-cli script: registered, light to load, same output.

These run the real optimum-cli of this environment, which finds `sparse` in the installed
`optimum.commands.register` namespace: install this checkout (`pip install -e .`) first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import prune_args

from optimum_sparse import cli

ROOT = Path(__file__).resolve().parents[1]
OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")
NAMESPACE_DIRS = ("optimum", "optimum/commands", "optimum/commands/register")


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run from a neutral directory: `python -c` there must not pick up this checkout through the cwd."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cwd = tempfile.gettempdir()
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def optimum_cli() -> str:
    """The installed optimum-cli, checked to load `sparse` from this checkout (else the tests would test another)."""
    assert OPTIMUM_CLI.is_file(), f"{OPTIMUM_CLI} is missing: pip install 'optimum>=2,<3'"
    where = _run([sys.executable, "-c", "import optimum.commands.register.register_sparse as m; print(m.__file__)"])
    assert where.returncode == 0, f"optimum-cli cannot see `sparse`: pip install -e {ROOT}\n{where.stderr}"
    assert Path(where.stdout.strip()).resolve().is_relative_to(ROOT), f"installed from elsewhere: pip install -e {ROOT}"
    return os.fspath(OPTIMUM_CLI)


def _prune_args(model: str, data: str, *extra: str) -> list[str]:
    evaluation = ["--eval-data", data, "--eval-seq-len", "64", "--eval-max-windows", "2", "--json"]
    return prune_args(model, data, "--method", "wanda", "--sparsity", "0.5", *evaluation, *extra)


def test_the_namespace_directories_have_no_init_file():
    """PEP 420: an __init__.py in any of them would hide optimum's own optimum.commands package."""
    assert [d for d in NAMESPACE_DIRS if (ROOT / d / "__init__.py").exists()] == []
    assert (ROOT / "optimum/commands/register/register_sparse.py").is_file()


def test_optimum_cli_help_lists_sparse(optimum_cli):
    done = _run([optimum_cli, "--help"])
    assert done.returncode == 0, done.stderr
    assert "sparse" in done.stdout
    assert "prune, evaluate and export sparse LLMs" in done.stdout


def test_starting_optimum_cli_imports_neither_torch_nor_optimum_sparse(optimum_cli):
    """Every optimum-cli start builds the whole parser, `sparse` included: that must stay cheap."""
    code = (
        "import json, sys\n"
        "sys.argv = ['optimum-cli', '--help']\n"
        "from optimum.commands.optimum_cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'transformers', 'optimum_sparse')\n"
        "print(json.dumps({'registered': 'optimum.commands.register.register_sparse' in sys.modules,"
        " 'heavy': [m for m in heavy if m in sys.modules]}))\n"
    )
    done = _run([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"registered": True, "heavy": []}


def test_optimum_cli_sparse_help_lists_optimum_sparse_commands(optimum_cli):
    done = _run([optimum_cli, "sparse", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: optimum-cli sparse ")
    for command in cli.COMMANDS:
        assert command in done.stdout


def test_optimum_cli_sparse_prune_gives_the_same_json_as_optimum_sparse(
    optimum_cli, saved_llama, text_file, tmp_path, capsys
):
    output = tmp_path / "pruned"
    done = _run([optimum_cli, "sparse", *_prune_args(saved_llama, text_file, "--output", os.fspath(output))])
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert (output / "sparsity_config.json").is_file()

    assert cli.main(_prune_args(saved_llama, text_file, "--output", os.fspath(tmp_path / "direct"))) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(record) == set(direct)
    assert {"ppl_dense", "ppl", "measured_sparsity", "checkpoint_mb"} <= set(record)
    assert record["method"] == direct["method"] == "wanda"
    assert record["measured_sparsity"] == pytest.approx(direct["measured_sparsity"])
    assert record["ppl"] == pytest.approx(direct["ppl"], rel=1e-4)
    assert record["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert record["ppl_dense"] == pytest.approx(direct["ppl_dense"], rel=1e-4)


def test_optimum_cli_sparse_prune_bad_model_exits_2_naming_the_fix(optimum_cli, tmp_path):
    output = tmp_path / "never"
    done = _run([optimum_cli, "sparse", "prune", "--model", os.fspath(tmp_path / "missing"), "--output", str(output)])
    assert done.returncode == 2
    assert "optimum-cli sparse prune: error: model path" in done.stderr
    assert "pass a Hub id, a local directory or a .gguf file" in done.stderr
    assert not output.exists()


def test_optimum_cli_sparse_bad_flag_exits_2_with_argparse_error(optimum_cli):
    done = _run([optimum_cli, "sparse", "prune", "--sparsity", "half"])
    assert done.returncode == 2
    assert "optimum-cli sparse prune: error: argument --sparsity" in done.stderr
