"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

Pruning papers report perplexity and zero-shot accuracy; lm-eval is how the field measures the second.
The model is wrapped as it is (`HFLM(pretrained=model)`), so a pruned model is measured without a save
and reload. Tasks are named and their data read by `prepare_tasks` first, so a typo or an unreachable
dataset fails before a model is loaded; the package's own offline tasks (`wikitext_cloze`, see
`optimum_sparse.cloze`) are always on the include path.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from optimum_sparse.cloze import TASKS_DIR

logger = logging.getLogger(__name__)

INSTALL_HINT = 'zero-shot evaluation needs lm-evaluation-harness: pip install "optimum-sparse[eval]"'
# what is kept of lm-eval's results: accuracies and their standard errors (filter "none")
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def require_lm_eval():
    """The `lm_eval` package, or an ImportError with the install line."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (a broken install fails here, not mid-run)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return lm_eval


def parse_task_names(value: str) -> list[str]:
    """'arc_easy, hellaswag' -> ['arc_easy', 'hellaswag'] (order kept, repeats dropped)."""
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise ValueError(f"no task names in {value!r}; give a comma-separated list such as wikitext_cloze,arc_easy")
    return names


@dataclass
class PreparedTasks:
    """lm-eval tasks with their data loaded, and the TaskManager that knows them (reused for every run)."""

    names: list[str]
    manager: Any
    tasks: list[Any]


def _task_manager(names: Sequence[str], include_path: str | os.PathLike | None) -> Any:
    """A TaskManager that knows every name in `names`, or a ValueError naming the unknown ones.

    Indexing lm-eval's own ~15,000 task configs takes seconds: the package's and the user's directories
    are tried alone first, and lm-eval's are added only when a name is not found there.
    """
    from lm_eval.tasks import TaskManager

    paths = [os.fspath(TASKS_DIR)] + ([os.fspath(include_path)] if include_path is not None else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        close = "; ".join(f"{name}: did you mean {', '.join(hint)}?" for name, hint in hints.items() if hint)
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}"
            + (f" ({close})" if close else "")
            + "; list the tasks with `lm-eval ls tasks`, or add a directory of task YAMLs (include path)"
        )
    return manager


def prepare_tasks(names: str | Sequence[str], include_path: str | os.PathLike | None = None) -> PreparedTasks:
    """Check lm-eval, the include path and the task names, and load the tasks' data: before any model work.

    Raises ImportError (lm-eval missing: the install line), FileNotFoundError (include path), ValueError
    (unknown task) or RuntimeError (a task's data could not be loaded, e.g. a Hub dataset offline).
    """
    require_lm_eval()
    if include_path is not None and not os.path.exists(include_path):
        raise FileNotFoundError(f"the task include path {os.fspath(include_path)!r} does not exist")
    names = parse_task_names(names) if isinstance(names, str) else list(names)
    manager = _task_manager(names, include_path)
    try:
        loaded = manager.load(names)
    except (OSError, ConnectionError) as err:  # Hub datasets need the network
        raise RuntimeError(
            f"could not load the data of task(s) {', '.join(names)}: {err} (Hub tasks need the network; "
            "wikitext_cloze runs offline)"
        ) from err
    return PreparedTasks(names, manager, list(loaded["tasks"].values()))


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Hide lm-eval's tqdm bars when `show` is False.

    lm-eval creates its bars without a `disable` argument, and tqdm reads TQDM_DISABLE only when it is
    imported; the bars write to sys.stderr as it is when they start, so it is swapped for a null stream
    during the run. Log records still appear: logging handlers hold the stream they were created with.
    """
    if show:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        yield


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """simple_evaluate seeds Python's, NumPy's and torch's global generators; the caller's draws go on as before."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def accuracy_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: acc, acc_norm and their stderr where reported."""
    table: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for metric in METRICS:
            value = values.get(f"{metric},none")
            if isinstance(value, (int, float)):  # stderr is "N/A" when it cannot be estimated
                row[metric] = float(value)
        if row:
            table[task] = row
    return table


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str] | PreparedTasks,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of `model` on lm-eval `tasks`: {task: {"acc": .., "acc_stderr": .., ...}}.

    Args:
        model: a transformers causal LM, evaluated as it is in memory (on its own device).
        tokenizer: its tokenizer.
        tasks: task names (lm-eval's, `wikitext_cloze`, or ones under `include_path`; a list or one comma-separated
            string), or `prepare_tasks`'s result.
        include_path: a directory of task YAMLs (lm-eval's TaskManager `include_path`), for names only.
        limit: evaluate the first `limit` examples of each task (None: all).
        batch_size: sequences per forward pass.
        show_progress: show lm-eval's progress bars.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(tasks, include_path)
    was_training = model.training
    model.eval()
    try:
        with _progress_bars(show_progress), _random_state_kept():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = simple_evaluate(
                model=lm,
                tasks=prepared.tasks,
                task_manager=prepared.manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,
            )
    finally:
        model.train(was_training)
    table = accuracy_table(output["results"])
    for task, values in output["results"].items():
        if task not in table:  # e.g. a generation task scored by exact match
            logger.warning("zero-shot %s reports no accuracy; its metrics: %s", task, sorted(values))
    for task, row in table.items():
        logger.info("zero-shot %s: %s", task, ", ".join(f"{key} {value:.4f}" for key, value in row.items()))
    return table


def format_zero_shot(tables: dict[str, dict[str, dict[str, float]]]) -> str:
    """A small text table: one row per task, acc ± stderr and acc_norm ± stderr per column of `tables`.

    `tables` maps a column label (e.g. "dense", "pruned") to `evaluate_zero_shot`'s result.
    """

    def cell(row: dict[str, float] | None, metric: str) -> str:
        if not row or metric not in row:
            return "-"
        stderr = row.get(f"{metric}_stderr")
        return f"{row[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")

    tasks = list(dict.fromkeys(task for table in tables.values() for task in table))
    header = [f"{'task':<24}"] + [f"{f'{label} {metric}':>22}" for label in tables for metric in ("acc", "acc_norm")]
    lines = [" ".join(header)]
    for task in tasks:
        cells = [f"{cell(table.get(task), metric):>22}" for table in tables.values() for metric in ("acc", "acc_norm")]
        lines.append(" ".join([f"{task:<24}"] + cells))
    return "\n".join(lines)
