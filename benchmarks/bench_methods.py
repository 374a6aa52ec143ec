"""Perplexity against effective bits: RTN, GPTQ, SSQR, HPTQ and HRTN on the protocol.

The protocol of docs/protocol.md: SmolLM2-135M-Instruct in float32, 64 calibration windows of 512
tokens drawn with seed 0 from the first 80% of the ``pydoc_data`` text, perplexity on the held-out
20%. Every run starts from the float weights and quantizes every linear layer of the decoder
blocks with ``latticequant.quantize_model``; perplexity is taken on the in-memory model
(its weights are the dequantized ``Q`` of each layer, which the checkpoint reproduces exactly).

Effective bits are what the layers store, counted by each method (``bits_per_weight`` of every
layer, ``latticequant.formats.bits``), averaged over all quantized weights: codes, 16-bit scales,
packed zero points, ``g_idx``, outlier values + column indices + row pointers, Huffman streams,
tables and scales. Embeddings and norms stay in float and are not counted.

Runs (``--runs`` picks a subset by name, comma-separated, with ``*`` wildcards):
  rtn-b{2,3,4}            round to nearest, symmetric, groups of 128
  gptq-act-b{2,3,4}       GPTQ, act-order, symmetric, groups of 128
  gptq-minpivot-b{2,3,4}  GPTQ, min-pivot order
  gptq-act-asym-b{2,3,4}  GPTQ, act-order, asymmetric grid (a zero point per group)
  ssqr-b{2,3,4}-o{1,2,5}  SSQR, b-bit groups of 128 + 1/2/5% float16 outliers
  hptq-t{2.125,3.125,4.125}, hrtn-t{...}   Huffman-coded, one scale per matrix

Results accumulate in ``docs/bench_methods.json`` (a finished run is not redone unless
``--redo``); the markdown table ``docs/bench_methods.md`` and the plot ``docs/bench_methods.png``
are rebuilt from it after every run.

    python benchmarks/bench_methods.py                      # everything (hours on a CPU)
    python benchmarks/bench_methods.py --runs 'hptq-*,hrtn-*,gptq-act-b3'
    python benchmarks/bench_methods.py --smoke              # first block only, tiny data,
                                                            # written under runs/
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_methods")

DOCS = ROOT / "docs"
PLOT_TOP = 300.0  # perplexities above are drawn at the plot's top edge


@dataclass(frozen=True)
class Run:
    name: str
    family: str  # one line in the plot
    method: str
    config: dict


def all_runs() -> list[Run]:
    runs = []
    for b in (2, 3, 4):
        grid = {"bits": b, "group_size": 128, "sym": True}
        runs.append(Run(f"rtn-b{b}", "RTN", "rtn", grid))
        runs.append(Run(f"gptq-act-b{b}", "GPTQ act-order", "gptq", {**grid, "order": "act"}))
        runs.append(
            Run(f"gptq-minpivot-b{b}", "GPTQ min-pivot", "gptq", {**grid, "order": "min-pivot"})
        )
        asym = {**grid, "sym": False, "order": "act"}
        runs.append(Run(f"gptq-act-asym-b{b}", "GPTQ act-order, asymmetric", "gptq", asym))
    for rate in (1, 2, 5):
        for b in (2, 3, 4):
            cfg = {"bits": b, "group_size": 128, "outlier_rate": rate / 100, "order": "act"}
            runs.append(Run(f"ssqr-b{b}-o{rate}", f"SSQR {rate}% outliers", "ssqr", cfg))
    for target in (2.125, 3.125, 4.125):
        runs.append(Run(f"hptq-t{target}", "HPTQ", "hptq", {"target_bits": target}))
        runs.append(Run(f"hrtn-t{target}", "HRTN", "hrtn", {"target_bits": target}))
    return runs


def select(runs: list[Run], patterns: str | None) -> list[Run]:
    if not patterns:
        return runs
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [r for r in runs if any(fnmatch.fnmatch(r.name, p) for p in pats)]
    if not chosen:
        raise SystemExit(f"no run matches {patterns!r}; runs: {', '.join(r.name for r in runs)}")
    return chosen


def load_results(path: Path) -> dict:
    if path.is_file():
        with open(path) as fh:
            return json.load(fh)
    return {"runs": {}}


def save_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def model_bits(stats: list[dict]) -> tuple[float, dict]:
    """Effective bits over all quantized weights, and a few model-level totals."""
    weights = sum(math.prod(s["shape"]) for s in stats)
    total = sum(s["bits_per_weight"] * math.prod(s["shape"]) for s in stats)
    loss = sum(s["loss"] for s in stats)
    rtn = sum(s.get("rtn_loss", float("nan")) for s in stats)
    extra = {
        "n_layers": len(stats),
        "n_weights": weights,
        "proxy_loss": loss,
        "proxy_loss_vs_rtn": loss / rtn if rtn and rtn == rtn else None,
        "clipped": sum(int(s.get("clipped", 0)) for s in stats),
        "outliers": sum(int(s.get("outliers", 0)) for s in stats),
        "loss_over_bound_max": max(s["loss"] / s["bound"] for s in stats if s.get("bound")),
        "quantize_s": sum(s.get("layer_time_s", s.get("time_s", 0.0)) for s in stats),
        "search_decodes_mean": (
            sum(s.get("search_decodes", 1) for s in stats) / len(stats) if stats else None
        ),
    }
    return total / weights, extra


def build_config(run: Run):
    from latticequant.methods import get_method

    method = get_method(run.method)
    return method, method.config_cls(**run.config)


def run_one(run: Run, model, float_state, tokenizer, windows, heldout, args) -> dict:
    import latticequant as lq
    from latticequant.pipeline import Override, data

    model.load_state_dict(float_state)  # every run starts from the float weights
    method, config = build_config(run)
    overrides = []
    if args.smoke:
        overrides.append(Override(r"layers\.([1-9]|[1-9][0-9])\.", skip=True))
    t0 = time.perf_counter()
    spec = lq.RunSpec(
        method=method.name,
        config=config,
        overrides=tuple(overrides),
        calibration=lq.CalibrationSpec(nsamples=windows.shape[0], seqlen=windows.shape[1]),
        execution=lq.ExecutionSpec(device=args.device, progress=not args.quiet),
    )
    stats = lq.quantize_model(
        model, lq.Calibration(windows, tokenizer=tokenizer), lq.prepare(model, spec)
    )
    wall = time.perf_counter() - t0
    model.to(args.device)
    ppl = data.perplexity(model, heldout, seqlen=args.seqlen, device=args.device, progress=False)
    model.to("cpu")
    bits, extra = model_bits(stats)
    return {
        "name": run.name,
        "family": run.family,
        "method": run.method,
        "config": run.config,
        "bits_per_weight": bits,
        "ppl": ppl,
        "wall_s": wall,
        **extra,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_table(results: dict, path: Path) -> None:
    runs = sorted(results["runs"].values(), key=lambda r: (r["family"], r["bits_per_weight"]))
    env = results.get("env", {})
    lines = [
        "# Perplexity against effective bits",
        "",
        "Generated by `benchmarks/bench_methods.py` on the protocol of `docs/protocol.md` "
        f"({env.get('protocol', 'SmolLM2-135M-Instruct, pydoc_data text')}). Effective bits count "
        "everything each quantized layer stores (codes, scales, zeros, g_idx, outliers, Huffman "
        "streams and tables), averaged over the weights of all quantized linear layers.",
        "",
        f"Float32 perplexity: {results.get('float_ppl', float('nan')):.3f}. "
        f"Environment: {env.get('machine', '?')}, torch {env.get('torch', '?')}, "
        f"device {env.get('device', '?')}.",
        "",
        "| run | method | effective bits | perplexity | proxy loss / RTN | max loss / bound "
        "| clipped | outliers | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = r.get("proxy_loss_vs_rtn")
        lines.append(
            f"| {r['name']} | {r['family']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {r['loss_over_bound_max']:.3f} | "
            f"{r['clipped']} | {r['outliers']} | {r['wall_s']:.0f} |"
        )
    lines += ["", *paper_comparison(results["runs"])]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def paper_comparison(runs: dict) -> list[str]:
    """The paper's claim at 3.125 bits (HPTQ < HRTN < GPTQ), checked on these runs."""
    want = {"HPTQ": "hptq-t3.125", "HRTN": "hrtn-t3.125"}
    have = {k: runs.get(v) for k, v in want.items()}
    if any(v is None for v in have.values()):
        return ["The 3.125-bit comparison needs runs hptq-t3.125 and hrtn-t3.125."]
    h, r = have["HPTQ"]["ppl"], have["HRTN"]["ppl"]
    lines = [
        "## The paper's ordering at about 3.125 bits",
        "",
        f"HPTQ {h:.3f} ({have['HPTQ']['bits_per_weight']:.3f} bits), "
        f"HRTN {r:.3f} ({have['HRTN']['bits_per_weight']:.3f} bits): HPTQ is "
        f"{100 * (r - h) / r:+.1f}% against HRTN (positive = lower perplexity).",
    ]
    for name, label in (
        ("gptq-act-b3", "GPTQ act-order 3-bit g128, symmetric"),
        ("gptq-act-asym-b3", "GPTQ act-order 3-bit g128, asymmetric"),
    ):
        g = runs.get(name)
        if g is None:
            continue
        holds = h < r < g["ppl"]
        lines += [
            "",
            f"Against {label}: {g['ppl']:.3f} ({g['bits_per_weight']:.3f} bits). "
            f"HPTQ < HRTN < GPTQ {'holds' if holds else 'does not hold'}; HPTQ is "
            f"{100 * (g['ppl'] - h) / g['ppl']:+.1f}% and HRTN "
            f"{100 * (g['ppl'] - r) / g['ppl']:+.1f}% against it.",
        ]
    return lines


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 5))
    families: dict[str, list] = {}
    for r in results["runs"].values():
        families.setdefault(r["family"], []).append(r)
    # 2-bit grids reach perplexities in the thousands; they are drawn at the top edge (^).
    top = PLOT_TOP
    for family, rs in sorted(families.items()):
        rs.sort(key=lambda r: r["bits_per_weight"])
        x = [r["bits_per_weight"] for r in rs]
        y = [min(r["ppl"], top) for r in rs]
        (line,) = ax.plot(x, y, marker="o", label=family)
        off = [(xi, top) for xi, r in zip(x, rs) if r["ppl"] > top]
        if off:
            ax.plot(*zip(*off), linestyle="none", marker="^", markersize=9, color=line.get_color())
    lowest = min([r["ppl"] for r in results["runs"].values()] + [results.get("float_ppl", top)])
    ax.set_ylim(lowest * 0.9, top * 1.1)
    if "float_ppl" in results:
        ax.axhline(results["float_ppl"], color="gray", linestyle="--", label="float32")
    ax.set_xlabel("effective bits per weight (everything stored)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M-Instruct: perplexity against effective bits (^: above {top:g})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", help="comma-separated run names or patterns (default: all)")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--redo", action="store_true", help="rerun runs that already have results")
    p.add_argument("--smoke", action="store_true", help="first block only, 8 windows of 128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for the json, md and png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    runs = select(all_runs(), args.runs)
    if args.list:
        for r in runs:
            print(f"{r.name:22s} {r.method:5s} {r.config}")
        return 0
    for r in runs:
        build_config(r)  # fail on a bad config before loading anything
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 8), min(args.seqlen, 128)
    stem = "bench_methods_smoke" if args.smoke else "bench_methods"
    if args.smoke and args.out == DOCS:
        args.out = ROOT / "runs" / "bench_methods_smoke"  # keep smoke figures out of docs/
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{stem}.json"

    from latticequant.pipeline import data
    from latticequant.pipeline.models import load_model

    model, tokenizer = load_model(None)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = data.tokenize(tokenizer, data.load_text(None))
    calib, heldout = data.split_ids(ids)
    windows = data.calibration_windows(calib, args.nsamples, args.seqlen, args.seed)
    if args.smoke:
        heldout = heldout[: 8 * args.seqlen]

    results = load_results(json_path)
    results["env"] = {
        "protocol": f"SmolLM2-135M-Instruct, {args.nsamples} x {args.seqlen} calibration tokens, "
        f"{len(heldout)} held-out tokens" + (" (smoke: first block only)" if args.smoke else ""),
        "machine": platform.machine() + " " + platform.processor(),
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    if "float_ppl" not in results:
        model.to(args.device)
        results["float_ppl"] = data.perplexity(
            model, heldout, seqlen=args.seqlen, device=args.device, progress=False
        )
        model.to("cpu")
        log.info("float32 perplexity %.3f", results["float_ppl"])
    for run in runs:
        if run.name in results["runs"] and not args.redo:
            log.info("%s: done before, skipped (use --redo)", run.name)
            continue
        log.info("%s: %s %s", run.name, run.method, run.config)
        try:
            res = run_one(run, model, float_state, tokenizer, windows, heldout, args)
        except ValueError as exc:  # an unreachable target, for example: record and go on
            log.error("%s failed: %s", run.name, exc)
            continue
        results["runs"][run.name] = res
        log.info("%s: %.3f bits, perplexity %.3f", run.name, res["bits_per_weight"], res["ppl"])
        save_json(results, json_path)
        write_table(results, args.out / f"{stem}.md")
        write_plot(results, args.out / f"{stem}.png")
    save_json(results, json_path)
    if results["runs"]:
        write_table(results, args.out / f"{stem}.md")
        write_plot(results, args.out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
