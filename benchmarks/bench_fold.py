"""Rotations every reader runs: folded, folded+online and per-layer Hadamard, side by side.

On the protocol (SmolLM2-135M-Instruct, 64 x 512 calibration windows of the protocol text, seed
0, GPTQ, act-order, asymmetric grids), each run is one ``latticequant quantize`` process:
every grid of ``GRIDS`` x every rotation of ``ROTATIONS`` x every objective of ``OBJECTIVES``,
scored on the held-out 20% of the protocol text (``perplexity after``) and on the second text of
``bench_decoders.py`` (Debian's licence texts, by ``latticequant eval --text``). Results go to
docs/bench_fold.json and .md, rewritten after each run; a rerun skips what is measured.

    python benchmarks/bench_fold.py                             # all runs (hours on 2 cores)
    python benchmarks/bench_fold.py --runs 3g128-folded-float-outputs,3g128-none-layer
    python benchmarks/bench_fold.py --list
    python benchmarks/bench_fold.py --runs 3g128-folded-float-outputs+hessian+refine

A run name is ``GRID-ROTATION-OBJECTIVE``, for the runs listed in ``EXTRA`` followed by
``+hessian`` (``--scale-method hessian``: each group's scale fitted on the Hessian-weighted
error before the decode, docs/core.md) and/or ``+refine`` (``--refine cd,scales``: coordinate
descent on the codes, then the scales re-solved, docs/decoders.md). Each finished run is
merged into the JSON on disk, so invocations running side by side keep each other's rows.

Readers, from the format each run writes: ``none`` and ``folded`` write a plain GPTQ checkpoint
with nothing to apply at run time; ``folded+online`` and ``hadamard`` keep an online rotation
and load in latticequant only.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
DOCS = ROOT / "docs"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
GRIDS = {"3g128": ("3", "128"), "2g64": ("2", "64"), "4g128": ("4", "128")}
ROTATIONS = ("none", "folded", "folded+online", "hadamard")
OBJECTIVES = ("layer", "float-outputs")
#: settings a run name may add, in this order: ``+hessian`` fits every group's scale on the
#: Hessian-weighted error (``--scale-method hessian``), ``+refine`` refines the decode
SUFFIXES = {
    "+hessian": (["--scale-method", "hessian"], "Hessian-weighted scales"),
    "+refine": (["--refine", "cd,scales"], "refine cd,scales"),
}
#: runs also measured with those settings (the folded goal's best settings)
EXTRA = (
    "3g128-folded-float-outputs+refine",
    *(f"3g128-{r}-layer+hessian" for r in ROTATIONS),
    "4g128-none-layer+hessian",
    "4g128-folded-layer+hessian",
    *(f"2g64-{r}-layer+hessian" for r in ROTATIONS),
    "3g128-folded-float-outputs+hessian",
    "3g128-folded-float-outputs+hessian+refine",
)
READERS = {  # by what each rotation writes; run: latticequant here, transformers in the tests
    "none": "a plain asymmetric GPTQ v1 file: latticequant, transformers; GPTQModel's loader "
    "only as gptq_v2 or symmetric (docs/fold_readers.md, tiny models)",
    "folded": "the same plain file, nothing to apply at run time: latticequant, transformers; "
    "GPTQModel as gptq_v2 or symmetric (docs/fold_readers.md, tiny models); in "
    "compressed-tensors, transformers (tests/pipeline/test_fold.py)",
    "folded+online": "latticequant; in compressed-tensors, compressed-tensors' "
    "apply_transform_config (docs/compressed_tensors.md)",
    "hadamard": "latticequant only (every layer's online rotation)",
}
AFTER = re.compile(r"^perplexity after:\s*([0-9.]+)", re.M)


def run_names() -> list[str]:
    names = [f"{g}-{r}-{o}" for g in GRIDS for r in ROTATIONS for o in OBJECTIVES]
    return names + list(EXTRA)


def split_settings(name: str) -> tuple[str, list[str]]:
    """``GRID-ROTATION-OBJECTIVE`` and the suffixes of SUFFIXES the name adds, in order."""
    base, *extra = name.split("+")
    if base.endswith("-folded"):  # the rotation "folded+online" holds a plus itself
        base, extra = base + "+" + extra[0], extra[1:]
    return base, ["+" + x for x in extra]


def quantize_args(name: str) -> list[str]:
    name, extra = split_settings(name)
    grid, rest = name.split("-", 1)
    rotate, objective = rest.rsplit("-", 1) if not rest.endswith("float-outputs") else (
        rest[: -len("-float-outputs")], "float-outputs")  # fmt: skip
    bits, group = GRIDS[grid]
    args = ["--method", "gptq", "--bits", bits, "--group-size", group, "--order", "act"]
    args += ["--seed", "0", "--rotate", rotate]
    if objective == "float-outputs":
        args += ["--objective", "float-outputs"]
    for suffix in extra:
        args += SUFFIXES[suffix][0]
    return args


def _second_text(work: Path) -> Path:
    from bench_decoders import second_text

    path = work / "second.txt"
    path.write_text(second_text())
    return path


def run_one(name: str, work: Path, second: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "latticequant", "quantize", *quantize_args(name),
           "--out", str(out), "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    m = AFTER.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {"error": " | ".join(tail), "command": " ".join(cmd[3:])}
    ev = subprocess.run(
        [sys.executable, "-m", "latticequant", "eval", str(out), "--text", str(second), "--json"],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    second_ppl = None
    if ev.returncode == 0:
        second_ppl = json.loads(ev.stdout[ev.stdout.index("{") :]).get("perplexity")
    return {
        "ppl_heldout": float(m.group(1)),
        "ppl_second": second_ppl,
        "wall_s": round(wall, 1),
        "command": "latticequant " + " ".join(cmd[3:]),
    }


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# Folded rotations against the per-layer online one",
        "",
        f"`python benchmarks/bench_fold.py` on {results.get('machine', '?')}: GPTQ, act-order, "
        "asymmetric, seed 0, the protocol's calibration; perplexity on the protocol's held-out "
        "text and on the second text (Debian's licence texts). Readers: what loads the "
        "checkpoint each rotation writes (by its format). Wall seconds: the whole run (the "
        "quantization and both perplexities), on shared cores, often beside other runs; the "
        "float-outputs rows above 3000 s ran before its one-pass path (docs/targets.md).",
        "",
        "| grid | rotation | objective | held-out | second text | wall s | readers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in run_names():
        r = results["runs"].get(name)
        if r is None:
            continue
        base, extra = split_settings(name)
        grid, rest = base.split("-", 1)
        rotate = next(x for x in sorted(ROTATIONS, key=len, reverse=True) if rest.startswith(x))
        objective = " + ".join([rest[len(rotate) + 1 :], *(SUFFIXES[x][1] for x in extra)])
        if "error" in r:
            lines.append(f"| {grid} | {rotate} | {objective} | error: {r['error']} | | | |")
            continue
        sec = "" if r.get("ppl_second") is None else f"{r['ppl_second']:.3f}"
        lines.append(
            f"| {grid} | {rotate} | {objective} | {r['ppl_heldout']:.3f} | {sec} | "
            f"{r['wall_s']:.0f} | {READERS[rotate]} |"
        )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _merge(out_json: Path, name: str, result: dict, machine: str) -> dict:
    """The results on disk with ``name``'s row set, written atomically (and the table): another
    invocation's rows, saved since this one started, are kept."""
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    results["machine"] = machine
    results["runs"][name] = result
    tmpj = out_json.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(results, indent=1))
    os.replace(tmpj, out_json)
    write_table(results, out_json.with_suffix(".md"))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", help="comma-separated names or patterns (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--redo", action="store_true", help="rerun runs that already have results")
    p.add_argument("--json", default=str(DOCS / "bench_fold.json"))
    args = p.parse_args(argv)
    names = run_names()
    if args.runs:
        pats = [x for x in args.runs.split(",") if x]
        picked = [n for pat in pats for n in names if fnmatch.fnmatch(n, pat)]
        missing = [pat for pat in pats if not any(fnmatch.fnmatch(n, pat) for n in names)]
        if missing:
            raise SystemExit(f"bench_fold: no run matches {missing}; see --list")
        names = list(dict.fromkeys(picked))
    if args.list:
        print("\n".join(names))
        return
    out_json = Path(args.json)
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory(prefix="bench_fold.") as tmp:
        work = Path(tmp)
        second = _second_text(work)
        for name in names:
            if name in results["runs"] and "error" not in results["runs"][name] and not args.redo:
                continue
            result = run_one(name, work, second)
            results = _merge(out_json, name, result, results["machine"])
            print(name, result, flush=True)
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
