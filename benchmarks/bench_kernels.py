"""GPU speed of the quantized linear layers against the torch BF16 matmul, and decode latency.

Per layer: Llama-3-8B-like shapes (d_in x d_out = 4096x4096, 4096x14336, 14336x4096) at batch 1, 4,
16 and 64, for GPTQ 4-bit and 3-bit (groups of 128, act-order permutation) and SSQR 3-bit with 1%
outliers; medians of ``triton.testing.do_bench`` (L2 flushed between runs). Each row also gives
the bytes a call must move (packed weights, scales, zeros, indices, activations, outputs, CSR),
the bandwidth that implies, and that bandwidth as a fraction of the device's measured copy
bandwidth (``dst.copy_(src)`` on 1 GiB, read + write). Every quantized call is first checked
against the dequantized float32 reference.

End to end: the default model (or ``--model``), its decoder linears put on a 4-bit grid of groups
of 128 by round-to-nearest (the kernels do not care how the codes were found) and replaced by
``QuantLinear``; greedy decode latency per token at batch 1, BF16 activations, beside the same model
in BF16.

    PYTHONPATH=. python benchmarks/bench_kernels.py                  # the issue's table
    PYTHONPATH=. python benchmarks/bench_kernels.py --sweep          # also search kernel tiles
    PYTHONPATH=. python benchmarks/bench_kernels.py --shapes 4096x4096 --batches 1 --no-e2e

Writes ``bench_kernels.json`` and ``bench_kernels.md`` into ``--out`` (default
``runs/bench_kernels``). Needs a CUDA GPU; on a CPU it refuses.
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
from functools import partial
from pathlib import Path

import torch

log = logging.getLogger("bench_kernels")

DEFAULT_SHAPES = "4096x4096,4096x14336,14336x4096"
DEFAULT_BATCHES = "1,4,16,64"
# name: (format, bits, outlier rate)
VARIANTS = {
    "gptq-4b": ("gptq", 4, 0.0),
    "gptq-3b": ("gptq", 3, 0.0),
    "ssqr-3b-1%": ("ssqr", 3, 0.01),
}
SWEEP = [
    {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4},
    {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4},
    {"BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 4, "num_warps": 8},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="d_in x d_out list")
    p.add_argument("--batches", default=DEFAULT_BATCHES)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-act-order", action="store_true", help="groups already contiguous")
    p.add_argument("--sweep", action="store_true", help="also try the tiles in SWEEP")
    p.add_argument("--no-e2e", action="store_true", help="skip the decode latency")
    p.add_argument("--model", default=None, help="HF folder or GGUF (default: SmolLM2-135M)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_kernels")
    return p.parse_args(argv)


def _ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(device) -> float:
    """Bytes per second of ``dst.copy_(src)`` on 1 GiB (one read and one write per byte)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _ms(partial(dst.copy_, src))
    return 2 * n / (ms * 1e-3)


