"""Core speed on one layer: our GPTQ, Babai and RTN beside GPTQModel's GPTQ, same W and H.

A ``size x size`` float32 layer (4096 by default), a Hessian from correlated activations
(``X = (Z @ A) * s``: Gaussian tokens mixed by a random matrix, channels given log-normal
scales so that act-order has something to sort), 4-bit, groups of 128, act-order, block 128.
Every method runs ``--runs`` times, interleaved round-robin so that load from other processes
hits them alike; the table gives medians and ratios, and the proxy loss
``tr((W - Q) H (W - Q)^T)`` of each result relative to round-to-nearest as a sanity check that
the methods solved the same problem.

    .venv-bench/bin/python benchmarks/bench_layer.py              # the issue's figure
    .venv-bench/bin/python benchmarks/bench_layer.py --size 512   # smoke test, seconds
    python benchmarks/bench_layer.py --no-gptqmodel               # ours only, no bench env
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository's latticequant, installed or not
sys.path.insert(0, str(HERE))

import latticequant as lq  # noqa: E402

log = logging.getLogger("bench_layer")

METHODS = ("gptq", "babai", "rtn", "gptqmodel")


def make_problem(
    d_out: int, d_in: int, n_tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian ``X^T X / n`` of correlated activations, both float32."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    A = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    s = torch.exp(0.5 * torch.randn(d_in, generator=g))
    H = torch.zeros(d_in, d_in)
    chunk = 1024
    for start in range(0, n_tokens, chunk):  # bounded memory for large token counts
        Z = torch.randn(min(chunk, n_tokens - start), d_in, generator=g)
        X = (Z @ A) * s
        H.addmm_(X.T, X)
    H /= n_tokens
    return W, H


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64 accumulation of float32 products."""
    E = (W - Q).to(torch.float32)
    return float(((E @ H) * E).sum(dtype=torch.float64))


def build_runners(args: argparse.Namespace) -> dict[str, Callable]:
    """One callable per method: ``(W, H) -> (Q, codes or None, seconds)``."""
    cfg = lq.QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        order="act",
        static_groups=args.static_groups,
        damp=args.damp,
        block_size=args.block_size,
    )

    def ours(fn):
        def run(W, H):
            t0 = time.perf_counter()
            r = fn(W, H, cfg)
            return r.Q, r.codes, time.perf_counter() - t0

        return run

    runners: dict[str, Callable] = {
        "gptq": ours(lq.gptq_quantize),
        "babai": ours(lq.babai_quantize),
        "rtn": ours(lq.rtn_quantize),
    }
    if args.gptqmodel:
        import gptqmodel_ref as ref

        ref.import_gptqmodel()

        def theirs(W, H):
            r = ref.gptq_layer(
                W,
                H,
                bits=args.bits,
                group_size=args.group_size,
                sym=args.sym,
                desc_act=True,
                static_groups=args.static_groups,
                damp=args.damp,
                block_size=args.block_size,
                nsamples=args.tokens,
            )
            return r.Q, None, r.time_s

        runners["gptqmodel"] = theirs
    return runners


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    d_out = args.d_out or args.size
    t0 = time.perf_counter()
    W, H = make_problem(d_out, args.size, args.tokens, args.seed)
    log.info(
        "problem %dx%d, %d tokens, built in %.1fs",
        d_out,
        args.size,
        args.tokens,
        time.perf_counter() - t0,
    )
    runners = build_runners(args)
    times: dict[str, list[float]] = {m: [] for m in runners}
    first: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for i in range(args.runs):
        for name, fn in runners.items():
            Q, codes, secs = fn(W, H)
            times[name].append(secs)
            log.info("run %d/%d %-9s %.2fs", i + 1, args.runs, name, secs)
            if name not in first:
                first[name] = (Q, codes)
            del Q, codes

    rtn_loss = proxy_loss(W, first["rtn"][0], H)
    ref_q = first["gptq"][0]
    rows = []
    for name in runners:
        Q, codes = first[name]
        med = statistics.median(times[name])
        row = {
            "method": name,
            "median_s": med,
            "times_s": times[name],
            "loss_rel_rtn": proxy_loss(W, Q, H) / rtn_loss,
            "same_Q_as_our_gptq": float((Q == ref_q).float().mean()),
            "ratio_vs_our_gptq": med / statistics.median(times["gptq"]),
        }
        if "gptqmodel" in times:
            row["ratio_vs_gptqmodel"] = med / statistics.median(times["gptqmodel"])
        rows.append(row)
    return {
        "problem": {
            "d_out": d_out,
            "d_in": args.size,
            "tokens": args.tokens,
            "dtype": "float32",
            "seed": args.seed,
        },
        "config": {
            "bits": args.bits,
            "group_size": args.group_size,
            "sym": args.sym,
            "order": "act",
            "static_groups": args.static_groups,
            "damp": args.damp,
            "block_size": args.block_size,
        },
        "runs": args.runs,
        "env": environment(),
        "rows": rows,
    }


def environment() -> dict:
    from gptqmodel_ref import gptqmodel_version

    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gptqmodel": gptqmodel_version(),
        "latticequant": getattr(lq, "__version__", None),
    }


def markdown(result: dict) -> str:
    p, c = result["problem"], result["config"]
    grid = "sym" if c["sym"] else "asym"
    group = "per-channel" if c["group_size"] == -1 else f"g{c['group_size']}"
    lines = [
        f"Layer {p['d_out']}x{p['d_in']} float32, H from {p['tokens']} correlated tokens; "
        f"{c['bits']}-bit {group} {grid}, act-order, static groups {c['static_groups']}, "
        f"damp {c['damp']}, block {c['block_size']}; median of {result['runs']} runs; "
        f"torch {result['env']['torch']} on {result['env']['torch_threads']} threads, "
        f"GPTQModel {result['env']['gptqmodel'] or '-'}.",
        "",
    ]
    has_ref = any("ratio_vs_gptqmodel" in r for r in result["rows"])
    header = ["method", "median s", "runs s", "x our GPTQ"]
    if has_ref:
        header.append("x GPTQModel")
    header += ["loss / RTN", "Q equal to our GPTQ"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in result["rows"]:
        cells = [
            r["method"],
            f"{r['median_s']:.2f}",
            " ".join(f"{t:.2f}" for t in r["times_s"]),
            f"{r['ratio_vs_our_gptq']:.2f}",
        ]
        if has_ref:
            cells.append(f"{r['ratio_vs_gptqmodel']:.2f}")
        cells += [f"{r['loss_rel_rtn']:.4f}", f"{100 * r['same_Q_as_our_gptq']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="d_in (and d_out unless --d-out)")
    ap.add_argument("--d-out", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=4096, help="activation rows behind H")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid")
    ap.add_argument(
        "--dynamic-groups",
        dest="static_groups",
        action="store_false",
        help="refit each group during the loop (GPTQModel's default) instead of static groups",
    )
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-gptqmodel",
        dest="gptqmodel",
        action="store_false",
        help="skip the reference (no benchmark environment needed)",
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.tokens <= 0 or args.runs <= 0:
        ap.error("--size, --tokens and --runs must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    try:
        result = run(args)
    except Exception as exc:  # the reference missing is the common case; say it plainly
        if type(exc).__name__ == "GPTQModelMissing":
            print(f"bench_layer: {exc}\n(or pass --no-gptqmodel)", file=sys.stderr)
            return 2
        raise
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
