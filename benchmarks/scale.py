"""Pruning a Llama-2-7B-shaped checkpoint from disk on this CPU: peak memory, seconds per block, 70B estimate.

    python benchmarks/scale.py --make bench_out/scale/llama7b-4 --layers 4   # random bf16 weights, ~3.8 GB
    python benchmarks/scale.py --run bench_out/scale/llama7b-4 --methods wanda sparsegpt
    python benchmarks/scale.py --smollm2-processes sparsegpt   # 1 vs 2 processes (gloo, one thread each)
    python benchmarks/scale.py --smollm2-resume sparsegpt      # killed after 15 blocks, resumed, vs a rerun

`--make` writes a LlamaConfig with Llama-2-7B's block dimensions (hidden 4096, MLP 11008, 32 heads) and
random bfloat16 weights, block by block, as a sharded safetensors checkpoint (it never holds the model);
the vocabulary is SmolLM2's (its tokenizer is saved beside it), so WikiText-2 calibration text works.
`--run` prunes it with `optimum-sparse prune --low-memory` (8 x 512 calibration tokens, 50%) in its own
process per method, and prints a table (peak resident memory, seconds per block, an estimate for 80
blocks of Llama-2-70B's shapes) and one JSON line. The 70B estimate scales the measured seconds per block
by the ratio of the work per block: Wanda's passes grow with a block's parameters, SparseGPT's solve with
sum over layers of (in^2 x out + in^3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2")

#: (hidden, intermediate, heads, kv heads) of the block shapes
LLAMA2_7B = (4096, 11008, 32, 32)
LLAMA2_70B = (8192, 28672, 64, 8)


def block_linears(shape: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """(in, out) of a Llama block's seven linears."""
    hidden, inter, heads, kv = shape
    head_dim = hidden // heads
    attention = [(hidden, hidden), (hidden, kv * head_dim), (hidden, kv * head_dim), (hidden, hidden)]
    return attention + [(hidden, inter), (hidden, inter), (inter, hidden)]


def work(shape: tuple[int, int, int, int], method: str) -> float:
    linears = block_linears(shape)
    if method == "sparsegpt":
        return float(sum(i * i * o + i**3 for i, o in linears))
    return float(sum(i * o for i, o in linears))


