"""End to end on the protocol: RTN, GPTQ and Babai beside GPTQModel, perplexity and wall time.

The protocol of docs/protocol.md: SmolLM2-135M-Instruct, 64 calibration windows of 512 tokens drawn
with seed 0 from the first 80% of the ``pydoc_data`` text, perplexity on the held-out 20%.
For each configuration (4-bit g128, 3-bit g128, 4-bit per channel; act-order) each tool
quantizes the model from scratch on the same windows; the wall time covers the whole run
(loading the float model, calibration passes, solves, writing the checkpoint), and perplexity
is measured with the same function (``latticequant.pipeline.data.perplexity``) on every model.

Every run happens in a child process of its own, so that no tool's imports (GPTQModel patches
transformers and safetensors when imported), memory or threads leak into another's timing.
Results accumulate in a JSON file keyed by tool and configuration, so parts can be run
separately; the markdown table is rebuilt from that file after each run. A figure is only
comparable with the GPTQModel figure of the same invocation (see ``run_id`` in the JSON).

    .venv-bench/bin/python benchmarks/bench_e2e.py                       # everything (long)
    .venv-bench/bin/python benchmarks/bench_e2e.py --configs 4g128 --tools gptq,gptqmodel
    .venv-bench/bin/python benchmarks/bench_e2e.py --cross-load          # + each loader on the
                                                                         #   other's checkpoint
    .venv-bench/bin/python benchmarks/bench_e2e.py --smoke               # tiny piece, minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the repository's latticequant, installed or not
sys.path.insert(0, str(HERE))

log = logging.getLogger("bench_e2e")

CONFIGS: dict[str, tuple[int, int]] = {"4g128": (4, 128), "3g128": (3, 128), "4pc": (4, -1)}
OURS = ("rtn", "gptq", "babai")
TOOLS = ("float",) + OURS + ("gptqmodel",)
TOOL_LABELS = {
    "float": "float32",
    "rtn": "latticequant RTN",
    "gptq": "latticequant GPTQ",
    "babai": "latticequant Babai",
    "gptqmodel": "GPTQModel",
}


# --------------------------------------------------------------------------------------------
# shared inputs
# --------------------------------------------------------------------------------------------


def prepare_inputs(work: Path, nsamples: int, seqlen: int, seed: int, cache) -> dict:
    """The float32 model folder both tools start from, and the tokens, made once and reused.

    The folder holds the GGUF's weights dequantized by latticequant's loader, so every tool
    quantizes the same float32 model, and each whole run starts by loading that folder.
    """
    import gptqmodel_ref as ref

    folder = ref.protocol_model_folder(cache)
    path = work / f"tokens-n{nsamples}-l{seqlen}-s{seed}.pt"
    if not path.is_file():
        from transformers import AutoTokenizer

        from latticequant.pipeline import data

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        ids = data.tokenize(tokenizer, data.load_text(None))
        calib, heldout = data.split_ids(ids)
        windows = data.calibration_windows(calib, nsamples, seqlen, seed)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"windows": windows, "heldout": heldout, "n_tokens": len(ids)}, tmp)
        os.replace(tmp, path)
        log.info(
            "%d tokens: %d calibration windows of %d, %d held out",
            len(ids),
            nsamples,
            seqlen,
            len(heldout),
        )
    return {"model": str(folder), "tokens": str(path)}


def checkpoint_dir(work: Path, tool: str, config: str, sym: bool) -> Path:
    grid = "sym" if sym else "asym"
    suffix = "" if tool == "gptqmodel" else f"-{grid}"
    return work / "checkpoints" / f"{tool}-{config}{suffix}"


# --------------------------------------------------------------------------------------------
# one job, in a child process
# --------------------------------------------------------------------------------------------


def _ppl(model, heldout: torch.Tensor, seqlen: int) -> float:
    from latticequant.pipeline.data import perplexity

    return perplexity(model, heldout, seqlen=seqlen, progress=False)


def _our_loader_ppl(folder: Path, heldout: torch.Tensor, seqlen: int) -> float:
    from latticequant.checkpoint import load_quantized

    model = load_quantized(str(folder))
    return _ppl(model, heldout, seqlen)


def _gptqmodel_loader_ppl(folder: Path, heldout: torch.Tensor, seqlen: int) -> float:
    import gptqmodel_ref as ref

    model = ref.load_checkpoint(folder)
    return _ppl(model, heldout, seqlen)


def run_job(job: dict) -> dict:
    """Run one job (a float evaluation, one tool on one configuration, or one loader on one
    checkpoint); return its row."""
    torch.manual_seed(0)
    tokens = torch.load(job["tokens"])
    windows: torch.Tensor = tokens["windows"]
    heldout: torch.Tensor = tokens["heldout"]
    if job.get("eval_tokens"):
        heldout = heldout[: job["eval_tokens"]]
    eval_seqlen = int(job["eval_seqlen"])
    tool = job["tool"]
    row: dict = {
        "tool": tool,
        "config": job.get("config"),
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "eval_tokens": int(len(heldout)),
        "torch_threads": torch.get_num_threads(),
    }

    if tool == "float":
        from latticequant.pipeline.models import load_model

        t0 = time.perf_counter()
        model, _ = load_model(job["model"])
        row["load_s"] = time.perf_counter() - t0
        row["ppl"] = _ppl(model, heldout, eval_seqlen)
        return row

    out = Path(job["out"])
    if tool == "load":  # one loader on one existing checkpoint
        loader = _gptqmodel_loader_ppl if job["loader"] == "gptqmodel" else _our_loader_ppl
        row.update({"checkpoint": str(out), "loader": job["loader"]})
        row["ppl"] = loader(out, heldout, eval_seqlen)
        return row

    bits, group_size = CONFIGS[job["config"]]
    row.update({"bits": bits, "group_size": group_size, "checkpoint": str(out)})

    if tool == "gptqmodel":
        import gptqmodel_ref as ref

        run = ref.quantize_model(
            job["model"],
            windows.tolist(),
            out,
            bits=bits,
            group_size=group_size,
            desc_act=True,
            overwrite=True,
        )
        row.update(
            {
                "wall_s": run.load_s + run.quantize_s + run.save_s,
                "load_s": run.load_s,
                "quantize_s": run.quantize_s,
                "save_s": run.save_s,
                "settings": run.settings,
                "version": run.version,
            }
        )
        row["ppl"] = _gptqmodel_loader_ppl(out, heldout, eval_seqlen)
        row["loader"] = "gptqmodel"
        return row

    import latticequant as lq
    from latticequant.pipeline.models import load_model

    cfg = lq.QuantConfig(
        bits=bits,
        group_size=group_size,
        sym=bool(job["sym"]),
        order="natural" if tool == "rtn" else "act",
        damp=float(job["damp"]),
    )
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    model, tokenizer = load_model(job["model"])
    t1 = time.perf_counter()
    spec = lq.RunSpec(
        method=tool,
        config=cfg,
        calibration=lq.CalibrationSpec(nsamples=windows.shape[0], seqlen=windows.shape[1]),
        output=lq.OutputSpec(
            str(out), job.get("checkpoint_format", "gptq"), overwrite=True, resume=False
        ),
        execution=lq.ExecutionSpec(progress=False),
    )
    lq.quantize_model(model, lq.Calibration(windows, tokenizer=tokenizer), lq.prepare(model, spec))
    t2 = time.perf_counter()
    row.update(
        {
            "wall_s": t2 - t0,
            "load_s": t1 - t0,
            "quantize_s": t2 - t1,  # calibration passes, solves and writing the checkpoint
            "settings": {
                "sym": cfg.sym,
                "order": cfg.order,
                "static_groups": cfg.static_groups,
                "damp": cfg.damp,
                "block_size": cfg.block_size,
                "checkpoint_format": job.get("checkpoint_format", "gptq"),
            },
        }
    )
    # The model fed forward exactly what the checkpoint stores (the pipeline writes the
    # dequantized stored tensors back); --cross-load reloads the checkpoint with both loaders.
    row["ppl"] = _ppl(model, heldout, eval_seqlen)
    row["loader"] = "in memory"
    return row


class JobFailed(RuntimeError):
    """A child run failed; ``reason`` is the last line of its log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def spawn(job: dict, log_path: Path, python: str) -> dict:
    """Run ``job`` in a fresh ``python`` interpreter; its output goes to ``log_path``."""
    job_path = log_path.with_suffix(".job.json")
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "w") as fh:
        proc = subprocess.run(
            [python, str(Path(__file__).resolve()), "--job", str(job_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            env=env,
            check=False,
        )
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise JobFailed(
            tail[-1] if tail else f"exit {proc.returncode}",
            f"{job['tool']} {job.get('config')} failed (exit {proc.returncode}); "
            f"log {log_path}:\n" + "\n".join(tail),
        )
    return json.loads(result_path.read_text())


def job_main(job_path: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    job = json.loads(job_path.read_text())
    row = run_job(job)
    result_path = job_path.with_name(job_path.name.replace(".job.json", ".result.json"))
    tmp = result_path.with_name(f".{result_path.name}.tmp")
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, result_path)
    return 0


# --------------------------------------------------------------------------------------------
# comparison of checkpoints and the table
# --------------------------------------------------------------------------------------------


def compare_codes(a: Path, b: Path) -> dict | None:
    """How far two GPTQ checkpoints agree: identical packed codes, scales and zeros?"""
    from safetensors import safe_open

    fa, fb = a / "model.safetensors", b / "model.safetensors"
    if not (fa.is_file() and fb.is_file()):
        return None
    same_words = total_words = 0
    layers = identical_layers = 0
    with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
        keys = [k for k in ha.keys() if k.endswith(".qweight")]
        for key in keys:
            prefix = key[: -len(".qweight")]
            if f"{key}" not in hb.keys():
                return None
            qa, qb = ha.get_tensor(key), hb.get_tensor(key)
            if qa.shape != qb.shape:
                return None
            eq = int((qa == qb).sum())
            same_words += eq
            total_words += qa.numel()
            layers += 1
            same = eq == qa.numel() and all(
                torch.equal(ha.get_tensor(f"{prefix}.{p}"), hb.get_tensor(f"{prefix}.{p}"))
                for p in ("scales", "qzeros")
            )
            identical_layers += int(same)
    if total_words == 0:
        return None
    return {
        "qweight_words_equal": same_words / total_words,
        "identical_layers": identical_layers,
        "layers": layers,
    }


def environment() -> dict:
    from gptqmodel_ref import gptqmodel_version

    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gptqmodel": gptqmodel_version(),
    }


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(results: dict) -> str:
    rows = results["rows"]
    env = results.get("env", {})
    proto = results.get("protocol", {})
    lines = [
        "# End-to-end benchmark on the protocol",
        "",
        f"SmolLM2-135M-Instruct, {proto.get('nsamples', 64)} calibration windows of "
        f"{proto.get('seqlen', 512)} tokens (seed {proto.get('seed', 0)}) from the "
        "`pydoc_data` text, perplexity on the held-out 20% "
        f"(windows of {proto.get('eval_seqlen', 512)}"
        + (f", first {proto['eval_tokens']} tokens only" if proto.get("eval_tokens") else "")
        + "), as in `docs/protocol.md`. Every run starts from the same float32 copy of the model. "
        "Wall time: the whole run of each tool (loading that float model, calibration "
        "passes, solves, writing the checkpoint), each in a child process of its own. "
        "Perplexity: our models as quantized in memory (they carry exactly the stored, "
        "dequantized weights), GPTQModel's loaded back by GPTQModel (`gptq_torch` kernel, "
        "float32); with `--cross-load` every checkpoint is also loaded by both loaders. The "
        "same perplexity function everywhere.",
        "",
        f"Generated by `benchmarks/bench_e2e.py` with torch {env.get('torch', '?')} on "
        f"{env.get('cpu_count', '?')} cores, GPTQModel {env.get('gptqmodel') or '–'}. "
        "Ratios compare with the GPTQModel run of the same invocation only (column `run`); "
        "timings within about 20% are noise on this machine.",
        "",
    ]
    float_row = rows.get("float")
    if float_row:
        lines += [f"Float32 perplexity: {_fmt(float_row['ppl'])}.", ""]
    header = (
        "| config | tool | grid | wall s | x GPTQModel | ppl | ppl, latticequant loader "
        "| ppl, GPTQModel loader | run |"
    )
    lines += [header, "|" + "---|" * 9]
    load_errors: list[str] = []
    for config in CONFIGS:
        ref = rows.get(f"gptqmodel/{config}")
        for key in sorted(
            (k for k in rows if k.split("/")[1:2] == [config]),
            key=lambda k: (TOOLS.index(k.split("/")[0]), k),
        ):
            r = rows[key]
            ratio = None
            if ref and ref.get("run_id") == r.get("run_id") and ref.get("wall_s"):
                ratio = r["wall_s"] / ref["wall_s"]
            grid = "sym" if r.get("settings", {}).get("sym") else "asym"
            errors = r.get("load_errors", {})

            def loaded(loader: str, r=r, errors=errors, key=key) -> str:
                if loader in errors:
                    load_errors.append(f"{key}, {loader} loader: {errors[loader]}")
                    return "error"
                return _fmt(r.get(f"ppl_{loader}_loader"))

            lines.append(
                f"| {config} | {TOOL_LABELS[r['tool']]} | {grid} | "
                f"{_fmt(r.get('wall_s'), '.0f')} | {_fmt(ratio)} | {_fmt(r.get('ppl'))} | "
                f"{loaded('latticequant')} | {loaded('gptqmodel')} | {r.get('run_id', '')} |"
            )
    if load_errors:
        lines += ["", "Loader errors:", ""] + [f"- {e}" for e in load_errors]
    agree = results.get("gptq_vs_babai", {})
    if agree:
        lines += [
            "",
            "Babai against GPTQ (same configuration, same windows): share of identical packed "
            "code words, and layers whose codes, scales and zeros are all identical.",
            "",
            "| config | grid | code words equal | identical layers |",
            "|---|---|---|---|",
        ]
        for key, a in sorted(agree.items()):
            config, grid = key.split("/")
            lines.append(
                f"| {config} | {grid} | {100 * a['qweight_words_equal']:.2f}% | "
                f"{a['identical_layers']}/{a['layers']} |"
            )
    lines.append("")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _csv(allowed: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {bad or text!r}; choose from {', '.join(allowed)}"
            )
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--configs",
        type=_csv(tuple(CONFIGS)),
        default=list(CONFIGS),
        help=f"comma list of {', '.join(CONFIGS)} (default all)",
    )
    ap.add_argument(
        "--tools",
        type=_csv(TOOLS),
        default=list(TOOLS),
        help=f"comma list of {', '.join(TOOLS)} (default all)",
    )
    ap.add_argument(
        "--sym",
        action="store_true",
        help="our methods on a symmetric grid (as GPTQModel); default asymmetric",
    )
    ap.add_argument("--damp", type=float, default=0.01, help="our methods' relative damping")
    ap.add_argument(
        "--checkpoint-format",
        choices=("gptq", "gptq_v2"),
        default="gptq",
        help="format of our checkpoints; GPTQModel loads asymmetric ones only as "
        "gptq_v2 (default gptq)",
    )
    ap.add_argument(
        "--cross-load",
        action="store_true",
        help="also load each checkpoint with the other tool's loader",
    )
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="evaluate on the first N held-out tokens only (smoke tests)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run: 4 windows of 128, 2048 eval tokens, outputs under /tmp",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "bench_e2e",
        help="checkpoints, logs and tokens (default runs/bench_e2e)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the float32 copy of the model that every run loads is kept",
    )
    ap.add_argument(
        "--results",
        type=Path,
        default=None,
        help="JSON file the rows accumulate in (default WORK/results.json)",
    )
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help="markdown table (default docs/benchmark_e2e.md, WORK/table.md if --smoke)",
    )
    ap.add_argument("--fresh", action="store_true", help="forget earlier rows in the results file")
    ap.add_argument(
        "--ours-python",
        default=None,
        help="interpreter for latticequant's runs (default: the one outside the "
        "benchmark venv, so GPTQModel's dependencies are not imported)",
    )
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 4), min(args.seqlen, 128)
        args.eval_tokens = args.eval_tokens or 2048
        args.eval_seqlen = min(args.eval_seqlen, 512)
        if args.work == ROOT / "runs" / "bench_e2e":
            args.work = Path("/tmp/latticequant-bench-e2e-smoke")
    args.results = args.results or args.work / "results.json"
    if args.md is None:
        args.md = args.work / "table.md" if args.smoke else ROOT / "docs" / "benchmark_e2e.md"
    return args


