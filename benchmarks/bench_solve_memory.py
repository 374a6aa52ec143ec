"""Peak memory of one wide GPTQ solve: what the factorization holds beside its input.

A random positive definite ``n x n`` Hessian (float32, as the pipeline accumulates it) and a
16-row weight matrix (``--rows``), quantized by ``lq.gptq_quantize`` (``--layer``: by the
registered ``gptq`` method, as the pipeline calls it) at 4 bits, group 128, act-order. The
peak resident memory of the process above what it held before the solve is reported in GiB
and in float64 copies of the Hessian. n = 14336 is Llama-3-8B's ``down_proj``.

    python benchmarks/bench_solve_memory.py            # n = 14336: about 5 minutes, 3 GiB
    python benchmarks/bench_solve_memory.py --n 4096
    python benchmarks/bench_solve_memory.py --rows 4096 --layer   # down_proj as a whole
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import latticequant as lq  # noqa: E402


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=14336)
    p.add_argument("--rows", type=int, default=16, help="rows of W (4096: the whole down_proj)")
    p.add_argument("--layer", action="store_true", help="through the registered gptq method")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 256 or args.rows < 1 or args.threads < 1:
        p.error(
            "--n must be at least 256 (the warm-up solve's width), --rows and --threads at least 1"
        )
    torch.set_num_threads(args.threads)
    n = args.n
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, n, generator=g)
    H = X.T @ X / 1024
    del X
    H.diagonal().add_(0.01)
    W = torch.randn(args.rows, n, generator=g)
    cfg = lq.QuantConfig(bits=4, group_size=128, order="act")
    if args.layer:
        from latticequant.methods import get_method

        def solve(W, H, cfg):
            return get_method("gptq").quantize(W, H, cfg).stats["loss"]
    else:

        def solve(W, H, cfg):
            return float(lq.gptq_quantize(W, H, cfg).loss.sum())

    solve(W[:, :256], H[:256, :256], cfg)  # libraries' first-use buffers
    gc.collect()
    base = peak_bytes()
    t0 = time.perf_counter()
    loss = solve(W, H, cfg)
    wall = time.perf_counter() - t0
    extra = peak_bytes() - base
    copy = n * n * 8
    print(
        f"n = {n}, {args.rows} rows: peak {extra / 2**30:.2f} GiB above the input "
        f"({extra / copy:.2f} float64 copies of H), {wall:.0f} s, loss {loss:.6g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
