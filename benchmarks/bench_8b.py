"""An 8B-scale run on a small machine: Llama-3-8B's exact configuration, random bfloat16 weights.

The model (32 blocks of hidden size 4096, MLP 14336, 32 heads and 8 KV heads, vocabulary
128256: 8.03e9 parameters, 16 GB) is written as sharded safetensors tensor by tensor, never
whole in memory, with the SmolLM2 tokenizer (its ids lie inside the vocabulary). Then

    latticequant quantize FOLDER --offload --blocks 0:2 --nsamples 8 --seqlen 512 \\
        --method gptq --bits 4 --group-size 128 --no-eval

runs under GNU time: blocks are read from disk one at a time, and only the first two are
quantized. Reported: peak RSS, seconds per block split into forwards and solves, and the
whole-model time projected from them (32 blocks). Results go to docs/bench_8b.json and .md.

    python benchmarks/bench_8b.py                       # writes 16 GB under --work
    python benchmarks/bench_8b.py --blocks 0:1 --nsamples 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs"

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_model(folder: Path, seed: int = 0, shard_bytes: int = 2 << 30) -> int:
    """Random bfloat16 weights (normal, std 0.02; norms 1) in shards of about ``shard_bytes``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(LLAMA3_8B)
    shards, current, size = [], {}, 0
    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        current[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
            _flush(folder, shards, save_file)
    if current:
        shards.append(current)
        _flush(folder, shards, save_file)
    n = len(shards)
    weight_map, total = {}, 0
    for k in range(n):
        old = folder / f"part-{k}.safetensors"
        new = folder / f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        old.rename(new)
        from safetensors import safe_open

        with safe_open(str(new), "pt") as f:
            for key in f.keys():
                weight_map[key] = new.name
    for _, shape in shapes:
        n_el = 1
        for d in shape:
            n_el *= d
        total += n_el
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B, indent=1))
    return total


def _flush(folder: Path, shards: list, save_file) -> None:
    k = len(shards) - 1
    save_file(shards[k], str(folder / f"part-{k}.safetensors"), metadata={"format": "pt"})
    shards[k] = {}  # freed: only the shard being filled is ever in memory


def save_tokenizer(folder: Path) -> None:
    from latticequant.pipeline.models import load_model

    _, tokenizer = load_model(None)
    tokenizer.save_pretrained(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/latticequant-bench-8b"))
    p.add_argument("--blocks", default="0:2")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("the peak memory is read with /usr/bin/time (GNU time); install it")
    model = args.work / "llama3-8b-random"
    if not (model / "model.safetensors.index.json").is_file():
        print("writing the model ...", flush=True)
        n = write_model(model)
        save_tokenizer(model)
        print(f"{n / 1e9:.2f}e9 parameters written to {model}", flush=True)
    out = args.work / "q"
    cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M wall_s=%e", sys.executable, "-m", "latticequant"]
    cmd += ["quantize", str(model), "--offload", "--blocks", args.blocks]
    cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += ["--method", "gptq", "--bits", "4", "--group-size", "128", "--no-eval", "--json"]
    cmd += ["--out", str(out)]  # an interrupted run resumes after its last finished block
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed: {proc.stderr.strip()[-800:]}")
    payload = json.loads(proc.stdout)
    rss = int(re.findall(r"peak_rss_kb=(\d+)", proc.stderr)[-1]) * 1024
    wall = float(re.findall(r"wall_s=([0-9.]+)", proc.stderr)[-1])
    start, end = (int(x) for x in args.blocks.split(":"))
    resumed = int(payload.get("blocks_resumed") or 0)
    n_blocks = end - max(start, resumed)  # blocks quantized by this invocation
    t = payload["timings"]
    per_block = payload["quantize_s"] / n_blocks
    result = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "blocks": args.blocks,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "peak_rss_bytes": rss,
        "wall_s": wall,
        "load_s": payload["load_s"],
        "quantize_s": payload["quantize_s"],
        "forward_s_per_block": t["forward_s"] / n_blocks,
        "solve_s_per_block": t["solve_s"] / n_blocks,
        "seconds_per_block": per_block,
        "projected_model_s": payload["load_s"] + 32 * per_block,
        "n_layers": payload["n_layers"],
        "blocks_resumed": resumed,
        "dtype": payload["dtype"],
    }
    gib = 2**30
    lines = [
        "# An 8B-scale run on a 24 GiB machine",
        "",
        "Llama-3-8B's exact configuration with random bfloat16 weights (8.03e9 parameters, 16 GB "
        "of sharded safetensors), quantized with `latticequant quantize FOLDER --offload --blocks "
        f"{args.blocks} --nsamples {args.nsamples} --seqlen {args.seqlen} --method gptq --bits 4 "
        "--group-size 128` (asymmetric, act-order: the defaults). "
        f"{result['machine']}, {result['cpus']} CPUs, {args.threads} threads, torch "
        f"{result['torch']}; this CPU has no bfloat16 matrix units, so bfloat16 forwards run "
        "far below its float32 speed. Generated by `python benchmarks/bench_8b.py`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| layers quantized | {result['n_layers']} (blocks {args.blocks}) |",
        f"| peak RSS (whole process, GNU time) | {rss / gib:.2f} GiB (goal: under 6 GiB) |",
        f"| loading (embeddings, head; blocks stay on disk) | {result['load_s']:.0f} s |",
        f"| forwards per block | {result['forward_s_per_block']:.0f} s |",
        f"| solves per block | {result['solve_s_per_block']:.0f} s |",
        f"| whole block | {per_block:.0f} s |",
        f"| projected for all 32 blocks | {result['projected_model_s'] / 3600:.1f} h |",
        f"| wall time of this run | {wall:.0f} s |",
        f"| blocks this run resumed after | {resumed} |",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_8b.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "bench_8b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
