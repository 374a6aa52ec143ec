"""Peak memory of ``latticequant eval`` on an HPTQ checkpoint against the float32 model.

The protocol's model (SmolLM2-135M-Instruct) is quantized with HPTQ at 3.125 bits per weight
(``latticequant quantize --method hptq --target-bits 3.125 --no-eval``, or an existing
checkpoint given with ``--checkpoint``) and written as a float32 Hugging Face folder; then
``latticequant eval`` runs on each, in its own process under ``/usr/bin/time`` (the peak
resident set size), several times in turn; the medians and their ratio are reported. The
checkpoint is evaluated as the command line does by default: packed codes resident, each
layer decoded in every call. A second process per model measures where the peak goes:
start-up, the model at rest (and of it the tensors' own bytes). Results go to
docs/bench_load_memory.json and .md.

    python benchmarks/bench_load_memory.py                          # quantizes first (minutes)
    python benchmarks/bench_load_memory.py --checkpoint DIR --keep  # reuse DIR, keep the folders

A quick check of the script itself on a small Hugging Face folder (its figures mean nothing):

    python benchmarks/bench_load_memory.py --model DIR --nsamples 4 --seqlen 32 --chars 2000 \
        --runs 1 --out /tmp/bench_load_memory

The windows evaluated are the first ``--chars`` characters of the protocol's held-out text
(the peak does not grow with their number; the time does, and an HPTQ layer decodes its
Huffman stream in every call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
QUANTIZE = ["--method", "hptq", "--target-bits", "3.125", "--no-eval"]
GOAL = 0.5


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def quantize(out: Path, args) -> None:
    cmd = [sys.executable, "-m", "latticequant", "quantize", *QUANTIZE, "--out", str(out)]
    cmd += [args.model] if args.model else []
    for flag, value in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen)):
        cmd += [flag, str(value)] if value is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed: {proc.stderr.strip().splitlines()[-1:]}")


SAVE_FLOAT = """
import sys, torch
from latticequant.pipeline.models import load_model
model, tokenizer = load_model(sys.argv[2] or None)
model.to(torch.float32).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
"""

HELD_OUT = """
import sys
from latticequant.pipeline.data import protocol_text
text = protocol_text()
held = text[int(len(text) * 0.8):]
start = held.find("\\n") + 1  # from a line start
open(sys.argv[1], "w").write(held[start:start + int(sys.argv[2])])
"""

#: In a fresh process: the resident memory after the imports, with the model loaded as the
#: command line loads it (a checkpoint: packed codes only), and the bytes of its tensors
#: (parameters and buffers, shared ones once).
AT_REST = """
import sys
from latticequant.pipeline.models import load_model

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))

start = rss()
model, tokenizer = load_model(sys.argv[1], cache_weight=False)
storages = {}
for t in list(model.parameters()) + list(model.buffers()):
    float(t.detach().float().sum())  # every page read once (a folder's weights are mapped)
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(start, rss(), sum(storages.values()))
"""


def _python(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env()
    )
    if proc.returncode != 0:
        raise SystemExit(f"{args}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def evaluate(folder: Path, text: Path, seqlen: int | None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "latticequant", "eval", str(folder)]
    cmd += ["--text", str(text), "--json"] + (["--seqlen", str(seqlen)] if seqlen else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"eval {folder} failed: {proc.stderr.strip().splitlines()[-1:]}")
    payload = json.loads(proc.stdout)
    kb = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[-1]
    return {
        "peak_rss_bytes": int(kb) * 1024,
        "perplexity": payload["perplexity"],
        "tokens": payload["tokens"],
        "time_s": payload["time_s"],
    }


def at_rest(folder: Path) -> dict:
    start, loaded, tensors = (int(v) for v in _python(AT_REST, str(folder)).split()[-3:])
    return {"startup_rss_bytes": start, "at_rest_rss_bytes": loaded, "tensor_bytes": tensors}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def describe_checkpoint(folder: Path) -> str:
    """``method target_bits`` as the checkpoint's own config records them."""
    section = json.loads((folder / "quantize_config.json").read_text())["latticequant"]
    return f"{section['method']} {section['config'].get('target_bits', '')}".strip()


