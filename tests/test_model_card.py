"""The model card (README.md) beside a pruned checkpoint: Hub metadata that huggingface_hub reads back, and
a body that carries the results (sparsity per layer, perplexity, zero-shot accuracy) and the command."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from conftest import build_model
from huggingface_hub import ModelCard

from optimum_sparse import SparseModel, SparsityConfig, cli
from optimum_sparse.card import base_model_relation
from optimum_sparse.card.sections import config_call
from optimum_sparse.config import CONFIG_NAME
from optimum_sparse.sequential import prune

BASE = "HuggingFaceTB/SmolLM2-135M"
ZERO_SHOT = {
    "arc_easy": {"acc": 0.6123, "acc_stderr": 0.0101, "acc_norm": 0.5512, "acc_norm_stderr": 0.0102},
    "piqa": {"acc,none": 0.7021, "acc_stderr,none": 0.0107, "alias": "piqa"},  # lm-eval's raw key form too
}
ZERO_SHOT_DENSE = {"arc_easy": {"acc": 0.6532, "acc_stderr": 0.0098}, "piqa": {"acc": 0.7155, "acc_stderr": 0.0105}}


def _pruned(**config) -> SparseModel:
    model = build_model("llama")
    cfg = SparsityConfig(**{"method": "magnitude", "sparsity": 0.5, "device": "cpu", **config})
    return SparseModel(model, masks=prune(model, cfg, None, show_progress=False).masks, config=cfg)


def _measured(sparse: SparseModel, directory) -> ModelCard:
    sparse.base_model_id = BASE
    sparse.metrics = {
        "perplexity": 31.25,
        "perplexity_dense": 20.5,
        "eval_data": "wikitext2",
        "eval_seq_len": 2048,
        "eval_max_windows": 40,
        "zero_shot": ZERO_SHOT,
        "zero_shot_dense": ZERO_SHOT_DENSE,
    }
    sparse.save_pretrained(directory)
    return ModelCard.load(directory / "README.md")


def test_card_metadata_parses_with_huggingface_hub(tmp_path):
    card = _measured(_pruned(pattern="2:4"), tmp_path / "ckpt")
    data = card.data
    assert data.base_model == BASE and data.base_model_relation == "quantized"  # one-shot: a compression
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["optimum-sparse", "sparse", "pruned", "magnitude", "2:4-sparsity"]
    results = {(r.dataset_type, r.metric_type): r for r in data.eval_results}
    assert set(results) == {("wikitext", "perplexity"), ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("piqa", "acc")}
    ppl = results["wikitext", "perplexity"]
    assert ppl.metric_value == 31.25 and ppl.dataset_config == "wikitext-2-raw-v1" and ppl.dataset_split == "test"
    assert ppl.dataset_args == {"seq_len": 2048, "max_windows": 40}
    assert results["piqa", "acc"].metric_value == 0.7021 and results["piqa", "acc"].dataset_args == {"num_fewshot": 0}


def test_card_body_shows_sparsity_per_layer_perplexity_and_zero_shot_results(tmp_path):
    text = _measured(_pruned(), tmp_path / "ckpt").text
    assert "| `mlp.up_proj` | 2 | 50.00% | 50.00% | 50.00% |" in text  # one row per kind of layer, over 2 blocks
    assert "| all pruned layers (weighted by size) | 14 |  | 50.00% |  |" in text
    assert "| dense (before pruning) | 20.50 |" in text and "| pruned (this model) | 31.25 (+52.4%) |" in text
    assert "Measured on `wikitext` (wikitext-2-raw-v1), test split: 2048-token windows, the first 40." in text
    assert "| arc_easy | acc | 0.6123 ± 0.0101 | 0.6532 ± 0.0098 |" in text
    assert "| arc_easy | acc_norm | 0.5512 ± 0.0102 |  |" in text  # not measured on the dense model
    assert "| piqa | acc | 0.7021 ± 0.0107 | 0.7155 ± 0.0105 |" in text
    assert "| mean of 2 tasks | acc | 0.6572 | 0.6844 |" in text
    assert "alias" not in text


def test_python_api_card_shows_a_sparsity_config_that_rebuilds_the_run(tmp_path):
    sparse = _pruned(sparsity=0.6, ignore=["o_proj"])
    sparse.save_pretrained(tmp_path / "ckpt")
    text = (tmp_path / "ckpt" / "README.md").read_text(encoding="utf-8")
    call = config_call(sparse.sparsity_config)
    assert call == "SparsityConfig(method='magnitude', sparsity=0.6, ignore=['o_proj'], device='cpu')"
    assert f"config = {call}" in text and "Made with the optimum-sparse Python API" in text
    assert eval(call, {"SparsityConfig": SparsityConfig}) == sparse.sparsity_config
    nm = SparsityConfig(method="sparsegpt", pattern="2:4", block_size=64)
    assert eval(config_call(nm), {"SparsityConfig": SparsityConfig}) == nm


def test_unknown_or_local_base_model_gives_no_base_model(tmp_path):
    sparse = _pruned()
    sparse.base_model_id = None
    sparse.save_pretrained(tmp_path / "none")
    data = ModelCard.load(tmp_path / "none" / "README.md").data
    assert data.base_model is None and data.get("base_model_relation") is None
    assert data.library_name == "transformers" and "optimum-sparse" in data.tags

    sparse.base_model_id = os.fspath(tmp_path / "none")  # a local directory, not a Hub id
    sparse.save_pretrained(tmp_path / "local")
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert f"| base model | {tmp_path / 'none'} |" in card.text  # named in the text only
    assert card.data.eval_results is None  # nothing measured: no model-index


def test_relation_is_finetune_for_trained_models_and_survives_a_reload(tmp_path):
    one_shot = SparsityConfig(method="wanda")
    assert base_model_relation(one_shot) == "quantized"
    assert base_model_relation(SparsityConfig(method="pg", pg_objective="block")) == "quantized"
    assert base_model_relation(SparsityConfig(method="pg", pg_objective="lm")) == "finetune"  # SparsityCallback
    assert base_model_relation(one_shot, fine_tuned=True) == "finetune"

    sparse = _pruned()
    sparse.base_model_id, sparse.fine_tuned, sparse.command = BASE, True, "optimum-sparse prune --method magnitude"
    sparse.save_pretrained(tmp_path / "tuned")
    loaded = SparseModel.from_pretrained(tmp_path / "tuned")
    assert loaded.fine_tuned and loaded.command == "optimum-sparse prune --method magnitude"
    loaded.save_pretrained(tmp_path / "again")
    card = ModelCard.load(tmp_path / "again" / "README.md")
    assert card.data.base_model_relation == "finetune"
    assert "then fine-tuned with its zeros kept" in card.text and "SparseFineTuneCallback" in card.text
    record = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert record["fine_tuned"] is True and record["command"] == "optimum-sparse prune --method magnitude"


def test_cli_prune_card_carries_the_command_and_the_measured_perplexity(saved_llama, text_file, tmp_path, capsys):
    output = tmp_path / "pruned dir"  # a space: the command is shell-quoted
    args = ["prune", "--model", saved_llama, "--method", "wanda", "--calibration-data", text_file]
    args += ["--num-samples", "4", "--seq-len", "32", "--device", "cpu", "--no-progress"]
    args += ["--eval-data", text_file, "--eval-seq-len", "64", "--eval-max-windows", "2"]
    args += ["--output", os.fspath(output), "--json"]
    assert cli.main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    card = ModelCard.load(output / "README.md")
    command = shlex.join(["optimum-sparse", *args])
    assert f"```bash\n{command}\n```" in card.text and f"'{output}'" in command
    assert shlex.split(command)[1:] == args
    assert f"| pruned (this model) | {record['ppl']:.2f} (" in card.text
    assert f"| dense (before pruning) | {record['ppl_dense']:.2f} |" in card.text
    assert "the local text file `text.txt`: 64-token windows, the first 2." in card.text
    # the base is a local directory: no base_model; a local file's perplexity stays out of model-index
    assert card.data.base_model is None and card.data.eval_results is None
    assert card.data.tags == ["optimum-sparse", "sparse", "pruned", "wanda", "unstructured-sparsity"]
    assert SparseModel.from_pretrained(output).command == command


@pytest.mark.parametrize("compact", [False, True])
def test_card_is_written_for_both_formats_and_names_the_library_that_loads_each(compact, tmp_path):
    sparse = _pruned()
    sparse.save_pretrained(tmp_path / "ckpt", compact=compact)
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    assert ("plain `transformers` cannot read it" in card.text) == compact
    assert card.data.library_name == ("optimum-sparse" if compact else "transformers")
    assert str(card) == str(sparse.model_card(compact=compact))


def test_card_and_title_name_per_block_budgets_not_the_default_sparsity_they_replace(tmp_path):
    sparse = _pruned(layer_sparsity=[0.3, 0.7])  # two blocks, one budget each: `sparsity` applies to none
    text = _measured(sparse, tmp_path / "ckpt").text
    assert sparse.sparsity_config.describe() == "magnitude per-block budgets 30%-70%"
    assert "| target sparsity | per-block budgets 30%-70% |" in text
    assert "50%" not in text.split("## ")[0]  # the title and summary never claim the unused default


def test_card_names_owl_budgets_and_module_budgets_beside_the_mean(tmp_path):
    plain = _pruned()  # the card reads the config: OWL's own budgets need no calibration run here
    owl_config = plain.sparsity_config.replace(method="wanda", sparsity_profile="owl")
    owl = _measured(SparseModel(plain.model, masks=plain.masks, config=owl_config), tmp_path / "owl").text
    assert "| target sparsity | 50% on average, OWL budgets per block |" in owl
    by_module = _measured(_pruned(layer_sparsity={r"mlp\.down_proj": 0.3}), tmp_path / "module").text
    assert '| target sparsity | 50%, budgets by module: {"mlp\\\\.down_proj": 0.3} |' in by_module