def make_layer(d_in, d_out, fmt, bits, rate, group_size, act_order, seed):
    """Random codes and grid in the checkpoint format; the module on the GPU, and its W."""
    from latticequant.formats import QuantLinear, SSQRLinear, pack_csr, pack_gptq_parts

    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else -(-d_in // group_size)
    j = torch.arange(d_in)
    g_idx = j // (d_in if group_size == -1 else group_size)
    if act_order:
        perm = torch.randperm(d_in, generator=g)
        g_idx = torch.empty_like(g_idx).index_copy_(0, perm, g_idx)
    codes = torch.randint(0, 1 << bits, (d_out, d_in), generator=g)
    scales = torch.rand(d_out, n_groups, generator=g) * 0.02 + 1e-3
    zeros = torch.full((d_out, n_groups), float(1 << (bits - 1)))
    if fmt == "ssqr":
        mask = torch.rand(d_out, d_in, generator=g) < rate
        codes[mask] = 1 << (bits - 1)
    tensors = pack_gptq_parts(codes, scales, zeros, g_idx, bits, "gptq_v2")
    if fmt == "ssqr":
        tensors.update(pack_csr(mask, torch.randn(d_out, d_in, generator=g) * 0.1))
        module = SSQRLinear(tensors, bits, "gptq_v2")
    else:
        module = QuantLinear(tensors, bits, "gptq_v2")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return module, nbytes


def run_tiles(module, xs: torch.Tensor, path: str, cfg: dict) -> torch.Tensor:
    """The dense kernel of ``module`` on already permuted inputs, with given tiles."""
    from latticequant.formats import kernels

    return kernels.gptq_matmul(
        xs,
        module.qweight,
        module.scales,
        module.zeros,
        module.g_idx,
        module.bits,
        module.group_size,
        path=path,
        block_sizes=cfg,
    )


def bench_layers(args, device, copy_bw) -> list[dict]:
    from latticequant.formats import kernels

    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    for d_in, d_out in shapes:
        W16 = (torch.randn(d_out, d_in, device=device) * 0.02).to(torch.bfloat16)
        for name in args.variants.split(","):
            fmt, bits, rate = VARIANTS[name]
            module, stored = make_layer(
                d_in, d_out, fmt, bits, rate, args.group_size, not args.no_act_order, args.seed
            )
            module = module.to(device)
            W = module.dequantize_weight(torch.float32)
            for batch in batches:
                x = torch.randn(batch, d_in, device=device).to(torch.bfloat16)
                y = module(x)
                ref = x.float() @ W.T
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                if err > 2e-2:
                    raise RuntimeError(f"{name} {d_in}x{d_out} batch {batch}: rel. error {err}")
                t_q = _ms(partial(module, x))
                t_bf16 = _ms(partial(torch.nn.functional.linear, x, W16))
                best = None
                if args.sweep and fmt == "gptq":
                    xs = x[:, module.perm] if module.perm.numel() else x
                    path = "gemv" if batch <= kernels.GEMV_MAX_BATCH else "gemm"
                    for cfg in SWEEP:
                        if path == "gemv" and "BLOCK_M" in cfg:
                            continue
                        if path == "gemm" and "SPLIT_K" in cfg:
                            continue
                        t = _ms(partial(run_tiles, module, xs, path, cfg))
                        if best is None or t < best[0]:
                            best = (t, cfg)
                moved = stored + x.numel() * 2 + batch * d_out * 2
                row = {
                    "variant": name,
                    "d_in": d_in,
                    "d_out": d_out,
                    "batch": batch,
                    "ms_quant": t_q,
                    "ms_bf16": t_bf16,
                    "speedup": t_bf16 / t_q,
                    "bytes": moved,
                    "GBps": moved / (t_q * 1e-3) / 1e9,
                    "frac_copy_bw": moved / (t_q * 1e-3) / copy_bw,
                    "bf16_GBps": (W16.numel() * 2 + x.numel() * 2 + batch * d_out * 2)
                    / (t_bf16 * 1e-3)
                    / 1e9,
                    "rel_err": err,
                }
                if best is not None:
                    row["ms_best_tiles"], row["best_tiles"] = best[0], best[1]
                rows.append(row)
                log.info(
                    "%s %dx%d b=%d: %.4f ms vs bf16 %.4f ms (%.2fx), %.0f GB/s",
                    name, d_in, d_out, batch, t_q, t_bf16, row["speedup"], row["GBps"],
                )  # fmt: skip
            del module, W
            torch.cuda.empty_cache()
    return rows


def quantize_linears_rtn(model, bits: int, group_size: int) -> int:
    """Replace the decoder linears by ``QuantLinear`` on an RTN grid; returns how many."""
    import latticequant as lq
    from latticequant.formats import FormatError, QuantLinear, pack_gptq
    from latticequant.pipeline.layout import describe_model, linear_weight

    cfg = lq.QuantConfig(bits=bits, group_size=group_size, sym=True)
    done = 0
    for name in describe_model(model).linear_names():
        module = model.get_submodule(name)
        W = linear_weight(module).detach().float()
        r = lq.rtn_quantize(W, torch.eye(W.shape[1]), cfg)
        try:
            tensors = pack_gptq(r, checkpoint_format="gptq_v2")
        except FormatError as exc:
            log.warning("%s stays in float: %s", name, exc)
            continue
        bias = getattr(module, "bias", None)
        q = QuantLinear(tensors, bits, "gptq_v2", bias=None if bias is None else bias.detach())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
        done += 1
    return done


@torch.no_grad()
def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)  # warm up (kernel compilation, allocator)
    full = statistics.median(run(new_tokens) for _ in range(3))
    first = statistics.median(run(1) for _ in range(3))
    return (full - first) / (new_tokens - 1) * 1e3