def make(directory: str, layers: int) -> None:
    """Write the random checkpoint one block at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from optimum_sparse.auto_loading import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(None, "float32")
    hidden, inter, heads, kv = LLAMA2_7B
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        dtype="bfloat16",
        tie_word_embeddings=False,
    )
    os.makedirs(directory, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    mapping = {}
    head_dim = hidden // heads
    for index in range(layers):
        prefix = f"model.layers.{index}."
        block = {
            prefix + "self_attn.q_proj.weight": randn(hidden, hidden),
            prefix + "self_attn.k_proj.weight": randn(kv * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": randn(kv * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": randn(hidden, hidden),
            prefix + "mlp.gate_proj.weight": randn(inter, hidden),
            prefix + "mlp.up_proj.weight": randn(inter, hidden),
            prefix + "mlp.down_proj.weight": randn(hidden, inter),
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        file = f"model-{index:05d}.safetensors"
        save_file(block, os.path.join(directory, file), metadata={"format": "pt"})
        mapping.update({name: file for name in block})
        print(f"block {index} written", file=sys.stderr, flush=True)
    rest = {
        "model.embed_tokens.weight": randn(config.vocab_size, hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        "lm_head.weight": randn(config.vocab_size, hidden),
    }
    save_file(rest, os.path.join(directory, "model-rest.safetensors"), metadata={"format": "pt"})
    mapping.update({name: "model-rest.safetensors" for name in rest})
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in set(mapping.values()))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": mapping}, handle, indent=2)
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"{directory}: {layers} blocks, {total / 2**30:.2f} GiB", file=sys.stderr)


def run(directory: str, methods: list[str], samples: int, seq_len: int, device: str = "cpu") -> list[dict]:
    layers = json.load(open(os.path.join(directory, "config.json"), encoding="utf-8"))["num_hidden_layers"]
    records = []
    for method in methods:
        output = os.path.join(os.path.dirname(os.path.abspath(directory)), f"{os.path.basename(directory)}-{method}")
        command = [sys.executable, "-m", "optimum_sparse.cli", "prune", "--model", directory, "--low-memory"]
        command += ["--method", method, "--sparsity", "0.5", "--num-samples", str(samples), "--seq-len", str(seq_len)]
        command += ["--calibration-data", os.path.join(DATA, "valid.txt"), "--device", device, "--output", output]
        command += ["--overwrite", "--json", "--no-progress", "--log-level", "WARNING"]
        print(" ".join(command[1:]), file=sys.stderr, flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            records.append({"method": method, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        per_block = record["prune_seconds"] / layers
        ratio = work(LLAMA2_70B, method) / work(LLAMA2_7B, method)
        records.append(
            {
                "method": method,
                "blocks": layers,
                "calibration": f"{samples} x {seq_len}",
                "peak_rss_gib": record["peak_rss_mb"] / 1024,
                "prune_seconds": record["prune_seconds"],
                "seconds_per_block": per_block,
                "estimate_70b_hours": 80 * per_block * ratio / 3600,
                **({"peak_gpu_gib": record["peak_gpu_mb"] / 1024} if "peak_gpu_mb" in record else {}),
            }
        )
        print(records[-1], file=sys.stderr, flush=True)
    return records


SMOLLM2 = ["--num-samples", "32", "--seq-len", "512", "--eval-seq-len", "1024", "--eval-max-windows", "40"]


def _smollm2_command(method: str, output: str, *extra: str) -> list[str]:
    command = ["-m", "optimum_sparse.cli", "prune", "--method", method, "--sparsity", "0.5", *SMOLLM2]
    command += ["--calibration-data", os.path.join(DATA, "valid.txt"), "--eval-data", os.path.join(DATA, "test.txt")]
    return command + ["--skip-dense-eval", "--device", "cpu", "--output", output, "--overwrite", "--json", *extra]


def _run_json(command: list[str], env: dict | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), wall


def processes(method: str, out: str) -> list[dict]:
    """SmolLM2 pruned by 1 and by 2 processes (gloo, one thread each): wall time and perplexity."""
    one, wall_one = _run_json(
        [sys.executable, *_smollm2_command(method, f"{out}/{method}-1", "--no-progress")], {"OMP_NUM_THREADS": "1"}
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two, wall_two = _run_json(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            *_smollm2_command(method, f"{out}/{method}-2", "--no-progress"),
        ],
        {"OMP_NUM_THREADS": "1"},
    )
    return [
        {"method": method, "processes": n, "prune_seconds": r["prune_seconds"], "wall_seconds": w, "ppl": r["ppl"]}
        for n, r, w in ((1, one, wall_one), (2, two, wall_two))
    ]


def resume(method: str, out: str, kill_after: int) -> dict:
    """Kill a SmolLM2 run once `kill_after` blocks are recorded, start it again, and time both to a full run."""
    command = [
        sys.executable,
        *_smollm2_command(method, f"{out}/{method}-resumed", "--no-progress", "--resume-dir", f"{out}/{method}-resume"),
    ]
    shutil.rmtree(f"{out}/{method}-resume", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    progress = f"{out}/{method}-resume/progress.json"
    while proc.poll() is None:
        if os.path.exists(progress) and json.load(open(progress, encoding="utf-8"))["done"] >= kill_after:
            proc.kill()
            break
        time.sleep(0.5)
    killed_at = time.perf_counter() - start
    resumed, resumed_wall = _run_json(command, {"OMP_NUM_THREADS": "1"})
    full, full_wall = _run_json(
        [sys.executable, *_smollm2_command(method, f"{out}/{method}-full", "--no-progress")], {"OMP_NUM_THREADS": "1"}
    )
    return {
        "method": method,
        "killed_after_blocks": kill_after,
        "seconds_before_kill": killed_at,
        "resume_wall_seconds": resumed_wall,
        "rerun_wall_seconds": full_wall,
        "ppl_resumed": resumed["ppl"],
        "ppl_uninterrupted": full["ppl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make", metavar="DIR", help="write the random 7B-shaped checkpoint")
    parser.add_argument("--layers", type=int, default=4, help="blocks of the checkpoint --make writes (7B: 32)")
    parser.add_argument("--run", metavar="DIR", help="prune this checkpoint from disk")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU rows (peak_gpu_mb is reported)")
    parser.add_argument("--smollm2-processes", metavar="METHOD", help="SmolLM2 with 1 and 2 processes")
    parser.add_argument("--smollm2-resume", metavar="METHOD", help="SmolLM2 killed mid-way, resumed, and rerun")
    parser.add_argument("--kill-after", type=int, default=15, help="blocks recorded before the kill")
    args = parser.parse_args()
    out = os.path.join(HERE, "..", "bench_out", "scale")
    if args.smollm2_processes:
        rows = processes(args.smollm2_processes, out)
        print("| method | processes | prune s | wall s | ppl |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['processes']} | {r['prune_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['ppl']:.4f} |"
            )
        print(json.dumps({"processes": rows}))
    if args.smollm2_resume:
        r = resume(args.smollm2_resume, out, args.kill_after)
        print("| method | killed after | resume wall s | rerun wall s | ppl resumed / uninterrupted |")
        print("|---|---|---|---|---|")
        print(
            f"| {r['method']} | {r['killed_after_blocks']} blocks | {r['resume_wall_seconds']:.0f} | "
            f"{r['rerun_wall_seconds']:.0f} | {r['ppl_resumed']:.4f} / {r['ppl_uninterrupted']:.4f} |"
        )
        print(json.dumps({"resume": r}))
    if args.make:
        make(args.make, args.layers)
    if args.run:
        records = run(args.run, args.methods, args.num_samples, args.seq_len, args.device)
        print("| method | blocks | peak RSS GiB | prune s | s / block | 70B estimate (80 blocks) h |")
        print("|---|---|---|---|---|---|")
        for r in records:
            if "error" in r:
                print(f"| {r['method']} | error: {r['error']} | | | | |")
                continue
            print(
                f"| {r['method']} | {r['blocks']} | {r['peak_rss_gib']:.2f} | {r['prune_seconds']:.0f} | "
                f"{r['seconds_per_block']:.1f} | {r['estimate_70b_hours']:.1f} |"
            )
        print(json.dumps({"scale": records}))


if __name__ == "__main__":
    main()
