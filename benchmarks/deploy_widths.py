"""Why uniform widths are rounded to multiples of 32: llama.cpp prompt speed against the MLP width.

Random models of SmolLM2-135M's shape with 6 query heads over 2 KV groups and MLP widths of 640, 682,
704 and 768 channels are exported to GGUF (f16 and q8_0) and timed in llama.cpp against the dense
SmolLM2 files that `benchmarks/deploy.py` wrote (run that first), with deploy.py's interleaved rounds.

    python benchmarks/deploy_widths.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from deploy import OUT, llama_cpp_speed

WIDTHS = (640, 682, 704, 768)


def main() -> None:
    import transformers

    from optimum_sparse.auto_loading import load_model_and_tokenizer
    from optimum_sparse.export.gguf import export_gguf
    from optimum_sparse.loading import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dense, _ = load_model_and_tokenizer(None, "float32")
    paths = {("dense", t): os.path.join(OUT, f"dense.{t}.gguf") for t in ("f16", "q8_0")}
    scratch = tempfile.mkdtemp(prefix="widths-")
    for width in WIDTHS:
        settings = dense.config.to_dict()
        settings.update(intermediate_size=width, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
        settings.pop("architectures", None)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).float()
        for outtype in ("f16", "q8_0"):
            paths[(width, outtype)] = os.path.join(scratch, f"w{width}.{outtype}.gguf")
            export_gguf(model, default_model_path(), paths[(width, outtype)], outtype=outtype, overwrite=True)
    speeds = llama_cpp_speed(paths, list(range(1000, 1512)), args.threads, args.repeats)
    print("| MLP width | pp tok/s f16 | pp tok/s q8_0 |")
    print("|---|---|---|")
    for name in ("dense", *WIDTHS):
        print(f"| {name} | {speeds[(name, 'f16')][0]:.0f} | {speeds[(name, 'q8_0')][0]:.0f} |")
    print(json.dumps({"widths": {f"{k[0]}.{k[1]}": v for k, v in speeds.items()}}))


if __name__ == "__main__":
    main()
