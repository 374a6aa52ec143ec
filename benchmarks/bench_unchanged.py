"""Figures unchanged by a refactoring: the same protocol runs on an earlier commit and on this
checkout, in one invocation.

For each setting (GPTQ 4-bit g128 act-order, SSQR's defaults, HPTQ at 3.125 bits; seed 0, the
protocol's model, calibration and held-out text), ``latticequant quantize`` runs in a worktree of
``--before`` (a commit, made with ``git worktree add`` in a temporary folder) and then in this
checkout, each in its own process; the perplexities after quantization are compared to the fourth
decimal. Results go to docs/bench_unchanged.json and .md, rewritten after each run.

    python benchmarks/bench_unchanged.py --before 72c33bb            # about 30 min on 2 cores
    python benchmarks/bench_unchanged.py --before 72c33bb --only gptq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SETTINGS = {
    "gptq": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--order", "act"],
    "ssqr": ["--method", "ssqr"],
    "hptq": ["--method", "hptq", "--target-bits", "3.125"],
}
AFTER = re.compile(r"^perplexity after:\s*([0-9.]+)", re.M)
BEFORE = re.compile(r"^perplexity before:\s*([0-9.]+)", re.M)


def _quantize(tree: Path, args: list[str], out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "latticequant", "quantize", *args, "--seed", "0", *extra,
           "--out", str(out), "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after, before = AFTER.search(proc.stdout), BEFORE.search(proc.stdout)
    if proc.returncode != 0 or after is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"bench_unchanged: {' '.join(args)} failed in {tree}: {' | '.join(tail)}")
    return {
        "ppl_after": float(after.group(1)),
        "ppl_before": float(before.group(1)) if before else None,
        "wall_s": round(wall, 1),
        "command": "latticequant " + " ".join(cmd[3:]),
    }


def _tree_commit(git: list[str]) -> str:
    """HEAD, with ``+`` when tracked files differ from it."""

    def out(*args: str) -> str:
        return subprocess.run([*git, *args], capture_output=True, text=True).stdout.strip()

    dirty = out("status", "--porcelain", "--untracked-files=no")
    return out("rev-parse", "--short", "HEAD") + ("+" if dirty else "")


def write_tables(results: dict, path: Path) -> None:
    lines = [
        "# Protocol figures before and after a refactoring",
        "",
        f"`python benchmarks/bench_unchanged.py --before {results['before']}` on "
        f"{results['machine']}: each setting quantized by commit `{results['before']}` and by "
        "this checkout (the commit in the last column; `+` when it had uncommitted changes), "
        "one after the other in one process each (seed 0; held-out perplexity of the "
        "protocol). Rows of later invocations with `--only` replace their own rows.",
        "",
        "| setting | before | after | equal to 4 decimals | after: commit |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        b, a = row.get("before", {}).get("ppl_after"), row.get("after", {}).get("ppl_after")
        same = "" if a is None or b is None else ("yes" if f"{a:.4f}" == f"{b:.4f}" else "**no**")
        fb = "" if b is None else f"{b:.4f}"
        fa = "" if a is None else f"{a:.4f}"
        commit = row.get("after", {}).get("commit", "")
        lines.append(f"| `{' '.join(SETTINGS[name])}` | {fb} | {fa} | {same} | `{commit}` |")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit")
    p.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings")
    p.add_argument("--json", default=str(DOCS / "bench_unchanged.json"))
    p.add_argument("extra", nargs="*", help="after --: more quantize arguments for both")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise SystemExit(f"bench_unchanged: unknown {bad}; settings: {', '.join(SETTINGS)}")
    git = ["git", "-C", str(ROOT)]
    try:
        before = subprocess.run([*git, "rev-parse", "--short", args.before], check=True,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except subprocess.CalledProcessError:
        raise SystemExit(f"bench_unchanged: {args.before!r} is not a commit here") from None
    after = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    results = {"before": before, "after": after + "+", "rows": {},
               "machine": f"{platform.machine()}, {os.cpu_count()} cores"}  # fmt: skip
    out_json = Path(args.json)
    if out_json.exists():  # rows of an earlier invocation against the same commit are kept
        earlier = json.loads(out_json.read_text())
        if earlier.get("before") == before:
            results["rows"] = {k: v for k, v in earlier["rows"].items() if k not in names}
    work = Path(tempfile.mkdtemp(prefix="bench_unchanged."))
    tree = work / "before"
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), before], check=True,
                   capture_output=True)  # fmt: skip
    try:
        for name in names:
            row = results["rows"].setdefault(name, {})
            for side, root in (("before", tree), ("after", ROOT)):
                row[side] = _quantize(root, SETTINGS[name], work / f"{name}-{side}", args.extra)
                if side == "after":  # the tree as that run read it (clean or not)
                    row[side]["commit"] = _tree_commit(git)
                tmp = out_json.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(results, indent=1))
                os.replace(tmp, out_json)
                write_tables(results, out_json.with_suffix(".md"))
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
