"""Perplexity on held-out text and a sparsity report.

Perplexity follows the usual protocol for pruning papers: tokenize the whole text, cut it into
non-overlapping windows of `seq_len` tokens, average the next-token loss over windows and
exponentiate. `max_windows` keeps CPU runs affordable (the first W windows).
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn
from tqdm.auto import tqdm

from optimum_sparse.architecture import PRUNABLE_TYPES, find_blocks, get_weight
from optimum_sparse.calibration import load_text, tokenize

logger = logging.getLogger(__name__)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (W x seq_len) over a 1-D token tensor; the tail shorter than a window is dropped."""
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].reshape(count, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    data: str | os.PathLike | torch.Tensor = None,
    seq_len: int = 2048,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> float:
    """Perplexity of `model` on a text file, Hub dataset spec ('wikitext2' = wikitext-2-raw-v1 test) or token ids."""
    if isinstance(data, torch.Tensor):
        ids = data.reshape(-1)
    else:
        if data is None:
            raise ValueError("perplexity needs evaluation data: a text file, a dataset spec or token ids")
        ids = tokenize(load_text(data, split="test"), tokenizer)
    windows = eval_windows(ids, seq_len, max_windows)
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for window in tqdm(windows, desc="Perplexity", disable=not show_progress):
            out = model(
                input_ids=window.unsqueeze(0).to(device),
                labels=window.unsqueeze(0).to(device),
                use_cache=False,
            )
            total += float(out.loss)
    finally:
        model.train(was_training)
    ppl = math.exp(total / len(windows))
    logger.info("perplexity %.3f over %d windows x %d tokens", ppl, len(windows), seq_len)
    return ppl


def sparsity_report(model: nn.Module) -> dict:
    """Measured zeros per prunable linear in the blocks, and over all of them ("total")."""
    name, blocks = find_blocks(model)
    layers: dict[str, float] = {}
    per_block: dict[str, float] = {}
    zeros = numel = 0
    for index, block in enumerate(blocks):
        block_zeros = block_numel = 0
        for sub, module in block.named_modules():
            if isinstance(module, PRUNABLE_TYPES):
                weight = get_weight(module)
                layer_zeros = int((weight == 0).sum())
                layers[f"{name}.{index}.{sub}"] = layer_zeros / weight.numel()
                block_zeros += layer_zeros
                block_numel += weight.numel()
        per_block[f"{name}.{index}"] = block_zeros / max(block_numel, 1)
        zeros += block_zeros
        numel += block_numel
    return {"layers": layers, "blocks": per_block, "total": zeros / max(numel, 1)}


def format_sparsity_report(report: dict) -> str:
    lines = [f"{'layer':<60} sparsity"]
    lines += [f"{name:<60} {value:.4f}" for name, value in report["layers"].items()]
    blocks = report.get("blocks", {})
    if len(set(round(v, 3) for v in blocks.values())) > 1:  # layer budgets: show them per block
        lines.append(f"{'block':<60} sparsity")
        lines += [f"{name:<60} {value:.4f}" for name, value in blocks.items()]
    lines.append(f"{'total':<60} {report['total']:.4f}")
    return "\n".join(lines)
