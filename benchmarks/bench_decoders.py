"""Searching the Hessian lattice harder: GPTQ against K-best decoding, with and without refinement.

The protocol of docs/protocol.md: SmolLM2-135M-Instruct in float32, 64 calibration windows of 512
tokens drawn with seed 0 from the first 80% of the ``pydoc_data`` text, asymmetric grids,
act-order. For each grid (4-bit g128, 3-bit g128, 2-bit g64) six runs: ``gptq``, ``kbest`` with
K = 4 and K = 16, each as decoded and with ``refine=cd,scales`` (2 sweeps, 2 rounds). Every run
starts from the float weights and quantizes every linear layer of the decoder blocks.

Figures per run: the summed layer loss ``sum tr((W - Q) H (W - Q)^T)`` and the same relative
to GPTQ's on the very same Hessians (each layer also decodes GPTQ for the comparison), the
perplexity on the held-out 20% of the protocol text and on a second text from another source
(the licence texts Debian ships in ``/usr/share/common-licenses``: GPL-2, GPL-3, LGPL-2.1,
MPL-2.0, Apache-2.0, joined in that order), and the whole run's wall time relative to the GPTQ
run of the same grid in the same invocation.

    python benchmarks/bench_decoders.py                  # all 18 runs (hours on a CPU)
    python benchmarks/bench_decoders.py --runs '3g128-*'
    python benchmarks/bench_decoders.py --runs 3g128-gptq,3g128-kbest4-refine   # in that order
    python benchmarks/bench_decoders.py --smoke          # first block only, under runs/
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_methods import load_results, save_json, select  # noqa: E402

log = logging.getLogger("bench_decoders")

DOCS = ROOT / "docs"
LICENSES = Path("/usr/share/common-licenses")
SECOND_TEXT = ("GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0", "Apache-2.0")
GRIDS = {
    "4g128": {"bits": 4, "group_size": 128},
    "3g128": {"bits": 3, "group_size": 128},
    "2g64": {"bits": 2, "group_size": 64},
}
REFINE = {"refine": "cd,scales", "refine_sweeps": 2, "refine_rounds": 2}


@dataclass(frozen=True)
class Run:
    name: str
    grid: str
    method: str
    config: dict


def all_runs() -> list[Run]:
    runs = []
    for grid, cfg in GRIDS.items():
        base = {**cfg, "sym": False, "order": "act"}
        for label, method, extra in (
            ("gptq", "gptq", {}),
            ("kbest4", "kbest", {"beam": 4}),
            ("kbest16", "kbest", {"beam": 16}),
        ):
            runs.append(Run(f"{grid}-{label}", grid, method, {**base, **extra}))
            runs.append(Run(f"{grid}-{label}-refine", grid, method, {**base, **extra, **REFINE}))
    return runs


def second_text() -> str:
    missing = [n for n in SECOND_TEXT if not (LICENSES / n).is_file()]
    if missing:
        raise SystemExit(f"the second text needs {LICENSES}/{missing[0]} (Debian's base-files)")
    return "\n\n".join((LICENSES / n).read_text() for n in SECOND_TEXT)


def protocol_args(doc: str, argv=None) -> argparse.Namespace:
    """The flags every protocol benchmark of runs takes; logging set up."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--runs", help="comma-separated run names or patterns (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--redo", action="store_true", help="rerun runs that already have results")
    p.add_argument("--smoke", action="store_true", help="first block only, 8 windows of 128")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DOCS)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return args


