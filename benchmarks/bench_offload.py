"""Peak memory of quantizing with the decoder blocks on disk (``--offload``) against in memory.

The protocol's model (SmolLM2-135M-Instruct, float32) is first written as an ordinary Hugging
Face folder (safetensors in 100 MB shards) under ``runs/``. Then ``latticequant quantize`` runs
on it twice, each in its own process: with the whole model in memory, and with ``--offload``.
Each process reports its own peak resident memory (``ru_maxrss``), its perplexities and times;
the two checkpoints are compared tensor by tensor.

    python benchmarks/bench_offload.py [--method gptq] [--bits 4] [--group-size 128]

Writes ``docs/bench_offload.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "bench_offload"


def _child(argv: list[str]) -> None:
    """Run the CLI in this process and print its JSON plus this process's peak memory."""
    import contextlib
    import io

    from latticequant.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit(code)
    payload = json.loads(buf.getvalue())
    payload["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(payload))


def _hf_folder() -> Path:
    folder = RUNS / "smollm2-hf"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    from latticequant.pipeline.models import load_model

    model, tokenizer = load_model(None)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100MB")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _read_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--group-size", default="128")
    args = parser.parse_args()
    folder = _hf_folder()
    results = {}
    for mode in ("memory", "offload"):
        out = RUNS / f"out-{mode}"
        argv = ["quantize", str(folder), "--out", str(out), "--overwrite", "--json"]
        argv += ["--method", args.method, "--bits", args.bits, "--group-size", args.group_size]
        if mode == "offload":
            argv += ["--offload", "--offload-dir", str(RUNS / "store")]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", *argv],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[mode]["model"] = str(folder.relative_to(ROOT))
        results[mode]["out"] = str(out.relative_to(ROOT))
        print(f"{mode}: {results[mode]['peak_rss_mib']:.0f} MiB peak", file=sys.stderr)
    a, b = _read_all(RUNS / "out-memory"), _read_all(RUNS / "out-offload")
    identical = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    summary = {
        "model": "SmolLM2-135M-Instruct (float32, safetensors folder)",
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "identical_checkpoints": identical,
        "runs": results,
        "command": "python benchmarks/bench_offload.py",
    }
    (ROOT / "docs" / "bench_offload.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| mode | peak RSS MiB | quantize s | total s | ppl before | ppl after |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['peak_rss_mib']:.0f} | {r['quantize_s']:.0f} | {r['total_s']:.0f} | "
            f"{r['ppl_before']:.4f} | {r['ppl_after']:.4f} |"
        )
    print(f"checkpoints identical tensor by tensor: {identical}")


if __name__ == "__main__":
    main()
