"""The quantized model run compressed: resident weight bytes, perplexity and CPU speed.

For SmolLM2-135M-Instruct as float32, bfloat16, GPTQ 4-bit g128 (asymmetric, act-order), SSQR
3-bit g128 with 1% outliers and HPTQ at 3.125 bits (checkpoints made with ``latticequant
quantize`` on the protocol's 64 x 512 calibration tokens, kept in ``--work``):

- resident bytes of the decoder blocks' weights as loaded for ``eval``/``generate`` (every
  parameter and buffer, plus any dense cache), against the bytes the checkpoint stores for those
  blocks, which is effective bits x weights / 8 for the quantized layers (the norms ride along);
- held-out perplexity through ``latticequant eval`` on the compressed path (the default) and with
  ``--dense-cache``, which must agree;
- decode speed at batch 1 (``generate``, greedy, KV cache) and prefill speed of one 512-token
  forward, each relative to float32 in the same invocation; medians over ``--repeats``.

    python benchmarks/bench_runtime.py                 # about 40 minutes on 2 CPUs
    python benchmarks/bench_runtime.py --threads 1 --new-tokens 8 --repeats 3
    python benchmarks/bench_runtime.py --table         # rewrite the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
PROMPT = "Write a Python function that returns the n-th Fibonacci number."
QUANTIZED = {
    "gptq-4g128": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--no-sym"],
    "ssqr-3g128-1%": ["--method", "ssqr", "--bits", "3", "--group-size", "128"],
    "hptq-3.125": ["--method", "hptq", "--target-bits", "3.125"],
}
CONFIGS = ("float32", "bfloat16", *QUANTIZED)


def _cli(*args: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "latticequant", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout)


def checkpoint(work: Path, name: str, threads: int) -> Path:
    """The checkpoint of ``name``, quantized once into ``work``."""
    out = work / name
    if not (out / "config.json").is_file():
        _cli("quantize", *QUANTIZED[name], "--order", "act", "--out", str(out), threads=threads)
    return out


def stored_block_bytes(folder: Path) -> int:
    """Bytes the checkpoint stores for the decoder blocks."""
    from safetensors import safe_open

    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if ".layers." in key:
                    t = st.get_slice(key)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    total += n * _itemsize(t.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    return sizes.get(dtype, 1)


def resident_block_bytes(model) -> int:
    """Bytes of every tensor the decoder blocks hold, each once, plus dense caches."""
    seen, total = set(), 0
    for block in model.model.layers:
        for t in list(block.parameters()) + list(block.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        total += sum(int(getattr(m, "cache_bytes", 0) or 0) for m in block.modules())
    return total


def speed(model, tokenizer, new_tokens: int, repeats: int) -> dict:
    """Median decode tokens/s at batch 1 and prefill tokens/s of one 512-token forward."""
    from latticequant.pipeline.data import load_text, tokenize
    from latticequant.pipeline.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new_tokens, chat=True)
    ids = tokenize(tokenizer, load_text(None))[:512].view(1, -1)
    decode, prefill, tokens = [], [], None
    with torch.inference_mode():
        model(ids[:, :16])  # warm-up: first-call allocations, lazily built tables
        for _ in range(repeats):
            r = generate(model, tokenizer, PROMPT, cfg)
            decode.append(r.decode_tokens_per_s)
            tokens = r.token_ids
            t0 = time.perf_counter()
            model(ids)
            prefill.append(512 / (time.perf_counter() - t0))
    return {
        "decode_tokens_per_s": statistics.median(decode),
        "prefill_tokens_per_s": statistics.median(prefill),
        "greedy_tokens": tokens,
    }


def measure(name: str, work: Path, args) -> dict:
    from latticequant.pipeline.models import load_model

    threads = args.threads
    if name in ("float32", "bfloat16"):
        source, dtype = None, name
        eval_args = ["eval", "--dtype", name]
        stored = None
    else:
        source, dtype = str(checkpoint(work, name, threads)), "float32"
        eval_args = ["eval", source]
        stored = stored_block_bytes(Path(source))
    row = {"config": name}
    row["ppl"] = _cli(*eval_args, threads=threads)["perplexity"]
    if stored is not None:
        dense = _cli(*eval_args, "--dense-cache", threads=threads)
        row["ppl_dense"] = dense["perplexity"]
    model, tokenizer = load_model(source, cache_weight=False, dtype=dtype)
    model.eval()
    row.update(speed(model, tokenizer, args.new_tokens, args.repeats))
    row["kernels"] = sorted({k for m in model.modules() if (k := getattr(m, "last_kernel", None))})
    row["resident_bytes"] = resident_block_bytes(model)
    n_weights = sum(
        m.in_features * m.out_features
        for m in model.model.layers.modules()
        if hasattr(m, "in_features") and hasattr(m, "out_features")
    )
    row["linear_weights"] = n_weights
    if stored is None:
        row["stored_bytes"] = sum(
            t.numel() * t.element_size() for t in model.model.layers.parameters()
        )
    else:
        row["stored_bytes"] = stored
        dense_model, _ = load_model(source, cache_weight=True, dtype=dtype)
        with torch.inference_mode():
            dense_model(torch.tensor([[1, 2, 3]]))
        row["resident_bytes_dense_cache"] = resident_block_bytes(dense_model)
        del dense_model
    del model
    return row


def table(results: dict) -> str:
    rows = results["runs"]
    base = rows.get("float32")
    lines = [
        "# Running the quantized model compressed",
        "",
        f"SmolLM2-135M-Instruct on the CPU ({results['machine']}, {results['cpus']} CPUs, "
        f"{results['threads']} thread(s), torch {results['torch']}). Checkpoints from "
        "`latticequant quantize` on the protocol (64 x 512 calibration tokens, act-order). "
        "Generated by `python benchmarks/bench_runtime.py` "
        f"(`--threads {results['threads']} --new-tokens {results['new_tokens']} --repeats "
        f"{results['repeats']}`), all rows in one invocation.",
        "",
        "- *stored*: bytes the checkpoint holds for the 30 decoder blocks (for a quantized layer "
        "that is its effective bits x weights / 8; the float norms ride along); *resident*: the "
        "bytes of every tensor those blocks hold once loaded for `eval`/`generate` (the default "
        "compressed path), and with `--dense-cache`.",
        "- *bits/weight resident*: resident bytes x 8 / the blocks' linear weights.",
        "- perplexity: `latticequant eval` on the held-out text, compressed path and "
        "`--dense-cache`.",
        "- speed: decode at batch 1 (greedy `generate`, KV cache, tokens/s) and one 512-token "
        "prefill forward (tokens/s), medians, relative to float32 in the same run.",
        "",
        "| model | kernel | stored MiB | resident MiB | resident / stored | bits/weight "
        "resident | resident with dense cache MiB | ppl compressed | ppl dense | decode tok/s "
        "| x float32 | prefill tok/s | x float32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for name in CONFIGS:
        r = rows.get(name)
        if r is None:
            continue
        dense_mem = r.get("resident_bytes_dense_cache")
        dense_mib = "–" if dense_mem is None else f"{dense_mem / mib:.1f}"
        ppl_dense = "–" if "ppl_dense" not in r else f"{r['ppl_dense']:.4f}"
        dec = r["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else float("nan")
        pre = r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"] if base else float("nan")
        lines.append(
            f"| {name} | {', '.join(r['kernels']) or 'torch (float)'} | "
            f"{r['stored_bytes'] / mib:.1f} | {r['resident_bytes'] / mib:.1f} | "
            f"{r['resident_bytes'] / r['stored_bytes']:.3f} | "
            f"{8 * r['resident_bytes'] / r['linear_weights']:.3f} | "
            f"{dense_mib} | {r['ppl']:.4f} | {ppl_dense} | "
            f"{r['decode_tokens_per_s']:.2f} | {dec:.3f} | {r['prefill_tokens_per_s']:.1f} | "
            f"{pre:.3f} |"
        )
    rel = {
        n: abs(rows[n]["ppl"] / rows[n]["ppl_dense"] - 1)
        for n in QUANTIZED
        if n in rows and "ppl_dense" in rows[n]
    }
    if rel:
        worst = max(rel.values())
        lines += [
            "",
            "Compressed against dense perplexity: at most "
            f"{worst:.1e} relative ({', '.join(f'{n} {v:.1e}' for n, v in rel.items())}); the "
            "compressed paths add the tiles' products in another order, so they agree to float "
            "rounding.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--work", type=Path, default=Path("/tmp/latticequant-bench-runtime"))
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = p.parse_args(argv)
    json_path, md_path = args.out / "bench_runtime.json", args.out / "bench_runtime.md"
    if args.table:
        md_path.write_text(table(json.loads(json_path.read_text())))
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.threads < 1 or args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("--threads and --repeats must be at least 1, --new-tokens at least 2")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "runs": {},
    }
    for name in names:
        print(f"{name} ...", flush=True)
        results["runs"][name] = measure(name, args.work, args)
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(table(results))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