def prepare_out(args, stem: str) -> Path:
    """Threads, the smoke settings and the output folder; the JSON file's path."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 8), min(args.seqlen, 128)
        if args.out == DOCS:
            args.out = ROOT / "runs" / f"{stem}_smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    return args.out / f"{stem}.json"


def protocol_inputs(args):
    """The float model (and a copy of its weights), the calibration windows and both texts."""
    from latticequant.pipeline import data
    from latticequant.pipeline.models import load_model

    model, tokenizer = load_model(None)
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib, heldout = data.split_ids(data.tokenize(tokenizer, data.load_text(None)))
    windows = data.calibration_windows(calib, args.nsamples, args.seqlen, 0)
    texts = {"heldout": heldout, "second": data.tokenize(tokenizer, second_text())}
    if args.smoke:
        texts = {k: v[: 8 * args.seqlen] for k, v in texts.items()}
    return model, tokenizer, float_state, windows, texts


def start_results(json_path: Path, args, texts: dict, model) -> dict:
    """The results so far, with this invocation's environment and the float perplexities."""
    from latticequant.pipeline import data

    results = load_results(json_path)
    results["env"] = {
        "protocol": f"SmolLM2-135M-Instruct, {args.nsamples} x {args.seqlen} calibration "
        f"tokens, {len(texts['heldout'])} held-out and {len(texts['second'])} second-text tokens"
        + (" (smoke: first block only)" if args.smoke else ""),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if "float_ppl" not in results:
        results["float_ppl"] = {
            k: data.perplexity(model, ids, seqlen=args.seqlen, progress=False)
            for k, ids in texts.items()
        }
    return results


def reference_runs(todo, runs, results: dict, invocation: str, json_path: Path, wall_of) -> None:
    """A GPTQ run per grid this invocation has no GPTQ row for: time ratios are only
    meaningful within one invocation. ``wall_of(run)``: its wall seconds."""
    for grid in dict.fromkeys(r.grid for r in todo):
        if any(r.name == f"{grid}-gptq" for r in todo):
            continue
        log.info("%s: GPTQ reference run for the time ratio", grid)
        ref = next(r for r in runs if r.name == f"{grid}-gptq")
        results.setdefault("references", {})[f"{invocation}/{grid}"] = {"wall_s": wall_of(ref)}
        save_json(results, json_path)


def quantize_run(
    run: Run, model, float_state, tokenizer, windows, args, **options
) -> tuple[list, float]:
    """Quantize the float model with ``run``'s method and config (``options``: more fields of
    its ``RunSpec``, such as ``target``); its layer stats and wall time."""
    import latticequant as lq
    from latticequant.methods import get_method
    from latticequant.pipeline import Override

    model.load_state_dict(float_state)
    method = get_method(run.method)
    overrides = [Override(r"layers\.([1-9]|[1-9][0-9])\.", skip=True)] if args.smoke else []
    spec = lq.RunSpec(
        method=method.name,
        config=method.config_cls(**run.config),
        overrides=tuple(overrides),
        calibration=lq.CalibrationSpec(nsamples=windows.shape[0], seqlen=windows.shape[1]),
        execution=lq.ExecutionSpec(progress=not args.quiet),
        **options,
    )
    t0 = time.perf_counter()
    stats = lq.quantize_model(
        model, lq.Calibration(windows, tokenizer=tokenizer), lq.prepare(model, spec)
    )
    return stats, time.perf_counter() - t0


def run_one(run: Run, model, float_state, tokenizer, windows, texts, args) -> dict:
    from latticequant.pipeline import data

    stats, wall = quantize_run(run, model, float_state, tokenizer, windows, args)
    ppl = {
        name: data.perplexity(model, ids, seqlen=args.seqlen, progress=False)
        for name, ids in texts.items()
    }
    loss = sum(s["loss"] for s in stats)
    gptq = sum(s["gptq_loss"] for s in stats)
    return {
        "name": run.name,
        "grid": run.grid,
        "method": run.method,
        "config": run.config,
        "loss": loss,
        "gptq_loss": gptq,
        "loss_vs_gptq": loss / gptq,
        "refine_cd_removed": sum(s.get("refine_cd_removed", 0.0) for s in stats),
        "refine_scales_removed": sum(s.get("refine_scales_removed", 0.0) for s in stats),
        "clipped": sum(int(s.get("clipped", 0)) for s in stats),
        "ppl_heldout": ppl["heldout"],
        "ppl_second": ppl["second"],
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def reference_wall(results: dict, grid: str, invocation: str | None) -> float | None:
    """GPTQ's wall time for ``grid`` measured in ``invocation``: its row, or a reference run."""
    base = results["runs"].get(f"{grid}-gptq")
    if base and base.get("invocation") == invocation:
        return base["wall_s"]
    ref = results.get("references", {}).get(f"{invocation}/{grid}")
    return ref["wall_s"] if ref else None


def active_wall(run: dict) -> float:
    """Wall seconds of a run less any time its process was stopped (``paused_s``: the process
    was suspended while another measurement needed the machine)."""
    return run["wall_s"] - run.get("paused_s", 0.0)


def write_table(results: dict, path: Path) -> None:
    env = results.get("env", {})
    lines = [
        "# Decoders on the Hessian lattice: GPTQ, K-best, refinement",
        "",
        f"Protocol: {env.get('protocol', '')}. Machine: {env.get('machine', '')}, torch "
        f"{env.get('torch', '')}; threads per run in the table. Generated by "
        "`python benchmarks/bench_decoders.py` (see its docstring). Float32 perplexity: "
        f"held-out {results.get('float_ppl', {}).get('heldout', float('nan')):.3f}, second text "
        f"{results.get('float_ppl', {}).get('second', float('nan')):.3f}. Loss: summed "
        "`tr((W-Q) H (W-Q)^T)` over all 210 layers, relative to GPTQ's on the same Hessians; "
        "time relative to the GPTQ run of the same grid and invocation (`run`); wall seconds "
        "leave out any time the process was suspended (`paused_s` in the JSON).",
        "",
        "| run | method | refine | loss / GPTQ | ppl held-out | ppl second text | wall s "
        "| x GPTQ time | threads | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = results["runs"]
    for grid in GRIDS:
        for r in sorted((r for r in runs.values() if r["grid"] == grid), key=lambda r: r["name"]):
            method = r["method"] + (f" K={r['config']['beam']}" if "beam" in r["config"] else "")
            base = reference_wall(results, grid, r.get("invocation"))
            ratio = f"{active_wall(r) / base:.2f}" if base else "–"
            lines.append(
                f"| {r['name']} | {method} | {r['config'].get('refine') or '–'} "
                f"| {r['loss_vs_gptq']:.3f} | {r['ppl_heldout']:.3f} | {r['ppl_second']:.3f} "
                f"| {active_wall(r):.0f} | {ratio} | {r.get('threads', '?')} "
                f"| {r.get('invocation', '')} |"
            )
    path.write_text("\n".join(lines) + "\n")


def drive(argv, doc: str, stem: str, runs_of, quantize_run, run_one, write_table, summary):
    """A protocol benchmark of named runs: select them (``--runs``, in the order asked for),
    list them, rewrite the table, or run those without results, each saved as it finishes.
    ``summary(res)``: the log line of a finished run."""
    args = protocol_args(doc, argv)
    runs = select(runs_of(), args.runs)
    if args.runs:
        wanted = [n.strip() for n in args.runs.split(",")]
        runs.sort(key=lambda r: wanted.index(r.name) if r.name in wanted else len(wanted))
    if args.list:
        for r in runs:
            print(f"{r.name:24s} {r.method:6s} {r.config} {getattr(r, 'target', '')}")
        return 0
    json_path = prepare_out(args, stem)
    if args.table:
        write_table(load_results(json_path), args.out / f"{stem}.md")
        return 0
    model, tokenizer, float_state, windows, texts = protocol_inputs(args)
    invocation = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results = start_results(json_path, args, texts, model)
    todo = [r for r in runs if args.redo or r.name not in results["runs"]]
    reference_runs(
        todo,
        runs_of(),
        results,
        invocation,
        json_path,
        lambda ref: quantize_run(ref, model, float_state, tokenizer, windows, args)[1],
    )
    for run in todo:
        log.info("%s: %s %s", run.name, run.method, run.config)
        res = run_one(run, model, float_state, tokenizer, windows, texts, args)
        res["invocation"] = invocation
        results["runs"][run.name] = res
        log.info("%s: %s", run.name, summary(res))
        save_json(results, json_path)
        write_table(results, args.out / f"{stem}.md")
    return 0


def main(argv=None) -> int:
    return drive(
        argv,
        __doc__,
        "bench_decoders",
        all_runs,
        quantize_run,
        run_one,
        write_table,
        lambda r: (
            f"loss {r['loss_vs_gptq']:.4f} x GPTQ, perplexity {r['ppl_heldout']:.3f} / "
            f"{r['ppl_second']:.3f}, {r['wall_s']:.0f} s"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
