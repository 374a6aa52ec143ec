"""Where a protocol run's time goes, before and after, beside the floor and GPTQModel.

One invocation runs, each in a child process of its own and one after another (nothing else
of this script shares the cores):

1. the floor: a plain float32 forward of the protocol model's decoder (no ``lm_head``, no
   hooks) over the same 64 x 512 calibration tokens, in batches of 8 windows and in one batch
   of 64 (the pipeline's one pass per block takes all windows at once);
2. latticequant at ``--before`` (a commit, checked out into a temporary worktree) and at this
   checkout, ``latticequant quantize FOLDER --method gptq --bits 4 --group-size 128 --no-sym
   --order act --no-eval --json``, both on the same float32 folder;
3. GPTQModel (4-bit g128, act-order, its defaults) on the same folder and windows, in the
   benchmark environment (``bash scripts/bench_env.sh``), as ``bench_e2e.py`` runs it.

Our runs' time is split into loading (the float folder, the tokenizer, the calibration
windows), forwards, Hessian accumulation, solves, the run state's writes (each block's
quantized tensors and outputs, for resuming) and the rest of ``quantize`` (capturing the first
block's inputs, writing the checkpoint). The commit before the split reports forwards with
the Hessians and the state writes in them. The two checkpoints are compared tensor by tensor.
Results go to docs/bench_speed.json and docs/bench_speed.md.

    bash scripts/bench_env.sh
    python benchmarks/bench_speed.py                        # about 15 minutes on 2 cores
    python benchmarks/bench_speed.py --before 72c33bb --no-gptqmodel
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

ARGS = [
    "--method", "gptq", "--bits", "4", "--group-size", "128", "--no-sym", "--order", "act",
    "--nsamples", "64", "--seqlen", "512", "--no-eval", "--json",
]  # fmt: skip
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"


def floor_job(model_dir: str, tokens_path: str) -> dict:
    """Seconds of the plain decoder forward over the calibration windows, two batchings."""
    import torch

    from latticequant.pipeline.models import load_model

    model, _ = load_model(model_dir)
    windows = torch.load(tokens_path)["windows"]
    decoder = model.model  # the blocks without the head, as the pipeline runs them
    out = {"threads": torch.get_num_threads(), "tokens": int(windows.numel())}
    with torch.inference_mode():
        decoder(input_ids=windows[:1])  # warm-up: first-call allocations and kernel choices
        for batch in (8, len(windows)):
            t0 = time.perf_counter()
            for i in range(0, len(windows), batch):
                decoder(input_ids=windows[i : i + batch])
            out[f"batch{batch}_s"] = time.perf_counter() - t0
    return out


def run_floor(model_dir: str, tokens: str) -> dict:
    code = (
        f"import json, sys; sys.path[:0] = [{str(ROOT)!r}, {str(HERE)!r}]; import bench_speed; "
        f"print(json.dumps(bench_speed.floor_job({model_dir!r}, {tokens!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"floor run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(source: Path, model_dir: str, out: Path) -> dict:
    """``latticequant quantize`` from the package in ``source``; its JSON and the wall time."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    cmd = [sys.executable, "-m", "latticequant", "quantize", model_dir, *ARGS, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(source))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"quantize in {source} failed: {proc.stderr.strip().splitlines()[-1:]}")
    payload = json.loads(proc.stdout)
    t = payload["timings"]
    blocks_s = sum(v for k, v in t.items() if k != "ranks")
    return {
        "process_wall_s": wall,
        "load_s": payload["load_s"],
        "quantize_s": payload["quantize_s"],
        "blocks_s": blocks_s,
        "other_s": payload["quantize_s"] - blocks_s,  # first inputs, checkpoint written
        "timings": t,
    }


def run_gptqmodel(inputs: dict, work: Path) -> dict:
    import bench_e2e

    job = {
        "tool": "gptqmodel", "config": "4g128", "model": inputs["model"],
        "tokens": inputs["tokens"], "out": str(work / "gptqmodel"), "eval_seqlen": 512,
    }  # fmt: skip
    t0 = time.perf_counter()
    row = bench_e2e.spawn(job, work / "gptqmodel.log", str(BENCH_PYTHON))
    row["process_wall_s"] = time.perf_counter() - t0  # with its perplexity through its loader
    return row