def report(results: dict, args) -> list[str]:
    runs = results["models"]
    label = results["checkpoint"]
    h, f = runs["hptq"], runs["float32"]
    mib = lambda b: b / 2**20  # noqa: E731
    ratio = h["peak_rss_median_bytes"] / f["peak_rss_median_bytes"]
    lines = [
        "# Peak memory of `latticequant eval`: an HPTQ checkpoint against float32",
        "",
        f"{args.model or 'SmolLM2-135M-Instruct'} quantized with {label} bits per weight "
        "(the checkpoint's own record; the default run is "
        "`latticequant quantize --method hptq --target-bits 3.125`; "
        "`hrtn` writes the same HPTQ format with round-to-nearest codes) and the same model "
        "written as a float32 "
        f"folder; `latticequant eval` on the first {args.chars} characters of the protocol's "
        f"held-out text (windows of {args.seqlen or 512} tokens), each in its own process, "
        "peak resident set "
        f"size from `/usr/bin/time -v`, {args.runs} runs each, median"
        f"{f' ({args.jobs} processes at once, so the times overlap)' if args.jobs > 1 else ''}. "
        f"{results['machine']}, {results['cpus']} CPUs, shared with other work (times are "
        "noisy, the memory is not). Generated by `python benchmarks/bench_load_memory.py"
        f"{' --checkpoint DIR' if args.checkpoint else ''}"
        f"{' --model ' + args.model if args.model else ''}"
        f"{f' --nsamples {args.nsamples}' if args.nsamples else ''}"
        f"{f' --seqlen {args.seqlen}' if args.seqlen else ''}"
        f"{f' --runs {args.runs}' if args.runs != 3 else ''}"
        f"{f' --chars {args.chars}' if args.chars != 12000 else ''}"
        f"{f' --jobs {args.jobs}' if args.jobs != 1 else ''}`.",
        "",
        "| model | weights on disk MiB | peak RSS MiB (runs) | median | perplexity | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in ((label, h), ("float32", f)):
        peaks = ", ".join(f"{mib(p):.0f}" for p in r["peak_rss_bytes"])
        lines.append(
            f"| {name} | {mib(r['disk_bytes']):.0f} | {peaks} | "
            f"{mib(r['peak_rss_median_bytes']):.0f} | {r['perplexity']:.4f} | "
            f"{statistics.median(r['time_s']):.1f} |"
        )
    lines += [
        "",
        f"{label} against float32: peak RSS {ratio:.2f}x (goal: at most {GOAL}x, "
        f"{'met' if ratio <= GOAL else 'missed'}).",
        "",
        "Where the peak goes. Start-up and the model at rest are measured in a process of their "
        "own that loads the model as `eval` does and reads every tensor once; the tensors are "
        "their own bytes (parameters and buffers, tied ones once); the rest of the peak is the "
        "evaluation itself (activations, logits over the vocabulary, the loss).",
        "",
        f"| part | {label} MiB | float32 MiB |",
        "|---|---|---|",
    ]
    parts = {
        "start-up: interpreter, torch, transformers, latticequant": lambda r: r[
            "startup_rss_bytes"
        ],
        "the model at rest, of it its tensors": lambda r: r["tensor_bytes"],
        "the model at rest, the rest (tokenizer, loader, allocator, code)": lambda r: (
            r["at_rest_rss_bytes"] - r["startup_rss_bytes"] - r["tensor_bytes"]
        ),
        "the evaluation above the model at rest": lambda r: (
            r["peak_rss_median_bytes"] - r["at_rest_rss_bytes"]
        ),
        "whole process at its peak (median)": lambda r: r["peak_rss_median_bytes"],
    }
    for label, fn in parts.items():
        lines.append(f"| {label} | {mib(fn(h)):.0f} | {mib(fn(f)):.0f} |")
    fixed = h["startup_rss_bytes"]
    lines += [
        "",
        f"Of the HPTQ peak, {mib(h['tensor_bytes']):.0f} MiB are the model's tensors (the "
        f"float32 model's: {mib(f['tensor_bytes']):.0f} MiB, "
        f"{h['tensor_bytes'] / f['tensor_bytes']:.2f}x); start-up alone is {mib(fixed):.0f} MiB, "
        "the same for both, and bounds the ratio from below: even with weights of zero bytes "
        f"the peak ratio would be {fixed / f['peak_rss_median_bytes']:.2f}x. A process that "
        "held nothing but start-up and its model's tensors (no tokenizer, no activations, no "
        "allocator slack) would peak at "
        f"{(fixed + h['tensor_bytes']) / (fixed + f['tensor_bytes']):.2f}x: the embeddings "
        "stay in float in both, and at this model's size start-up weighs as much as the "
        "float32 decoder weights, so the ratio is bounded by what is shared, not by the "
        "quantized layers' bytes.",
    ]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="an HPTQ checkpoint to reuse (else quantize)")
    p.add_argument("--work", type=Path, help="where the folders go (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the folders written")
    p.add_argument("--model", help="the model quantized and written in float32 (default: the "
                   "protocol's); a small folder checks the script quickly")  # fmt: skip
    p.add_argument("--nsamples", type=int, help="calibration windows of the quantize run")
    p.add_argument("--seqlen", type=int, help="window length of calibration and evaluation")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--chars", type=int, default=12000, help="held-out characters evaluated")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes at once (each peak is its own process's; the times then overlap)",
    )
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        raise SystemExit("the peak memory is read with /usr/bin/time (GNU time); install it")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_load_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.machine(), "cpus": os.cpu_count(), "models": {}}
    try:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = work / "hptq"
            print(f"quantizing into {checkpoint} ...", flush=True)
            quantize(checkpoint, args)
        results["checkpoint"] = describe_checkpoint(checkpoint)
        float_dir = work / "float32"
        if not (float_dir / "config.json").is_file():
            _python(SAVE_FLOAT, str(float_dir), args.model or "")
        text = work / "held_out.txt"
        _python(HELD_OUT, str(text), str(args.chars))
        folders = {"hptq": checkpoint, "float32": float_dir}
        jobs = [(name, folder) for _ in range(args.runs) for name, folder in folders.items()]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            pending = [pool.submit(evaluate, folder, text, args.seqlen) for _, folder in jobs]
            resting = {name: pool.submit(at_rest, folder) for name, folder in folders.items()}
            done = [f.result() for f in pending]
            rest = {name: f.result() for name, f in resting.items()}
        evals: dict[str, list[dict]] = {k: [] for k in folders}
        for (name, _), result in zip(jobs, done):
            evals[name].append(result)
            print(f"{name}: {result}", flush=True)
        for name, folder in folders.items():
            peaks = [e["peak_rss_bytes"] for e in evals[name]]
            results["models"][name] = {
                "folder": str(folder) if args.keep or name == "hptq" and args.checkpoint else None,
                "disk_bytes": folder_bytes(folder),
                "peak_rss_bytes": peaks,
                "peak_rss_median_bytes": int(statistics.median(peaks)),
                "perplexity": evals[name][0]["perplexity"],
                "tokens": evals[name][0]["tokens"],
                "time_s": [e["time_s"] for e in evals[name]],
                **rest[name],
            }
    finally:
        if not args.keep:
            shutil.rmtree(work / "float32", ignore_errors=True)
            if args.checkpoint is None:
                shutil.rmtree(work / "hptq", ignore_errors=True)
    h, f = results["models"]["hptq"], results["models"]["float32"]
    results["ratio"] = h["peak_rss_median_bytes"] / f["peak_rss_median_bytes"]
    results["goal"] = GOAL
    results["chars"], results["runs"], results["jobs"] = args.chars, args.runs, args.jobs
    lines = report(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_load_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "bench_load_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
