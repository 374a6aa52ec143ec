"""Where folding loses what the per-layer rotation gains: the layer loss by kind of layer.

Two measurements on the protocol's model and calibration (GPTQ, act-order, asymmetric, seed 0):

1. ``--rotate {none, folded, folded+online, hadamard}`` quantized whole (``--no-eval``), and each
   checkpoint's ``quant_log.json`` summed by kind of layer: the loss ``tr((W - Q) H (W - Q)^T)``
   each layer was left with, in its output's units, which no rotation changes (a reader's
   output is the same vector in every basis; a writer's is rotated, which keeps its norm).
2. Block 0's readers (q, k, v behind ``input_layernorm``, gate and up behind
   ``post_attention_layernorm``) on the float model's own inputs, the one place where every
   rotation sees the same calibration data: the same layer quantized in five bases, so that
   what the fold changes can be taken apart. With ``x`` the normalised input (``h / rms(h)``)
   and ``g`` the norm's scale, the layer computes ``(x g) W^T``:

   - ``none``: the target ``W`` on the inputs ``x g``;
   - ``hadamard``: ``W R`` on ``x g R`` (the per-layer rotation, this layer's own ``R``);
   - ``folded``: ``W diag(g) R1`` on ``x R1`` (the fold: the scale moves into the weights);
   - ``g in W``: ``W diag(g)`` on ``x`` (the fold's scale move alone, no rotation);
   - ``R1, g in x``: ``W R1`` on ``x g R1`` (the fold's rotation alone, the scale left in x).

``python benchmarks/bench_fold_losses.py`` writes ``docs/bench_fold_losses.md`` and ``.json``;
``--grids 2g64`` limits part 1 to one grid (each run takes about 2.5 minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_fold import ENV, ROTATIONS, quantize_args  # noqa: E402

from latticequant.core.config import QuantConfig  # noqa: E402
from latticequant.core.gptq import gptq_quantize  # noqa: E402
from latticequant.core.rotation import hadamard_rotation  # noqa: E402
from latticequant.pipeline.checkpoint import read_quant_log  # noqa: E402
from latticequant.pipeline.data import (  # noqa: E402
    calibration_windows,
    load_text,
    split_ids,
    tokenize,
    window_bos,
)
from latticequant.pipeline.models import load_model  # noqa: E402
from latticequant.pipeline.target import layer_seed  # noqa: E402

DOCS = ROOT / "docs"
#: grids as (bits, group size); part 1 runs them through bench_fold.quantize_args
GRIDS = {"2g64": (2, 64), "3g128": (3, 128)}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASES = ("none", "hadamard", "folded", "g in W", "R1, g in x")
READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}


def quantize(grid: str, rotation: str, out: Path) -> dict:
    """One whole run (bench_fold's settings for ``GRID-ROTATION-layer``, without the
    perplexities); the loss, RTN loss and clipped codes of each kind of layer summed."""
    cmd = [sys.executable, "-m", "latticequant", "quantize",
           *quantize_args(f"{grid}-{rotation}-layer"),
           "--no-eval", "--out", str(out), "--overwrite"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    kinds: dict = defaultdict(lambda: {"loss": 0.0, "rtn_loss": 0.0, "clipped": 0, "weights": 0})
    for entry in read_quant_log(out)["layers"]:
        k = kinds[entry["name"].rsplit(".", 1)[-1]]
        k["loss"] += entry["loss"]
        k["rtn_loss"] += entry["rtn_loss"]
        k["clipped"] += entry["clipped"]
        k["weights"] += entry["shape"][0] * entry["shape"][1]
    return {"command": " ".join(cmd[1:]).replace(str(out), "OUT"), "kinds": dict(kinds)}


def block0_inputs(nsamples: int, seqlen: int) -> tuple[torch.nn.Module, dict]:
    """The float model and, per norm of block 0, its normalised input ``x`` (float64 rows)."""
    model, tokenizer = load_model(None)
    bos = window_bos(tokenizer, "auto")  # as `latticequant quantize` draws its windows
    ids = split_ids(tokenize(tokenizer, load_text(None), bos is None))[0]
    windows = calibration_windows(ids, nsamples, seqlen, 0, bos)
    block = model.model.layers[0]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in READERS}

    def hook(name):
        def fn(module, args):
            h = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            parts[name].append(x)

        return fn

    handles = [getattr(block, n).register_forward_pre_hook(hook(n)) for n in READERS]
    try:
        with torch.no_grad():
            for a in range(0, nsamples, 8):
                model.model(windows[a : a + 8])
    finally:
        for h in handles:
            h.remove()
    return model, {n: torch.cat(xs) for n, xs in parts.items()}


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def bases(W: torch.Tensor, g: torch.Tensor, H0: torch.Tensor, name: str) -> dict:
    """``(target, Gram)`` of one reader in each basis of :data:`BASES` (float64)."""
    R = hadamard_rotation(W.shape[1], layer_seed(0, name)).matrix()
    R1 = hadamard_rotation(W.shape[1], layer_seed(0, "residual")).matrix()
    G = torch.diag(g)
    Hg = G @ H0 @ G
    return {
        "none": (W, Hg),
        "hadamard": (W @ R, R.T @ Hg @ R),
        "folded": (W @ G @ R1, R1.T @ H0 @ R1),
        "g in W": (W @ G, H0),
        "R1, g in x": (W @ R1, R1.T @ Hg @ R1),
    }


def block0_losses(nsamples: int, seqlen: int) -> dict:
    model, xs = block0_inputs(nsamples, seqlen)
    block = model.model.layers[0]
    out = {}
    for norm, names in READERS.items():
        g = getattr(block, norm).weight.detach().to(torch.float64)
        H0 = gram(xs[norm])
        for local in names:
            name = f"model.layers.0.{local}"
            W = block.get_submodule(local).weight.detach().to(torch.float64)
            row = {"g_max_over_median": float(g.abs().max() / g.abs().median())}
            for grid, (bits, group) in GRIDS.items():
                for scale in ("minmax", "hessian"):
                    cfg = QuantConfig(bits=bits, group_size=group, order="act", scale_method=scale)
                    row[f"{grid} {scale}"] = {
                        b: gptq_quantize(T.clone(), H, cfg).proxy_loss
                        for b, (T, H) in bases(W, g, H0, name).items()
                    }
            out[name] = row
    return out


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# Where folding loses: the layer loss by kind of layer",
        "",
        "`python benchmarks/bench_fold_losses.py`: GPTQ, act-order, asymmetric, seed 0, the "
        "protocol's model and calibration. Loss: `tr((W - Q) H (W - Q)^T)` as each checkpoint's "
        "`quant_log.json` records it, summed over the 30 blocks; in the layer output's units, "
        "which no rotation changes. Clipped: codes clamped to the grid.",
        "",
    ]
    for grid, runs in results["runs"].items():
        lines += [f"## {grid}, whole model", "", "| kind | " + " | ".join(runs) + " |",
                  "|---|" + "---|" * len(runs)]  # fmt: skip
        for kind in KINDS:
            cells = []
            for r in runs.values():
                k = r["kinds"][kind]
                cells.append(f"{k['loss']:.1f} ({100 * k['clipped'] / k['weights']:.2f}%)")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        totals = [sum(k["loss"] for k in r["kinds"].values()) for r in runs.values()]
        lines += ["| total | " + " | ".join(f"{t:.1f}" for t in totals) + " |", ""]
    lines += [
        "## Block 0's readers on the float model's inputs",
        "",
        "The same layer, the same calibration inputs, in five bases: `none` (`W` on `x g`), "
        "`hadamard` (`W R` on `x g R`, the per-layer rotation), `folded` (`W diag(g) R1` on "
        "`x R1`), `g in W` (`W diag(g)` on `x`: the fold's scale move alone), `R1, g in x` "
        "(`W R1` on `x g R1`: the fold's rotation alone); `x` the normalised input, `g` the "
        "norm's scale. Loss on the float model's block-0 inputs (mean over tokens), ratio to "
        "`none` in brackets.",
        "",
    ]
    block0 = results["block0"]
    settings = [k for k in next(iter(block0.values())) if k != "g_max_over_median"]
    for s in settings:
        lines += [f"### {s}", "", "| layer | max g / median g | " + " | ".join(BASES) + " |",
                  "|---|---|" + "---|" * len(BASES)]  # fmt: skip
        for name, row in block0.items():
            base = row[s]["none"]
            cells = [f"{row[s][b]:.4g} ({row[s][b] / base:.2f})" for b in BASES]
            lines.append(
                f"| {name.removeprefix('model.layers.0.')} | {row['g_max_over_median']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default=",".join(GRIDS), help="part 1's grids (2g64,3g128)")
    p.add_argument("--nsamples", type=int, default=64, help="block 0's calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    args = p.parse_args(argv)
    if args.nsamples < 1 or args.seqlen < 2:
        p.error("--nsamples must be at least 1 and --seqlen at least 2")
    grids = [g for g in args.grids.split(",") if g]
    unknown = sorted(set(grids) - set(GRIDS))
    if unknown:
        p.error(f"unknown grids {unknown}; choose from {', '.join(GRIDS)}")
    results = {"block0": block0_losses(args.nsamples, args.seqlen), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_fold_losses.") as work:
        for grid in grids:
            results["runs"][grid] = {}
            for rotation in ROTATIONS:
                results["runs"][grid][rotation] = quantize(grid, rotation, Path(work) / rotation)
                print(grid, rotation, flush=True)
    (DOCS / "bench_fold_losses.json").write_text(json.dumps(results, indent=1))
    write_table(results, DOCS / "bench_fold_losses.md")
    print((DOCS / "bench_fold_losses.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
