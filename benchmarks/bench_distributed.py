"""One rank with 2 threads against 2 ranks with 1 thread each, on the protocol, and a model of
how the time scales with ranks.

The protocol of docs/protocol.md (SmolLM2-135M-Instruct, 64 x 512 calibration tokens, GPTQ
4-bit g128 asymmetric act-order, no perplexity) is run as

    1x2  latticequant quantize ...                      (OMP_NUM_THREADS=2)
    2x1  torchrun --nproc-per-node 2 -m latticequant quantize ...   (OMP_NUM_THREADS=1)
    1x1  latticequant quantize ...                      (OMP_NUM_THREADS=1, with --runs)

Each run's wall time is split (on rank 0) into forwards (with the Hessian accumulation),
solves, and the exchanges: Hessian reduction, results, gathering block outputs for the run
state. The checkpoints are compared tensor by tensor. From the measured parts (forward seconds
per token and per block parameter, solve seconds per unit of ``d_in^3 / 3 + d_out d_in^2``,
bytes exchanged per block) the script projects the time per block of Llama-3-8B and 70B
shapes on 1 to 8 ranks. Results go to docs/bench_distributed.json and .md.

    python benchmarks/bench_distributed.py                 # 1x2 and 2x1 (about 8 minutes)
    python benchmarks/bench_distributed.py --runs 1x2,2x1,1x1
    python benchmarks/bench_distributed.py --project-only   # the model alone, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from latticequant.core.triangular import factor_tile  # noqa: E402
from latticequant.methods.registry import row_chunks  # noqa: E402
from latticequant.pipeline.distributed import assign_owners, solve_cost  # noqa: E402

DOCS = ROOT / "docs"
ARGS = [
    "--method", "gptq", "--bits", "4", "--group-size", "128", "--no-sym", "--order", "act",
    "--no-eval", "--json",
]  # fmt: skip
RUNS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}

# decoder-block shapes: hidden, intermediate, heads, kv heads, blocks
SHAPES = {
    "SmolLM2-135M": (576, 1536, 9, 3, 30),
    "Llama-3-8B": (4096, 14336, 32, 8, 32),
    "Llama-3-70B": (8192, 28672, 64, 8, 80),
}


def block_layers(hidden, inter, heads, kv, _blocks) -> list[list[tuple[int, int]]]:
    """(d_out, d_in) of a Llama block's linear layers, group by group."""
    kv_dim = hidden // heads * kv
    return [
        [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden)],
        [(hidden, hidden)],
        [(inter, hidden), (inter, hidden)],
        [(hidden, inter)],
    ]