def bench_e2e(args, device) -> dict:
    import copy

    from latticequant.pipeline.models import load_model

    model, _ = load_model(args.model)
    ref = copy.deepcopy(model).to(device, torch.bfloat16).eval()
    n = quantize_linears_rtn(model, 4, args.group_size)
    quant = model.to(device, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(args.seed)
    vocab = int(model.config.vocab_size)
    prompt = torch.randint(4, vocab, (1, 32), generator=g).to(device)
    ms_ref = decode_ms_per_token(ref, prompt, args.new_tokens)
    ms_q = decode_ms_per_token(quant, prompt, args.new_tokens)
    return {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "quantized_linears": n,
        "grid": f"4-bit, group {args.group_size}, RTN",
        "new_tokens": args.new_tokens,
        "ms_per_token_bf16": ms_ref,
        "ms_per_token_quant": ms_q,
        "speedup": ms_ref / ms_q,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Kernel benchmark on {result['device']}",
        "",
        f"Command: `{result['command']}`  ",
        f"torch {result['torch']}, triton {result['triton']}; measured copy bandwidth "
        f"{result['copy_GBps']:.0f} GB/s.",
        "",
        "| variant | d_in x d_out | batch | quant ms | bf16 ms | speedup | GB/s | of copy BW |"
        + (" best tiles ms |" if any("ms_best_tiles" in r for r in result["layers"]) else ""),
        "|---|---|---|---|---|---|---|---|"
        + ("---|" if any("ms_best_tiles" in r for r in result["layers"]) else ""),
    ]
    for r in result["layers"]:
        line = (
            f"| {r['variant']} | {r['d_in']}x{r['d_out']} | {r['batch']} | {r['ms_quant']:.4f} "
            f"| {r['ms_bf16']:.4f} | {r['speedup']:.2f}x | {r['GBps']:.0f} "
            f"| {100 * r['frac_copy_bw']:.0f}% |"
        )
        if "ms_best_tiles" in r:
            line += f" {r['ms_best_tiles']:.4f} |"
        lines.append(line)
    e2e = result.get("e2e")
    if e2e:
        lines += [
            "",
            f"Decode, {e2e['model']}, batch 1, {e2e['grid']} on {e2e['quantized_linears']} "
            f"linears: {e2e['ms_per_token_quant']:.2f} ms/token vs BF16 "
            f"{e2e['ms_per_token_bf16']:.2f} ms/token ({e2e['speedup']:.2f}x).",
        ]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py measures GPU kernels and needs a CUDA device; none is visible. "
            "(The kernels' correctness is tested on the CPU: TRITON_INTERPRET=1 pytest "
            "tests/test_kernels.py.)",
            file=sys.stderr,
        )
        return 2
    import triton

    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    copy_bw = copy_bandwidth(device)
    result = {
        "device": torch.cuda.get_device_name(device),
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_GBps": copy_bw / 1e9,
        "layers": bench_layers(args, device, copy_bw),
    }
    if not args.no_e2e:
        result["e2e"] = bench_e2e(args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "bench_kernels.json", json.dumps(result, indent=2))
    md = markdown(result)
    _atomic_write(out / "bench_kernels.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
