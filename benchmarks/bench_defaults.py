"""GPTQ's default settings: column order, refinement and objective, run back to back.

On the protocol (SmolLM2-135M-Instruct, the protocol's calibration text, 64 x 512 windows,
seed 0, perplexity on the held-out text), ``latticequant quantize --method gptq --bits 4
--group-size 128`` runs once per setting in its own process, one after the other:

* ``--order natural`` (the default column order),
* ``--order act`` (with static groups, the default, the stored ``g_idx`` stays natural and the
  checkpoint is a ``desc_act=false`` GPTQ file),
* ``--order act --refine cd,scales``,
* ``--order act --objective float-outputs``,
* ``--order act --refine cd,scales --objective float-outputs``,

then, as reference figures of other methods on the same protocol, ``--method ssqr`` (its
defaults) and ``--method hptq --target-bits 3.125``. Every run writes a plain GPTQ checkpoint
except ssqr and hptq, whose formats are their own. Results go to docs/bench_defaults.json and
.md, rewritten after each run, so an interrupted run keeps what it measured.

    python benchmarks/bench_defaults.py                     # all runs (about an hour on 2 cores)
    python benchmarks/bench_defaults.py --only natural,act  # a subset
    python benchmarks/bench_defaults.py --nsamples 8        # a quick look

``--tables JSON`` rewrites the .md (and .json) from a results file; such a file may carry
``schedule`` and ``note`` (how its runs were actually scheduled, printed under the title) and
``times_comparable: false`` (its runs did not share the machine alike: no time ratios).

Times are the ``quantize_s`` of each run (calibration forwards and solves, without loading and
perplexity); compare them as ratios to the natural run of the same invocation.
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
DOCS = ROOT / "docs"
GPTQ = ["--method", "gptq", "--bits", "4", "--group-size", "128"]

#: name -> (table label, quantize arguments); the GPTQ settings compared.
SETTINGS = {
    "natural": ("`--order natural`", [*GPTQ, "--order", "natural"]),
    "act": ("`--order act`", [*GPTQ, "--order", "act"]),
    "act-refine": (
        "`--order act --refine cd,scales`",
        [*GPTQ, "--order", "act", "--refine", "cd,scales"],
    ),
    "act-float-outputs": (
        "`--order act --objective float-outputs`",
        [*GPTQ, "--order", "act", "--objective", "float-outputs"],
    ),
    "act-refine-float-outputs": (
        "`--order act --refine cd,scales --objective float-outputs`",
        [*GPTQ, "--order", "act", "--refine", "cd,scales", "--objective", "float-outputs"],
    ),
}
#: Other methods on the same protocol, kept as reference figures.
REFERENCE = {
    "ssqr": ("`--method ssqr`", ["--method", "ssqr"]),
    "hptq-3.125": (
        "`--method hptq --target-bits 3.125`",
        ["--method", "hptq", "--target-bits", "3.125"],
    ),
}
#: The order of the runs: the GPTQ baseline pair first, then the reference methods, then the
#: slower GPTQ settings.
ORDER = [
    "natural",
    "act",
    "ssqr",
    "hptq-3.125",
    "act-refine",
    "act-float-outputs",
    "act-refine-float-outputs",
]
#: Readers of plain GPTQ files load every setting above; the budget of the sentence under the
#: table is this multiple of the natural run's quantize time.
BUDGET = 1.5


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def run(name: str, args: list[str], out: Path, nsamples: int, seed: int) -> dict:
    cmd = [sys.executable, "-m", "latticequant", "quantize", *args]
    cmd += ["--nsamples", str(nsamples), "--seqlen", "512", "--seed", str(seed)]
    cmd += ["--json", "--overwrite", "--no-resume", "--out", str(out / name)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    (out / f"{name}.stderr").write_text(proc.stderr)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {tail}")
    (out / f"{name}.json").write_text(proc.stdout)
    payload = json.loads(proc.stdout)
    return {
        "args": args,
        "method": payload["method"],
        "config": payload["config"],
        "target": payload["target"],
        "ppl_before": payload["ppl_before"],
        "ppl_after": payload["ppl_after"],
        "quantize_s": payload["quantize_s"],
        "total_s": payload["total_s"],
        "wall_s": wall,
    }


def table(results: dict) -> list[str]:
    runs = results["runs"]
    base = runs.get("natural")
    lines = [
        "# GPTQ's default settings: column order, refinement, objective",
        "",
        "SmolLM2-135M-Instruct, GPTQ 4-bit g128 (asymmetric, static groups, the defaults), "
        f"{results['nsamples']} x 512 calibration windows with seed {results['seed']}, "
        "perplexity on the protocol's held-out text; each setting in its own process, "
        f"{results.get('schedule', 'one after the other')}, at commit {results['commit']}. "
        f"{results['machine']}, {results['cpus']} CPUs shared with other work: compare the "
        "times as ratios within this table, not as absolute seconds. Generated by "
        "`python benchmarks/bench_defaults.py`.",
        "",
        *([results["note"], ""] if results.get("note") else []),
        "| settings | ppl after (held-out) | quantize s | time / natural |",
        "|---|---|---|---|",
    ]
    #: False when the runs of an invocation did not share the machine alike (run side by side,
    #: one of them at a lower priority): then no time ratio is printed.
    timed = base is not None and results.get("times_comparable", True)
    for name, (label, _) in SETTINGS.items():
        r = runs.get(name)
        if r is None:
            lines.append(f"| {label} | not measured | | |")
            continue
        ratio = f"{r['quantize_s'] / base['quantize_s']:.2f}x" if timed else "–"
        lines.append(f"| {label} | {r['ppl_after']:.4f} | {r['quantize_s']:.1f} | {ratio} |")
    measured = [n for n in SETTINGS if n in runs]
    if measured:
        before = runs[measured[0]]["ppl_before"]
        lines += ["", f"Perplexity before quantization: {before:.4f}."]
        overall = min(measured, key=lambda n: runs[n]["ppl_after"])
        sentence = (
            "Every setting here writes a plain GPTQ checkpoint (act-order with static groups "
            "stores a natural `g_idx`, `desc_act=false`): transformers loads it; GPTQModel's "
            "own loader takes an asymmetric grid only as `--checkpoint-format gptq_v2` (it "
            "refuses asymmetric v1 files that GPTQModel did not write, docs/fold_readers.md), "
            "and vLLM's GPTQ path only symmetric 4/8-bit (asymmetric grids go to vLLM as "
            "compressed-tensors)."
        )
        if timed:
            inside = [n for n in measured if runs[n]["quantize_s"] <= BUDGET * base["quantize_s"]]
            best = min(inside, key=lambda n: runs[n]["ppl_after"])
            r = runs[best]
            sentence += (
                f" Within {BUDGET}x the natural run's quantize time the best is "
                f"{SETTINGS[best][0]}: perplexity {r['ppl_after']:.4f} against "
                f"{base['ppl_after']:.4f} for natural order, at "
                f"{r['quantize_s'] / base['quantize_s']:.2f}x its time."
            )
            if overall != best:
                o = runs[overall]
                sentence += (
                    f" The lowest perplexity measured, {o['ppl_after']:.4f}, is "
                    f"{SETTINGS[overall][0]}'s, at {o['quantize_s'] / base['quantize_s']:.2f}x."
                )
        elif len(measured) > 1:
            o = runs[overall]
            sentence += (
                " The times of this invocation do not compare; by perplexity the best setting "
                f"measured is {SETTINGS[overall][0]}, {o['ppl_after']:.4f}."
            )
        missing = [n for n in SETTINGS if n not in runs]
        if missing:
            sentence += f" Not measured: {'; '.join(SETTINGS[n][0] for n in missing)}."
        lines += ["", sentence]
    ref = results["reference"]["runs"]
    if ref:
        lines += [
            "",
            "## Reference figures of other methods",
            "",
            f"Same protocol, at commit {results['reference']['commit']}"
            + (f"; {results['reference']['note']}" if results["reference"].get("note") else "")
            + ".",
            "",
            "| settings | ppl after (held-out) | quantize s | time / natural GPTQ |",
            "|---|---|---|---|",
        ]
        for name, (label, _) in REFERENCE.items():
            r = ref.get(name)
            if r is None:
                continue
            ratio = f"{r['quantize_s'] / base['quantize_s']:.2f}x" if timed else "–"
            lines.append(f"| {label} | {r['ppl_after']:.4f} | {r['quantize_s']:.1f} | {ratio} |")
    return lines


def write(results: dict, out: Path) -> list[str]:
    lines = table(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_defaults.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "bench_defaults.md").write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="checkpoints and raw outputs (default: a temporary folder, removed)",
    )
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument(
        "--tables",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the .md (and .json) in --out from this results file",
    )
    args = p.parse_args(argv)
    if args.tables:
        print("\n".join(write(json.loads(args.tables.read_text()), args.out)))
        return 0
    names = [n for n in ORDER if not args.only or n in args.only.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_defaults_"))
    work.mkdir(parents=True, exist_ok=True)
    commit = git("rev-parse", "--short", "HEAD")
    if git("status", "--porcelain", "--", "latticequant"):
        commit += "+modified"
    results = {
        "commit": commit,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "shared_machine": True,
        "nsamples": args.nsamples,
        "seqlen": 512,
        "seed": args.seed,
        "runs": {},
        "reference": {"commit": commit, "runs": {}},
    }
    try:
        for name in names:
            print(f"{name} ...", flush=True)
            setting = SETTINGS.get(name) or REFERENCE[name]
            try:
                r = run(name, setting[1], work, args.nsamples, args.seed)
            except RuntimeError as exc:
                print(exc, flush=True)
                continue
            (results["runs"] if name in SETTINGS else results["reference"]["runs"])[name] = r
            print(
                f"  ppl {r['ppl_before']:.4f} -> {r['ppl_after']:.4f}, "
                f"quantize {r['quantize_s']:.1f} s",
                flush=True,
            )
            write(results, args.out)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(write(results, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
