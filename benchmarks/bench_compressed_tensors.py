"""The compressed-tensors format on the protocol: each variant read by us and by transformers.

On the protocol (SmolLM2-135M-Instruct as the command line loads it offline, 64 x 512
calibration windows of the protocol text, seed 0, GPTQ), each variant of ``VARIANTS`` is one
``latticequant quantize --checkpoint-format compressed-tensors`` process; the folder it writes is
then scored on the held-out 20% of the protocol text twice, each in its own process:

* through our loader: ``latticequant eval DIR --json``;
* through transformers + compressed-tensors: ``from_pretrained(DIR, quantization_config=
  CompressedTensorsConfig(dequantize=True))`` (the route that loads asymmetric grids with
  compressed-tensors 0.20.1), and for a folder with a ``transform_config`` compressed-tensors'
  ``apply_transform_config`` on the loaded model with the stored weights put back (the route of
  ``tests/pipeline/test_compressed_tensors_checkpoint.py``: transformers 5.25 applies no
  transform), on the same windows and BOS policy as ``latticequant eval``.

The table says whether the two agree to the 4th decimal, and whether vLLM serves the folder, as
``docs/compressed_tensors.md`` reads vLLM's source (not run here). Groups are of 64:
compressed-tensors needs a group size that divides every layer's input, and 128 does not divide
the protocol model's 576 (the script records the refusal once, ``g128``). Results go to
docs/bench_compressed_tensors.json and .md, rewritten after each variant; a rerun skips the
variants already measured (``--redo`` measures again).

    python benchmarks/bench_compressed_tensors.py --list
    python benchmarks/bench_compressed_tensors.py                   # every variant (hours, 2 cores)
    python benchmarks/bench_compressed_tensors.py --only 4g64-asym,4g64-asym-online-float-outputs
    python benchmarks/bench_compressed_tensors.py --only 4g64-sym --nsamples 2 --blocks 0:1 \\
        --json /tmp/ct_smoke.json                                   # a smoke run, minutes
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
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))
#: the subprocesses import this checkout's package, installed or not
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
BASE = ["--method", "gptq", "--checkpoint-format", "compressed-tensors", "--seed", "0"]
ASYM_G64 = ["--bits", "4", "--group-size", "64", "--no-sym"]
FLOAT_OUTPUTS = ["--objective", "float-outputs"]
#: name -> (the variant's own flags, what vLLM does with the folder: docs/compressed_tensors.md)
VARIANTS = {
    "4g64-sym": (
        ["--bits", "4", "--group-size", "64", "--sym"],
        "yes: WNA16 uint4b8 (Marlin, Machete, Exllama)",
    ),
    "4g64-asym": (ASYM_G64, "yes: WNA16 uint4 with zero point (Marlin, Machete)"),
    "8ch-sym": (
        ["--bits", "8", "--group-size", "-1", "--sym"],
        "yes: WNA16 uint8b128 channel (Marlin, Machete, Exllama)",
    ),
    "4g64-asym-float-outputs": (
        ASYM_G64 + FLOAT_OUTPUTS,
        "yes: as 4g64-asym (the objective changes no stored field)",
    ),
    "4g64-asym-folded-float-outputs": (
        ASYM_G64 + ["--rotate", "folded"] + FLOAT_OUTPUTS,
        "yes: as 4g64-asym (a plain model again, its head untied)",
    ),
    "4g64-asym-online-float-outputs": (
        ASYM_G64 + ["--rotate", "folded+online"] + FLOAT_OUTPUTS,
        "yes: as 4g64-asym, down_proj's input by its hadacore Hadamard (blocks of 512), "
        "float16/bfloat16, no tensor parallelism",
    ),
}
LQ_PPL = re.compile(r'"perplexity":\s*([0-9.]+)')


def quantize_command(name: str, extra: list[str], out: Path) -> list[str]:
    flags, _ = VARIANTS[name]
    return [sys.executable, "-m", "latticequant", "quantize", *BASE, *flags, *extra,
            "--out", str(out), "--overwrite", "--no-eval"]  # fmt: skip


def _tail(proc: subprocess.CompletedProcess, n: int = 1) -> str:
    return " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-n:])[:300]


def read_transformers(folder: Path, seqlen: int) -> dict:
    """Held-out perplexity through transformers + compressed-tensors, on the windows and BOS
    policy ``latticequant eval`` uses for this folder (the one it was calibrated with)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from latticequant.checkpoint import read_quant_log
    from latticequant.pipeline.data import load_text, perplexity, split_ids, tokenize, window_bos

    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = (read_quant_log(folder).get("run") or {}).get("bos") or "auto"
    bos = window_bos(tokenizer, policy)
    ids = split_ids(tokenize(tokenizer, load_text(None), bos is None))[1]
    net = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    route = "dequantize=True"
    if qc.get("transform_config"):
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        state = {k: v.clone() for k, v in net.state_dict().items()}
        for f in sorted(folder.glob("*.safetensors")):  # matrices a file may store (ours: none)
            state.update({k: v for k, v in load_file(str(f)).items() if "_input." in k})
        apply_transform_config(net, TransformConfig.model_validate(qc["transform_config"]))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("_input.weight") for k in missing):
            raise RuntimeError(f"transform state does not fit: {unexpected[:2]} {missing[:2]}")
        route += " + apply_transform_config"
    return {"perplexity": perplexity(net, ids, seqlen, progress=False, bos=bos), "route": route}


