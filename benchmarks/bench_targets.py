"""Which problem each layer solves: the float-outputs objective and the Hadamard rotation.

The protocol of docs/protocol.md (SmolLM2-135M-Instruct in float32, 64 calibration windows of
512 tokens, seed 0, asymmetric grids, act-order) and the second text of
``benchmarks/bench_decoders.py`` (licence texts from ``/usr/share/common-licenses``). For each
grid (3-bit g128, 2-bit g64, 4-bit g128) four GPTQ runs: as today, ``objective=float-outputs``,
``rotate=hadamard`` and both; and HPTQ at 3.125 and 2.125 effective bits, as today and with
both; and GPTQ with both and ``refine=cd,scales`` (2 sweeps, 2 rounds, as in
``bench_decoders.py``): the targets compose with the decoders. Every run starts from the float
weights.

Figures per run: perplexity on the held-out 20% of the protocol text and on the second text,
the fraction of codes clipped to the grid, the effective bits, and the whole run's wall time
relative to the GPTQ run of the same grid in the same invocation (HPTQ rows: relative to the
3-bit g128 GPTQ run).

    python benchmarks/bench_targets.py                     # all 19 runs (hours on a CPU)
    python benchmarks/bench_targets.py --runs '3g128-*'
    python benchmarks/bench_targets.py --smoke             # first block only, under runs/
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoders import second_text  # noqa: E402
from bench_methods import load_results, save_json, select  # noqa: E402

log = logging.getLogger("bench_targets")

DOCS = ROOT / "docs"
GRIDS = {
    "3g128": {"bits": 3, "group_size": 128},
    "2g64": {"bits": 2, "group_size": 64},
    "4g128": {"bits": 4, "group_size": 128},
}
TARGETS = {
    "layer": {},
    "objective": {"objective": "float-outputs"},
    "rotate": {"rotate": "hadamard"},
    "both": {"objective": "float-outputs", "rotate": "hadamard"},
}


@dataclass(frozen=True)
class Run:
    name: str
    grid: str  # the GPTQ grid whose time it is read against
    method: str
    config: dict
    target: dict


def all_runs() -> list[Run]:
    runs = []
    for grid, cfg in GRIDS.items():
        base = {**cfg, "sym": False, "order": "act"}
        for label, target in TARGETS.items():
            name = f"{grid}-gptq" + ("" if label == "layer" else f"-{label}")
            runs.append(Run(name, grid, "gptq", base, target))
        refined = {**base, "refine": "cd,scales", "refine_sweeps": 2, "refine_rounds": 2}
        runs.append(Run(f"{grid}-gptq-both-refine", grid, "gptq", refined, TARGETS["both"]))
    for bits in (3.125, 2.125):
        for label in ("layer", "both"):
            name = f"hptq-{bits}" + ("" if label == "layer" else f"-{label}")
            runs.append(Run(name, "3g128", "hptq", {"target_bits": bits}, TARGETS[label]))
    return runs


def quantize_run(run: Run, model, float_state, tokenizer, windows, args) -> tuple[list, float]:
    from latticequant.methods import get_method
    from latticequant.pipeline import Override, quantize_model
    from latticequant.pipeline.target import TargetConfig

    model.load_state_dict(float_state)
    method = get_method(run.method)
    overrides = [Override(r"layers\.([1-9]|[1-9][0-9])\.", skip=True)] if args.smoke else []
    t0 = time.perf_counter()
    stats = quantize_model(
        model,
        tokenizer,
        windows,
        method,
        method.config_cls(**run.config),
        overrides=overrides,
        progress=not args.quiet,
        target=TargetConfig(**run.target, seed=0),
    )
    return stats, time.perf_counter() - t0


def run_one(run: Run, model, float_state, tokenizer, windows, texts, args) -> dict:
    from latticequant.pipeline import data

    stats, wall = quantize_run(run, model, float_state, tokenizer, windows, args)
    ppl = {
        name: data.perplexity(model, ids, seqlen=args.seqlen, progress=False)
        for name, ids in texts.items()
    }
    weights = sum(math.prod(s["shape"]) for s in stats)
    return {
        "name": run.name,
        "grid": run.grid,
        "method": run.method,
        "config": run.config,
        "target": run.target,
        "bits_per_weight": sum(s["bits_per_weight"] * math.prod(s["shape"]) for s in stats)
        / weights,
        "clipped_frac": sum(int(s.get("clipped", 0)) for s in stats) / weights,
        "loss": sum(s["loss"] for s in stats),
        "ppl_heldout": ppl["heldout"],
        "ppl_second": ppl["second"],
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _ref_wall(results: dict, grid: str, invocation: str | None) -> float | None:
    base = results["runs"].get(f"{grid}-gptq")
    if base and base.get("invocation") == invocation:
        return base["wall_s"]
    ref = results.get("references", {}).get(f"{invocation}/{grid}")
    return ref["wall_s"] if ref else None


def write_table(results: dict, path: Path) -> None:
    env = results.get("env", {})
    fl = results.get("float_ppl", {})
    lines = [
        "# Targets and rotations: the float-outputs objective and the Hadamard rotation",
        "",
        f"Protocol: {env.get('protocol', '')}. Machine: {env.get('machine', '')}, torch "
        f"{env.get('torch', '')}; threads per run in the table. Generated by "
        "`python benchmarks/bench_targets.py` (see its docstring). Float32 perplexity: held-out "
        f"{fl.get('heldout', float('nan')):.3f}, second text {fl.get('second', float('nan')):.3f}. "
        "Time relative to the GPTQ run of the same grid in the same invocation (`run`; HPTQ rows "
        "against 3-bit g128 GPTQ). Clipped: codes clamped to the grid, over all weights.",
        "",
        "| run | method | refine | objective | rotation | bits/weight | clipped | ppl held-out "
        "| ppl second text | wall s | x GPTQ time | threads | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {r.name: i for i, r in enumerate(all_runs())}
    for r in sorted(results["runs"].values(), key=lambda r: order.get(r["name"], 99)):
        base = _ref_wall(results, r["grid"], r.get("invocation"))
        ratio = f"{r['wall_s'] / base:.2f}" if base else "–"
        lines.append(
            f"| {r['name']} | {r['method']} | {r['config'].get('refine') or '–'} "
            f"| {r['target'].get('objective', 'layer')} "
            f"| {r['target'].get('rotate', 'none')} | {r['bits_per_weight']:.3f} "
            f"| {r['clipped_frac']:.4f} | {r['ppl_heldout']:.3f} | {r['ppl_second']:.3f} "
            f"| {r['wall_s']:.0f} | {ratio} | {r.get('threads', '?')} | {r.get('invocation', '')} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", help="comma-separated run names or patterns (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--redo", action="store_true", help="rerun runs that already have results")
    p.add_argument("--smoke", action="store_true", help="first block only, 8 windows of 128")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    runs = select(all_runs(), args.runs)
    if args.runs:  # in the order asked for
        wanted = [n.strip() for n in args.runs.split(",")]
        runs.sort(key=lambda r: wanted.index(r.name) if r.name in wanted else len(wanted))
    if args.list:
        for r in runs:
            print(f"{r.name:22s} {r.method:6s} {r.config} {r.target}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = "bench_targets"
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 8), min(args.seqlen, 128)
        if args.out == DOCS:
            args.out = ROOT / "runs" / "bench_targets_smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stem}.json"
    if args.table:
        write_table(load_results(json_path), args.out / f"{stem}.md")
        return 0

    from latticequant.pipeline import data
    from latticequant.pipeline.models import load_model

    model, tokenizer = load_model(None)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib, heldout = data.split_ids(data.tokenize(tokenizer, data.load_text(None)))
    windows = data.calibration_windows(calib, args.nsamples, args.seqlen, 0)
    texts = {"heldout": heldout, "second": data.tokenize(tokenizer, second_text())}
    if args.smoke:
        texts = {k: v[: 8 * args.seqlen] for k, v in texts.items()}
    invocation = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    results = load_results(json_path)
    results["env"] = {
        "protocol": f"SmolLM2-135M-Instruct, {args.nsamples} x {args.seqlen} calibration "
        f"tokens, {len(texts['heldout'])} held-out and {len(texts['second'])} second-text tokens"
        + (" (smoke: first block only)" if args.smoke else ""),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    if "float_ppl" not in results:
        results["float_ppl"] = {
            k: data.perplexity(model, ids, seqlen=args.seqlen, progress=False)
            for k, ids in texts.items()
        }
    todo = [r for r in runs if args.redo or r.name not in results["runs"]]
    for grid in dict.fromkeys(r.grid for r in todo):
        if any(r.name == f"{grid}-gptq" for r in todo):
            continue
        log.info("%s: GPTQ reference run for the time ratio", grid)  # ratios within one run
        ref = next(r for r in all_runs() if r.name == f"{grid}-gptq")
        _, wall = quantize_run(ref, model, float_state, tokenizer, windows, args)
        results.setdefault("references", {})[f"{invocation}/{grid}"] = {"wall_s": wall}
        save_json(results, json_path)
    for run in todo:
        log.info("%s: %s %s %s", run.name, run.method, run.config, run.target)
        res = run_one(run, model, float_state, tokenizer, windows, texts, args)
        res["invocation"] = invocation
        results["runs"][run.name] = res
        log.info(
            "%s: perplexity %.3f / %.3f, clipped %.4f, %.0f s",
            run.name,
            res["ppl_heldout"],
            res["ppl_second"],
            res["clipped_frac"],
            res["wall_s"],
        )
        save_json(results, json_path)
        write_table(results, args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