def run(name: str, out: Path, nsamples: int, seqlen: int) -> dict:
    ranks, threads = RUNS[name]
    args = [*ARGS, "--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "latticequant", "quantize", *args, "--out", str(out)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}", "-m", "latticequant", "quantize", *args,
               "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    payload = json.loads(proc.stdout)
    layers = json.loads((out / "quant_log.json").read_text())["layers"]
    return {
        "ranks": ranks,
        "threads": threads,
        "process_wall_s": wall,
        "quantize_s": payload["quantize_s"],
        "load_s": payload["load_s"],
        "timings": payload["timings"],
        "layers": [
            {"shape": x["shape"], "time_s": x["layer_time_s"], "rank": x.get("rank", 0)}
            for x in layers
        ],
    }


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """How many tensors of two checkpoint folders are equal, of how many (none when the
    names differ)."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return 0, max(len(ta), len(tb))
    return sum(torch.equal(ta[k], tb[k]) for k in ta), len(ta)


def fit(result: dict, tokens: int) -> dict:
    """The parts of the time model, from one single-rank run."""
    hidden, inter, heads, kv, blocks = SHAPES["SmolLM2-135M"]
    params = sum(o * i for g in block_layers(hidden, inter, heads, kv, blocks) for o, i in g)
    t = result["timings"]
    work = sum(solve_cost(*x["shape"]) for x in result["layers"])
    return {
        "forward_s_per_token_param": (
            t["forward_s"] + t.get("hessian_s", 0.0) + t.get("state_io_s", 0.0)
        )  # the forward pass with what rides on it, as before the split
        / (tokens * params * blocks),
        "solve_s_per_unit": sum(x["time_s"] for x in result["layers"]) / work,
    }


def group_solves(groups, n: int, unit_s: float, split: str) -> float:
    """Modelled seconds of one block's solves on ``n`` ranks (the slowest rank of each group).

    ``split``: ``"layers"`` gives each layer whole to one rank (the balance of
    :func:`assign_owners`, each layer factoring its own H), as before row blocks;
    ``"rows-own-factor"`` shares every layer's fixed row blocks (:func:`row_chunks`,
    ``rows d_in^2`` each) out by the same balance, each rank factoring every H it solves on
    (``d_in^3 / 3``); ``"rows"`` is what the pipeline does: the same blocks, and each H's
    factorization shared out by panels (``d_in^3 / (3 n)`` per rank, plus the panels' own
    factorizations and solves, ``d_in^2 t / 2`` for panels of ``t`` columns, which one rank
    at a time makes while the others wait).
    """
    total, loads = 0.0, [0.0] * n
    for g in groups:
        if split == "layers":
            costs = {f"l{j}": solve_cost(o, i) for j, (o, i) in enumerate(g)}
            owners = assign_owners(costs, n, loads)
            per_rank = [sum(c for k, c in costs.items() if owners[k] == r) for r in range(n)]
            total += unit_s * max(per_rank)
            continue
        d_in = g[0][1]  # a group's layers read one input: one H
        costs = {
            f"l{j}#{a}": float((b - a) * i * i)
            for j, (o, i) in enumerate(g)
            for a, b in row_chunks(o)
        }
        owners = assign_owners(costs, n, loads)
        if split == "rows-own-factor" or n == 1:
            factor = d_in**3 / 3
        else:
            factor = d_in**3 / 3 / n + d_in**2 * factor_tile(d_in) / 2
        per_rank = []
        for r in range(n):
            rows = sum(c for k, c in costs.items() if owners[k] == r)
            per_rank.append(rows + (factor if rows or split == "rows" else 0.0))
        total += unit_s * max(per_rank)
    return total


def project(parts: dict, tokens: int, bandwidth: float) -> dict:
    """Seconds per block for each shape and number of ranks: forwards shared out, the solves
    of :func:`group_solves` for each way of sharing them, and the bytes exchanged at
    ``bandwidth`` bytes/s (float32 Hessian subtrees to every rank; whole layers' results,
    codes and dequantized weight, 4.5 bytes per weight, or row blocks' codes, one byte per
    weight, to every rank)."""
    table = {}
    unit = parts["solve_s_per_unit"]
    for model, shape in SHAPES.items():
        groups = block_layers(*shape)
        params = sum(o * i for g in groups for o, i in g)
        row = {}
        for n in (1, 2, 4, 8):
            forward = parts["forward_s_per_token_param"] * tokens * params / n
            hessian_bytes = sum(g[0][1] ** 2 * 4 for g in groups) * n
            # the factor's panels sent to every rank, and GPTQ's inverse gathered: float64
            factor_bytes = sum(g[0][1] ** 2 * 8 for g in groups)
            row[n] = {
                "forward_s": forward,
                "solve_s": group_solves(groups, n, unit, "rows"),
                "solve_layers_s": group_solves(groups, n, unit, "layers"),
                "solve_own_factor_s": group_solves(groups, n, unit, "rows-own-factor"),
                "comm_s": 0.0
                if n == 1
                else (hessian_bytes + factor_bytes + params * 1.0) / bandwidth,
                "comm_layers_s": 0.0 if n == 1 else (hessian_bytes + params * 4.5) / bandwidth,
            }
        table[model] = {"blocks": shape[4], "per_block": row}
    return table


def write_table(results: dict, path: Path) -> None:
    env = results["env"]
    runs = results["runs"]
    lines = [
        "# Scale-out: one model across ranks with torch.distributed",
        "",
        f"Protocol run (SmolLM2-135M-Instruct, {env['tokens']} tokens, GPTQ 4-bit g128 asymmetric, "
        f"act-order, no perplexity) on {env['machine']} with {env['cpus']} CPUs, torch "
        f"{env['torch']}, gloo. Generated by `python benchmarks/bench_distributed.py`. Seconds "
        "on rank 0; `exchanges` are the Hessian reduction, the results and the gathering of "
        "block outputs for the run state, waiting for the slower rank included.",
        "",
        "| ranks x threads | process wall s | quantize s | forwards s | Hessians s | solves s "
        "| state writes s | Hessian reduce s | results s | state gather s | vs 1x2 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = runs.get("1x2", {}).get("quantize_s")
    for name, r in runs.items():
        t = r["timings"]
        ratio = f"{r['quantize_s'] / base:.2f}" if base else "–"
        lines.append(
            f"| {name} | {r['process_wall_s']:.0f} | {r['quantize_s']:.1f} | "
            f"{t['forward_s']:.1f} | {t.get('hessian_s', 0):.1f} | {t['solve_s']:.1f} | "
            f"{t.get('state_io_s', 0):.1f} | {t.get('reduce_s', 0):.1f} | "
            f"{t.get('results_s', 0):.1f} | {t.get('gather_s', 0):.1f} | {ratio} |"
        )
    lines += ["", "Checkpoints compared tensor by tensor:", ""]
    for pair, (same, total) in results["identical"].items():
        lines.append(f"- {pair}: {same} of {total} tensors identical")
    parts = results["model"]["parts"]
    lines += [
        "",
        "## Time model",
        "",
        f"Fitted on the 1x1 (or 1x2) run: forwards "
        f"{parts['forward_s_per_token_param'] * 1e12:.3f} s per 10^12 token-parameters, solves "
        f"{parts['solve_s_per_unit'] * 1e12:.3f} s per 10^12 units of "
        "`d_in^3/3 + d_out d_in^2`. Per block and rank count, the same tokens, exchanges at "
        f"{results['model']['bandwidth'] / 1e9:.1f} GB/s:",
        "",
        "Solves per block three ways: whole layers to one rank each (before row blocks), "
        "every layer's row blocks shared out with each rank factoring the H it solves on, "
        "and row blocks with each factorization shared out by panels (what the pipeline "
        "does). All modelled, none measured at these shapes.",
        "",
        "| model | ranks | forwards s/block | solves s/block: whole layers | row blocks, "
        "factor repeated | row blocks, factor shared | vs 1 rank | exchanges s/block "
        "| whole model h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, m in results["model"]["projection"].items():
        per_block = m["per_block"]
        one = (per_block[1] if 1 in per_block else per_block["1"])["solve_s"]
        for n, row in per_block.items():
            total = (row["forward_s"] + row["solve_s"] + row["comm_s"]) * m["blocks"] / 3600
            lines.append(
                f"| {model} | {n} | {row['forward_s']:.1f} | {row['solve_layers_s']:.1f} | "
                f"{row['solve_own_factor_s']:.1f} | {row['solve_s']:.1f} | "
                f"{row['solve_s'] / one:.2f} | {row['comm_s']:.2f} | {total:.2f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="1x2,2x1", help="comma-separated of 1x2, 2x1, 1x1")
    p.add_argument("--bandwidth", type=float, default=1e9, help="bytes/s for the projection")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument(
        "--project-only",
        action="store_true",
        help="run nothing: redo the projection from the fitted rates in OUT/bench_distributed.json",
    )
    args = p.parse_args(argv)
    if args.project_only:
        results = json.loads((args.out / "bench_distributed.json").read_text())
        n, seqlen = (int(x) for x in results["env"]["tokens"].split(" x "))
        results["model"]["projection"] = project(
            results["model"]["parts"], n * seqlen, results["model"]["bandwidth"]
        )
        (args.out / "bench_distributed.json").write_text(json.dumps(results, indent=1) + "\n")
        write_table(results, args.out / "bench_distributed.md")
        print((args.out / "bench_distributed.md").read_text())
        return 0
    names = [n.strip() for n in args.runs.split(",")]
    bad = [n for n in names if n not in RUNS]
    if bad:
        raise SystemExit(f"unknown run {bad[0]!r}; use {', '.join(RUNS)}")
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    results = {
        "env": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "tokens": f"{args.nsamples} x {args.seqlen}",
        },
        "runs": {},
        "identical": {},
    }
    try:
        for name in names:
            print(f"{name} ...", flush=True)
            results["runs"][name] = run(name, tmp / name, args.nsamples, args.seqlen)
            print(f"{name}: quantize {results['runs'][name]['quantize_s']:.1f} s", flush=True)
        for a, b in zip(names, names[1:]):
            results["identical"][f"{a} vs {b}"] = same_tensors(tmp / a, tmp / b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    single = results["runs"].get("1x1") or results["runs"].get("1x2")
    tokens = args.nsamples * args.seqlen
    parts = fit(single, tokens)
    results["model"] = {
        "parts": parts,
        "bandwidth": args.bandwidth,
        "projection": project(parts, tokens, args.bandwidth),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_distributed.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, args.out / "bench_distributed.md")
    print((args.out / "bench_distributed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
