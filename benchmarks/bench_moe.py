"""A tiny random Qwen3-MoE quantized end to end; the report's per-expert token counts.

The model: transformers' Qwen3-MoE with 2 blocks of hidden size 64, 8 experts of width 32 chosen
2 per token, block 1 a dense MLP (``mlp_only_layers``), the SmolLM2 tokenizer, random weights
(seed 0). ``latticequant quantize`` (GPTQ 4-bit g32, act-order) calibrates on the protocol's
text, 16 windows of 128 tokens, with ``--min-expert-tokens 300`` so that the rarely chosen
experts show the ``all-tokens`` fallback; three runs: in memory, with ``--offload`` (the
checkpoints compared tensor by tensor) and with ``--objective float-outputs``, then ``latticequant
report``, and one table of every expert's tokens and losses. Output: docs/bench_moe.md.

    python benchmarks/bench_moe.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs"
QUANTIZE = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--nsamples", "16"]
QUANTIZE += ["--seqlen", "128", "--min-expert-tokens", "300", "--eval-seqlen", "128"]


def make_model(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from latticequant.pipeline.models import load_model

    _, tokenizer = load_model(None)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_only_layers=[1],
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


RUNS = {  # name -> extra flags; each run quantizes the same folder from scratch
    "in memory": [],
    "offload": ["--offload"],
    "float-outputs": ["--objective", "float-outputs"],
}


def _quantize(folder: Path, out: Path, extra: list[str]) -> dict:
    """One ``latticequant quantize`` in a child process: its summary lines, quant log and the
    child's peak resident memory (``/usr/bin/time``'s maximum RSS, where that tool exists)."""
    cli = [sys.executable, "-m", "latticequant", "quantize", str(folder), *QUANTIZE, *extra]
    timer = ["/usr/bin/time", "-f", "maxrss_kb=%M"] if Path("/usr/bin/time").is_file() else []
    t0 = time.perf_counter()
    run = subprocess.run(
        timer + cli + ["--out", str(out)], capture_output=True, text=True, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr.strip()[-600:])
    rss = [ln for ln in run.stderr.splitlines() if ln.startswith("maxrss_kb=")]
    log = json.loads((out / "quant_log.json").read_text())
    return {
        "summary": [ln for ln in run.stdout.splitlines() if ln.strip()],
        "layers": {e["name"]: e for e in log["layers"]},
        "wall_s": wall,
        "peak_rss_mib": int(rss[-1].split("=")[1]) / 1024 if rss else None,
    }


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _expert_rows(runs: dict) -> list[str]:
    """One row per expert layer: routed tokens, fallback and each run's loss."""
    base, fo = runs["in memory"]["layers"], runs["float-outputs"]["layers"]
    rows = [
        "| expert layer | tokens | fallback | loss, layer objective | loss, offload "
        "| float-outputs: loss to its target | float-outputs: target's shift |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in base.items():
        if ".experts." not in name:
            continue
        f, o = fo[name], runs["offload"]["layers"][name]
        rows.append(
            f"| {name} | {e.get('expert_tokens', '-')} | {e.get('expert_fallback') or '-'} | "
            f"{e['loss']:.4g} | {o['loss']:.4g} | {f['loss']:.4g} | "
            f"{f.get('target_shift', float('nan')):.4g} |"
        )
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench_moe_") as tmp:
        folder = Path(tmp) / "qwen3-moe"
        make_model(folder)
        runs = {name: _quantize(folder, Path(tmp) / f"q{i}", extra)
                for i, (name, extra) in enumerate(RUNS.items())}  # fmt: skip
        a, b = _tensors(Path(tmp) / "q0"), _tensors(Path(tmp) / "q1")
        same = sum(torch.equal(a[k], b[k]) for k in a if k in b)
        report = subprocess.run(
            [sys.executable, "-m", "latticequant", "report", str(Path(tmp) / "q0")],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )  # fmt: skip
    lines = [
        "# A mixture-of-experts model end to end",
        "",
        "A tiny random Qwen3-MoE as transformers 5 builds it (fused expert tensors; 2 blocks, "
        "hidden size 64, 8 experts of width 32, 2 per token, block 1 a dense MLP), the SmolLM2 "
        "tokenizer, quantized three times from the same folder:",
        "",
        "```",
        *(f"latticequant quantize FOLDER {' '.join(QUANTIZE + extra)}".rstrip()
          for extra in RUNS.values()),
        "latticequant report OUT",
        "```",
        "",
        "Generated by `python benchmarks/bench_moe.py`. Every expert matrix is its own layer "
        "(`mlp.experts.{e}.gate_proj|up_proj|down_proj`); `tokens` is the number of calibration "
        "tokens the router sent to the expert (of 16 x 128 = 2048, each token to 2 experts), "
        "`fallback` what an expert under `--min-expert-tokens 300` was quantized on (here the "
        "default, `all-tokens`). The router (`mlp.gate`) stays in float. The weights are random, "
        "so the perplexities only show that the quantized model runs as the float one does.",
        "",
        "| run | wall s | peak RSS MiB | perplexity after |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for name, r in runs.items():
        after = [
            ln.split(":")[1].strip() for ln in r["summary"] if ln.startswith("perplexity after")
        ]
        rss = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {rss} | {after[0] if after else '–'} |")
    lines += [
        "",
        f"`--offload` (one block and its experts read at a time, quantized weights kept on disk) "
        f"wrote the same checkpoint as the run in memory: {same} of {len(a)} tensors identical.",
        "With `--objective float-outputs` each expert's target `T` is made to match the float "
        "block's expert output on the tokens the quantized router sends it; its loss is the "
        "decode's error against that target, `(T - Q) H (T - Q)^T`, and the target's shift "
        "`(T - W) H (T - W)^T` is how far the target moved from the layer's own float weights. "
        "On a model this small, `--offload`'s bookkeeping outweighs the weights it keeps on "
        "disk, so its peak is not lower here.",
        "",
        "Per expert:",
        "",
        *_expert_rows(runs),
        "",
        "Quantize's summary (in memory):",
        "",
        "```",
        *runs["in memory"]["summary"],
        "```",
        "",
        "The report (in memory):",
        "",
        "```",
        *report.stdout.rstrip().splitlines(),
        "```",
    ]
    (DOCS / "bench_moe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