def run_one(name: str, work: Path, extra: list[str], seqlen: int) -> dict:
    out = work / name
    cmd = quantize_command(name, extra, out)
    result = {"command": "latticequant " + " ".join(cmd[3:]).replace(str(out), "DIR")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    result["quantize_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        return {**result, "error": "quantize: " + _tail(proc, 2)}
    ev = subprocess.run(
        [sys.executable, "-m", "latticequant", "eval", str(out), "--json",
         "--seqlen", str(seqlen)],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    m = LQ_PPL.search(ev.stdout)
    if ev.returncode != 0 or m is None:
        result["ours_error"] = _tail(ev)
    else:
        result["ppl_ours"] = float(m.group(1))
    tf = subprocess.run(
        [sys.executable, __file__, "--read-transformers", str(out), "--seqlen", str(seqlen)],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    if tf.returncode != 0:
        result["transformers_error"] = _tail(tf)
    else:
        got = json.loads(tf.stdout.strip().splitlines()[-1])
        result["ppl_transformers"] = got["perplexity"]
        result["transformers_route"] = got["route"]
    if "ppl_ours" in result and "ppl_transformers" in result:
        ours, theirs = result["ppl_ours"], result["ppl_transformers"]
        result["equal_4dp"] = round(ours, 4) == round(theirs, 4)
    return result


def g128_refusal(work: Path) -> str:
    """What the command line says to 4-bit groups of 128 in this format on the protocol model
    (refused before any quantization)."""
    cmd = [sys.executable, "-m", "latticequant", "quantize", *BASE, "--group-size", "128",
           "--out", str(work / "g128"), "--no-eval", "--nsamples", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode == 0:
        return "accepted"
    return _tail(proc)


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# The compressed-tensors format on the protocol: our loader and transformers",
        "",
        f"`python benchmarks/bench_compressed_tensors.py` on {results.get('machine', '?')}: "
        "each variant is the command shown (`DIR` its folder), GPTQ with the protocol's "
        "calibration; held-out perplexity through `latticequant eval DIR` and through "
        "transformers + compressed-tensors (`CompressedTensorsConfig(dequantize=True)`, plus "
        "compressed-tensors' `apply_transform_config` for an online rotation), equal to the 4th "
        "decimal or not. vLLM serves (source): from vLLM's source as `docs/compressed_tensors.md`"
        " reads it, not run.",
        "",
    ]
    if results.get("g128"):
        lines += [f"Groups of 128 on this model: `{results['g128']}`", ""]
    lines += [
        "| variant | command | quantize s | ours | transformers + compressed-tensors | equal "
        "(4th decimal) | vLLM serves (source) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (_, vllm) in VARIANTS.items():
        r = results.get("runs", {}).get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | `{r['command']}` | | error: {r['error']} | | | {vllm} |")
            continue
        ours = f"{r['ppl_ours']:.4f}" if "ppl_ours" in r else f"fails: {r['ours_error']}"
        theirs = (
            f"{r['ppl_transformers']:.4f} ({r['transformers_route']})"
            if "ppl_transformers" in r
            else f"fails: {r['transformers_error']}"
        )
        equal = {True: "yes", False: "**no**", None: ""}[r.get("equal_4dp")]
        lines.append(
            f"| {name} | `{r['command']}` | {r['quantize_s']:.0f} | {ours} | {theirs} | {equal} "
            f"| {vllm} |"
        )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _save(results: dict, out_json: Path) -> None:
    tmp = out_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_json)
    write_table(results, out_json.with_suffix(".md"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated variant names or patterns (default: all)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--redo", action="store_true", help="measure again what is measured")
    p.add_argument("--nsamples", type=int, help="calibration windows (default: the protocol's)")
    p.add_argument("--blocks", help="quantize only these blocks (START:END), for a smoke run")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity windows")
    p.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    p.add_argument("--json", default=str(DOCS / "bench_compressed_tensors.json"))
    p.add_argument("--tables", action="store_true", help="rewrite the .md from the .json only")
    p.add_argument("--read-transformers", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read_transformers:  # the child process that reads one folder with transformers
        print(json.dumps(read_transformers(Path(args.read_transformers), args.seqlen)))
        return
    names = list(VARIANTS)
    if args.only:
        pats = [x for x in args.only.split(",") if x]
        missing = [pat for pat in pats if not any(fnmatch.fnmatch(n, pat) for n in names)]
        if missing:
            raise SystemExit(f"bench_compressed_tensors: no variant matches {missing}; see --list")
        names = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in pats)]
    if args.list:
        for name in names:
            print(name, " ".join(quantize_command(name, [], Path("DIR"))[3:]))
        return
    out_json = Path(args.json)
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    if args.tables:
        write_table(results, out_json.with_suffix(".md"))
        return
    extra = []
    if args.nsamples is not None:
        extra += ["--nsamples", str(args.nsamples)]
    if args.blocks is not None:
        extra += ["--blocks", args.blocks]
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory(prefix="bench_ct.") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if "g128" not in results:
            results["g128"] = g128_refusal(work)
            _save(results, out_json)
        for name in names:
            done = results["runs"].get(name)
            if done is not None and "error" not in done and not args.redo:
                continue
            results["runs"][name] = run_one(name, work, extra, args.seqlen)
            _save(results, out_json)
            print(name, json.dumps(results["runs"][name]), flush=True)
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