def _base_python() -> str:
    """The interpreter outside the benchmark venv, where latticequant runs as users run it."""
    if sys.prefix != sys.base_prefix:
        base = getattr(sys, "_base_executable", None)
        if base and os.path.exists(base):
            return base
    return sys.executable


def row_key(tool: str, config: str | None, sym: bool) -> str:
    if config is None:
        return tool
    return f"{tool}/{config}" + ("/sym" if sym and tool in OURS else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job is not None:
        return job_main(args.job)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    needs_ref = "gptqmodel" in args.tools or args.cross_load
    if needs_ref:
        from gptqmodel_ref import gptqmodel_version

        if gptqmodel_version() is None:
            print(
                "bench_e2e: GPTQModel is not installed in this interpreter; run "
                "`bash scripts/bench_env.sh` and use .venv-bench/bin/python, or leave out "
                "the gptqmodel tool and --cross-load",
                file=sys.stderr,
            )
            return 2
    ours_python = args.ours_python or _base_python()
    ref_python = sys.executable
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "logs").mkdir(exist_ok=True)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    inputs = prepare_inputs(args.work, args.nsamples, args.seqlen, args.seed, args.cache)

    results = {"rows": {}, "gptq_vs_babai": {}}
    if args.results.is_file() and not args.fresh:
        results = json.loads(args.results.read_text())
        results.setdefault("rows", {})
        results.setdefault("gptq_vs_babai", {})
    results["env"] = environment()
    results["env"]["ours_python"] = ours_python
    results["protocol"] = {
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "eval_seqlen": args.eval_seqlen,
        "eval_tokens": args.eval_tokens,
    }
    common = {
        **inputs,
        "eval_tokens": args.eval_tokens,
        "eval_seqlen": args.eval_seqlen,
        "sym": args.sym,
        "damp": args.damp,
        "checkpoint_format": args.checkpoint_format,
    }

    def save() -> None:
        _atomic_write(args.results, json.dumps(results, indent=2) + "\n")
        _atomic_write(args.md, markdown(results))

    failures = 0

    def launch(job: dict, name: str) -> dict | None:
        nonlocal failures
        python = (
            ref_python
            if job["tool"] == "gptqmodel" or job.get("loader") == "gptqmodel"
            else (ours_python)
        )
        log.info("running %s", name)
        t0 = time.perf_counter()
        try:
            row = spawn({**common, **job}, args.work / "logs" / f"{name}.log", python)
        except JobFailed as exc:
            log.error("%s", exc)
            if job["tool"] == "load":
                return {"error": exc.reason}
            failures += 1
            return None
        log.info(
            "%s done in %.0fs: wall %s s, ppl %s",
            name,
            time.perf_counter() - t0,
            _fmt(row.get("wall_s"), ".1f"),
            _fmt(row.get("ppl")),
        )
        row["run_id"] = run_id
        row["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return row

    if "float" in args.tools:
        row = launch({"tool": "float", "config": None}, "float")
        if row is not None:
            results["rows"]["float"] = row
            save()
    for config in args.configs:
        for tool in args.tools:
            if tool == "float":
                continue
            out = checkpoint_dir(args.work, tool, config, args.sym)
            key = row_key(tool, config, args.sym)
            row = launch({"tool": tool, "config": config, "out": str(out)}, f"{tool}-{config}")
            if row is None:
                continue
            if args.cross_load:
                for loader in ("latticequant", "gptqmodel"):
                    other = launch(
                        {"tool": "load", "config": config, "out": str(out), "loader": loader},
                        f"load-{tool}-{config}-{loader}",
                    )
                    if other is not None and "error" in other:
                        row.setdefault("load_errors", {})[loader] = other["error"]
                    elif other is not None:
                        row[f"ppl_{loader}_loader"] = other["ppl"]
            results["rows"][key] = row
            save()
        if "gptq" in args.tools and "babai" in args.tools:
            agree = compare_codes(
                checkpoint_dir(args.work, "gptq", config, args.sym),
                checkpoint_dir(args.work, "babai", config, args.sym),
            )
            if agree is not None:
                results["gptq_vs_babai"][f"{config}/{'sym' if args.sym else 'asym'}"] = agree
                save()
    save()
    print(markdown(results))
    print(f"results: {args.results}\ntable:   {args.md}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
