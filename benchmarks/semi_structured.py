"""2:4 sub-models on a GPU: compressed semi-structured weights against masking in place (needs CUDA, sm80+).

What stale reuse buys when a sub-model is expensive to instantiate: for each refresh interval K, a
loop of `--steps` mask-learning steps samples a fresh 2:4 mask every K steps, activates it (compressing
it, or writing W0 * m into the weights) and runs one forward pass of `--batch-size` x `--seq-len`
tokens. Reports seconds per step, the share spent instantiating, and the forward time alone.

    python benchmarks/semi_structured.py                      # SmolLM2-135M in float16
    python benchmarks/semi_structured.py --llama-shape 4096 11008 --layers 4   # Llama-2-7B-shaped blocks

Prints a markdown table, then one JSON line. Without a suitable GPU it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from optimum_sparse import SparsityConfig
from optimum_sparse.pg.spaces.weight_space import NMSpace


def _model(args: argparse.Namespace) -> torch.nn.Module:
    if args.llama_shape:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, intermediate = args.llama_shape
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=hidden // 128,
            num_key_value_heads=hidden // 128,
            vocab_size=32000,
        )
        return LlamaForCausalLM(config).to(torch.float16)
    from optimum_sparse.auto_loading import load_model_and_tokenizer

    return load_model_and_tokenizer(None, dtype="float16")[0]


@torch.no_grad()
def measure(model, submodels: str, refresh_every: int, args: argparse.Namespace) -> dict:
    """Mean seconds per step (activation + forward) with a new sample every `refresh_every` steps."""
    space = NMSpace(model, SparsityConfig(method="pg", pattern="2:4", pg_submodels=submodels))
    scores = space.initial_scores().cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
    sample, activate_seconds, forward_seconds = None, 0.0, 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            activate_seconds = forward_seconds = 0.0
        if step % refresh_every == 0:
            sample = space.sample(scores, 1, generator=generator)[0]
        torch.cuda.synchronize()
        start = time.perf_counter()
        if step % refresh_every == 0:  # a stale sample stays active, as in the learner
            space.activate(sample)
        torch.cuda.synchronize()
        middle = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        activate_seconds += middle - start
        forward_seconds += time.perf_counter() - middle
    compressed = getattr(space.masker, "compressed_layers", None)
    space.finalize(space.harden(scores))
    return {
        "submodels": submodels,
        "refresh_every": refresh_every,
        "seconds_per_step": (activate_seconds + forward_seconds) / args.steps,
        "instantiate_seconds_per_step": activate_seconds / args.steps,
        "forward_seconds": forward_seconds / args.steps,
        "compressed_layers": len(compressed) if compressed is not None else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh-every", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--llama-shape", nargs=2, type=int, metavar=("HIDDEN", "INTERMEDIATE"))
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print(
            "benchmarks/semi_structured.py needs a CUDA GPU with compute capability >= 8.0; none here", file=sys.stderr
        )
        sys.exit(2)
    records = []
    for submodels in ("masked", "sliced"):
        for refresh_every in args.refresh_every:
            model = _model(args).cuda().eval()  # fresh weights: finalize zeroes the pruned ones
            records.append(measure(model, submodels, refresh_every, args))
            del model
            torch.cuda.empty_cache()
    print("| sub-models | K | s/step | instantiation s/step | forward s | compressed layers |")
    print("|---|---|---|---|---|---|")
    for r in records:
        name = "compressed (sliced)" if r["submodels"] == "sliced" else "masked"
        print(
            f"| {name} | {r['refresh_every']} | {r['seconds_per_step']:.4f} | {r['instantiate_seconds_per_step']:.4f} "
            f"| {r['forward_seconds']:.4f} | {r['compressed_layers']} |"
        )
    device = torch.cuda.get_device_name()
    print(json.dumps({"benchmark": "semi_structured", "device": device, "args": vars(args), "runs": records}))


if __name__ == "__main__":
    main()