def _commit(source: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return proc.stdout.strip() + ("+changes" if dirty else "")


def markdown(res: dict) -> str:
    floor = res["floor"]
    n = floor["tokens"] // 512
    floor_s = min(floor["batch8_s"], floor[f"batch{n}_s"])
    lines = [
        "# Where a protocol run's time goes",
        "",
        f"SmolLM2-135M-Instruct from a float32 folder, GPTQ 4-bit g128 asymmetric, act-order, "
        f"{n} x 512 calibration tokens, no perplexity; {res['machine']}, "
        f"{res['cpus']} CPUs, torch {res['torch']}. One invocation of "
        f"`{res['command']}`, the runs one after another. Seconds.",
        "",
        "The floor, a plain float32 decoder forward over the same tokens (no head, no hooks): "
        f"{floor['batch8_s']:.1f} s in batches of 8 windows, "
        f"{floor[f'batch{n}_s']:.1f} s in one batch of {n}.",
        "",
        "| run | commit | load | forwards | Hessians | solves | state writes | first inputs "
        "+ checkpoint | load + quantize | forwards / floor | x GPTQModel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gq = res.get("gptqmodel")
    gq_wall = gq["wall_s"] if gq else None
    for name in ("before", "after"):
        r = res[name]
        t = r["timings"]
        fwd = t["forward_s"]
        hess = t.get("hessian_s")
        io = t.get("state_io_s")
        whole = r["load_s"] + r["quantize_s"]
        lines.append(
            f"| {name} | {r['commit']} | {r['load_s']:.1f} | {fwd:.1f}"
            f"{'' if hess is not None else ' (with Hessians and state writes)'} | "
            f"{'–' if hess is None else f'{hess:.1f}'} | {t['solve_s']:.1f} | "
            f"{'–' if io is None else f'{io:.1f}'} | {r['other_s']:.1f} | {whole:.1f} | "
            f"{fwd / floor_s:.2f} | {'–' if not gq_wall else f'{whole / gq_wall:.2f}'} |"
        )
    if gq:
        lines.append(
            f"| GPTQModel {gq.get('version', '')} | – | {gq['load_s']:.1f} | – | – | – | – | – | "
            f"{gq['wall_s']:.1f} (quantize {gq['quantize_s']:.1f}, save {gq['save_s']:.1f}) | – "
            f"| 1.00 |"
        )
    same, total = res["identical"]
    lines += [
        "",
        f"Checkpoints before and after: {same} of {total} tensors identical.",
        f"`forwards / floor` sets the forwards against the faster floor ({floor_s:.1f} s); "
        "`load + quantize` is the process's own clock from reading the folder to the written "
        "checkpoint (GPTQModel: its load, quantize and save), without interpreter start-up.",
    ]
    if gq:
        lines.append(
            f"GPTQModel's perplexity through its own loader: {gq['ppl']:.4f} (symmetric grid, "
            "its defaults)."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="72c33bb", help="commit to compare with (default 72c33bb)")
    p.add_argument("--no-gptqmodel", action="store_true", help="skip the GPTQModel run")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--cache", type=Path, default=None, help="where the float32 folder is kept")
    args = p.parse_args(argv)
    if not args.no_gptqmodel and not BENCH_PYTHON.is_file():
        raise SystemExit("no benchmark environment: run `bash scripts/bench_env.sh` first, or "
                         "pass --no-gptqmodel")  # fmt: skip
    check = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", args.before],
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode != 0:
        raise SystemExit(f"--before {args.before}: not a commit of this repository")
    import bench_distributed
    import bench_e2e
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    old = work / "before-src"
    try:
        inputs = bench_e2e.prepare_inputs(work, 64, 512, 0, args.cache)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.before], check=True, capture_output=True)  # fmt: skip
        res = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "command": "python benchmarks/bench_speed.py" + "".join(
                f" {a}" for a in (argv if argv is not None else sys.argv[1:])
            ),
        }  # fmt: skip
        print("floor ...", flush=True)
        res["floor"] = run_floor(inputs["model"], inputs["tokens"])
        for name, source in (("before", old), ("after", ROOT)):
            print(f"{name} ...", flush=True)
            res[name] = run_ours(source, inputs["model"], work / name)
            res[name]["commit"] = _commit(source)
        res["identical"] = bench_distributed.same_tensors(work / "before", work / "after")
        if not args.no_gptqmodel:
            print("GPTQModel ...", flush=True)
            res["gptqmodel"] = run_gptqmodel(inputs, work)
        args.out.mkdir(parents=True, exist_ok=True)
        for path, text in (
            (args.out / "bench_speed.json", json.dumps(res, indent=1) + "\n"),
            (args.out / "bench_speed.md", markdown(res)),
        ):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        print(markdown(res))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
