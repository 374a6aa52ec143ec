"""GGUF files judged by llama.cpp: its own quantizer against ours, type by type.

On the protocol model (SmolLM2-135M-Instruct) and text, in one invocation, for each file type:

* (a) the float32 GGUF (written by ``llama-quantize --allow-requantize`` from the model's Q4_1
  file: a dequantization, so its tensors are the protocol's float32 model),
* (b) ``llama-quantize`` with an importance matrix from ``llama-imatrix -c 512 --chunks 64`` on
  the protocol's calibration text (its first 80%),
* (c) ``llama-quantize`` without one,
* (d) ours, plain GPTQ decoding on llama.cpp's grids (``latticequant quantize --method gptq
  --checkpoint-format gguf --gguf-type TYPE``),
* (e) ours with our best settings for a GGUF (``--objective float-outputs --refine cd``), and
  the same with the residual-stream rotation folded into the weights (``--rotate folded``),

each scored by ``llama-perplexity -c 512`` on the held-out text (the last 20%; it scores the
second half of every 512-token window, so its figures are quoted as ratios to its own float
figure), and, for (a), (b), (d) and (e), by ``latticequant eval FILE.gguf`` (the protocol's
perplexity, every position of every window; a type ``gguf`` cannot dequantize has none).

llama.cpp's tools come from ``scripts/llama_cpp_env.sh`` (``--bin`` or ``$LLAMA_CPP_BIN``,
default ``.bench/llama.cpp/build/bin``). Files and partial results live in ``--work`` (default
``.bench/gguf``); results go to docs/bench_gguf.json and .md, rewritten after each step, and a
rerun skips what is already measured (``--fresh`` starts over).

    bash scripts/llama_cpp_env.sh
    python benchmarks/bench_gguf.py                          # all seven types (4 h on 2 cores)
    python benchmarks/bench_gguf.py --types Q4_0,Q2_0        # a subset
    python benchmarks/bench_gguf.py --tables                 # the .md from the .json only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
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
TYPES = ("Q4_0", "Q2_0", "IQ4_NL", "Q4_K_M", "Q5_0", "Q3_K_M", "Q2_K")
#: name -> (table label, the arguments of ``latticequant quantize`` besides the type)
OURS = {
    "ours": ("ours, GPTQ", ["--method", "gptq"]),
    "ours-best": (
        "ours, GPTQ + float-outputs + refine cd",
        ["--method", "gptq", "--objective", "float-outputs", "--refine", "cd"],
    ),
    # the residual-stream rotation folded into the weights: a plain llama again, whose head
    # is untied (SmolLM2's final norm is not all ones), so the file holds one more matrix
    "ours-folded": (
        "ours, as above + --rotate folded",
        [
            "--method",
            "gptq",
            "--objective",
            "float-outputs",
            "--refine",
            "cd",
            "--rotate",
            "folded",
        ],
    ),
}
#: the settings a plain invocation runs (--settings names others)
DEFAULT_SETTINGS = ("ours", "ours-best", "ours-folded")
PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
LQ_PPL = re.compile(r"^perplexity[^:]*:\s*([0-9.]+)", re.M)


def _run(cmd: list[str], log: Path) -> str:
    """Run ``cmd``, its output kept in ``log``; a failure stops the benchmark with its tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    log.write_text(f"$ {' '.join(cmd)}\n{out}\n# {time.perf_counter() - t0:.1f} s\n")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-8:])
        raise SystemExit(f"bench_gguf: {Path(cmd[0]).name} failed ({log}):\n{tail}")
    return out


def _texts(work: Path) -> tuple[Path, Path]:
    """The protocol's calibration and held-out text as files llama.cpp reads: the tokens of the
    whole text split 80/20 as the protocol does, each part decoded back to text."""
    from latticequant.pipeline.data import protocol_text, split_ids, tokenize
    from latticequant.pipeline.models import default_model_path, load_model

    calib, held = work / "calibration.txt", work / "heldout.txt"
    if calib.exists() and held.exists():
        return calib, held
    _, tokenizer = load_model(default_model_path())
    ids = tokenize(tokenizer, protocol_text())
    cal_ids, held_ids = split_ids(ids)
    calib.write_text(tokenizer.decode(cal_ids.tolist()))
    held.write_text(tokenizer.decode(held_ids.tolist()))
    return calib, held


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.bin = Path(args.bin)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.json = Path(args.json)
        self.results: dict = {}
        if self.json.exists() and not args.fresh:
            self.results = json.loads(self.json.read_text())
        self.results.setdefault("rows", {})
        self.results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
        self.threads = str(args.threads)
        self.extra = args.quantize_args

    def tool(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise SystemExit(
                f"bench_gguf: {path} not found; build llama.cpp's tools first: bash "
                "scripts/llama_cpp_env.sh (or give --bin)"
            )
        return str(path)

    def save(self) -> None:
        tmp = self.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        os.replace(tmp, self.json)
        write_tables(self.results, self.json.with_suffix(".md"))

    def row(self, key: str) -> dict:
        return self.results["rows"].setdefault(key, {})

    def llama_ppl(self, key: str, model: Path, held: Path) -> None:
        row = self.row(key)
        if "llama_ppl" in row:
            return
        # --no-repack: the CPU build's weight repacking for block-32 types crashes
        # llama-perplexity (SIGSEGV) on this machine; it is a layout, not a change of numbers
        out = _run(
            [self.tool("llama-perplexity"), "-m", str(model), "-f", str(held), "-c", "512",
             "-t", self.threads, "--no-repack"],
            self.work / f"{key.replace('/', '.')}.perplexity.log",
        )  # fmt: skip
        m = PPL.search(out)
        if m is None:
            raise SystemExit(f"bench_gguf: no 'Final estimate' in {key}'s perplexity log")
        row["llama_ppl"], row["llama_ppl_err"] = float(m.group(1)), float(m.group(2))
        row["file_bytes"] = model.stat().st_size
        row["tensor_types"] = _tensor_types(model)
        self.save()

    def our_ppl(self, key: str, model: Path) -> None:
        row = self.row(key)
        if "our_ppl" in row or row.get("our_ppl_error"):
            return
        proc = subprocess.run(
            [sys.executable, "-m", "latticequant", "eval", str(model)],
            capture_output=True, text=True, env=ENV,
        )  # fmt: skip
        (self.work / f"{key.replace('/', '.')}.eval.log").write_text(proc.stdout + proc.stderr)
        m = LQ_PPL.search(proc.stdout)
        if proc.returncode != 0 or m is None:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            row["our_ppl_error"] = lines[-1] if lines else f"exit {proc.returncode}"
        else:
            row["our_ppl"] = float(m.group(1))
        self.save()

    def float_file(self, source: str) -> Path:
        f32 = self.work / "F32.gguf"
        if not f32.exists():
            tmp = self.work / "F32.gguf.tmp"
            _run(
                [self.tool("llama-quantize"), "--allow-requantize", source, str(tmp), "F32",
                 self.threads],
                self.work / "F32.quantize.log",
            )  # fmt: skip
            os.replace(tmp, f32)
        return f32

    def imatrix(self, f32: Path, calib: Path) -> Path:
        path = self.work / "imatrix.gguf"
        if not path.exists():
            tmp = self.work / "imatrix.tmp.gguf"
            _run(
                [self.tool("llama-imatrix"), "-m", str(f32), "-f", str(calib), "-c", "512",
                 "--chunks", "64", "-o", str(tmp), "-t", self.threads],
                self.work / "imatrix.log",
            )  # fmt: skip
            os.replace(tmp, path)
        return path

    def llama_quantize(self, qtype: str, f32: Path, imatrix: Path | None) -> Path:
        name = f"{qtype}.llama{'-imatrix' if imatrix else ''}.gguf"
        out = self.work / name
        if not out.exists():
            tmp = self.work / (name + ".tmp")
            cmd = [self.tool("llama-quantize")]
            if imatrix is not None:
                cmd += ["--imatrix", str(imatrix)]
            cmd += [str(f32), str(tmp), qtype, self.threads]
            _run(cmd, self.work / (name + ".log"))
            os.replace(tmp, out)
        return out

    def ours(self, qtype: str, setting: str) -> Path | None:
        """Our file of ``qtype``, or None when the run refused (the refusal is recorded)."""
        key = f"{qtype}/{setting}"
        row = self.row(key)
        out = self.work / f"{qtype}.{setting}.gguf"
        if out.exists():
            return out
        if row.get("refused"):
            return None
        cmd = [
            sys.executable, "-m", "latticequant", "quantize", *OURS[setting][1], *self.extra,
            "--checkpoint-format", "gguf", "--gguf-type", qtype, "--out", str(out),
            "--overwrite", "--no-eval",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        (self.work / f"{qtype}.{setting}.quantize.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            row["refused"] = lines[-1] if lines else f"exit {proc.returncode}"
            self.save()
            print(f"bench_gguf: {key}: {row['refused']}", file=sys.stderr)
            return None
        row["quantize_wall_s"] = round(time.perf_counter() - t0, 1)
        row["command"] = "latticequant " + " ".join(cmd[3:])
        self.save()
        return out


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each ggml type the file holds (read with the ``gguf`` package, Q2_0
    through our reader's extension of it)."""
    try:
        import gguf

        from latticequant.pipeline.gguf_read import q2_0_reading

        counts: dict[str, int] = {}
        with q2_0_reading():
            tensors = gguf.GGUFReader(str(path)).tensors
        for t in tensors:
            name = getattr(t.tensor_type, "name", str(t.tensor_type))
            counts[name] = counts.get(name, 0) + 1
        return counts
    except Exception as exc:  # a type this gguf does not know (Q2_0 in gguf 0.19)
        return {"unreadable by gguf": 1, "why": type(exc).__name__}


def write_tables(results: dict, path: Path) -> None:
    rows = results.get("rows", {})
    f32 = rows.get("F32", {}).get("llama_ppl")
    lines = [
        "# GGUF files in llama.cpp: its quantizer and ours, type by type",
        "",
        "Written by `python benchmarks/bench_gguf.py` (llama.cpp's tools from "
        "`scripts/llama_cpp_env.sh`); "
        f"machine: {results.get('machine', '?')}.",
        "",
        "`llama ppl`: `llama-perplexity -c 512` on the protocol's held-out text (second half of "
        "each window); `ratio`: to the float32 file's figure of the same run. `our ppl`: "
        "`latticequant eval FILE.gguf` (the protocol's perplexity, every position).",
        "",
        "| type | file | llama ppl | ratio | our ppl | MB | tensors |",
        "|---|---|---|---|---|---|---|",
    ]

    def line(label: str, qtype: str, row: dict) -> str:
        ppl = row.get("llama_ppl")
        if row.get("refused"):
            return f"| {qtype} | {label} | refused: {row['refused']} | | | | |"
        ratio = f"{ppl / f32:.3f}" if ppl and f32 else ""
        ours = row.get("our_ppl")
        our = f"{ours:.3f}" if ours else ("n/a" if row.get("our_ppl_error") else "")
        mb = f"{row['file_bytes'] / 1e6:.1f}" if row.get("file_bytes") else ""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(row.get("tensor_types", {}).items())
                          if k != "why")  # fmt: skip
        p = f"{ppl:.3f}" if ppl else ""
        return f"| {qtype} | {label} | {p} | {ratio} | {our} | {mb} | {kinds} |"

    if "F32" in rows:
        lines.append(line("float32", "F32", rows["F32"]))
    for qtype in TYPES:
        for key, label in (
            ("llama-imatrix", "llama-quantize + imatrix"),
            ("llama", "llama-quantize"),
            *((s, OURS[s][0]) for s in OURS),
        ):
            if f"{qtype}/{key}" in rows:
                lines.append(line(label, qtype, rows[f"{qtype}/{key}"]))
    errors = sorted({r["our_ppl_error"] for r in rows.values() if r.get("our_ppl_error")})
    if errors:
        lines += ["", "`our ppl` n/a: " + "; ".join(errors)]
    if results.get("notes"):  # how the rows were run, kept in the JSON beside them
        lines += ["", "Notes on these runs. " + results["notes"]]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated file types")
    p.add_argument(
        "--settings",
        default=",".join(DEFAULT_SETTINGS),
        help=f"comma-separated of {', '.join(OURS)}",
    )
    p.add_argument(
        "--bin", default=os.environ.get("LLAMA_CPP_BIN", str(ROOT / ".bench/llama.cpp/build/bin"))
    )
    p.add_argument("--work", default=str(ROOT / ".bench/gguf"))
    p.add_argument("--json", default=str(DOCS / "bench_gguf.json"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-our-eval", action="store_true", help="skip latticequant eval of files")
    p.add_argument("--fresh", action="store_true", help="forget earlier results")
    p.add_argument("--tables", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("quantize_args", nargs="*", help="after --: more latticequant quantize args")
    args = p.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    settings = [s for s in args.settings.split(",") if s]
    bad = [t for t in types if t not in TYPES] + [s for s in settings if s not in OURS]
    if bad:
        raise SystemExit(
            f"bench_gguf: unknown {', '.join(bad)}; types: {', '.join(TYPES)}; "
            f"settings: {', '.join(OURS)}"
        )
    bench = Bench(args)
    if args.tables:
        write_tables(bench.results, bench.json.with_suffix(".md"))
        return
    from latticequant.pipeline.models import default_model_path

    source = default_model_path()
    calib, held = _texts(bench.work)
    f32 = bench.float_file(source)
    bench.llama_ppl("F32", f32, held)
    if not args.no_our_eval:
        bench.our_ppl("F32", f32)
    for qtype in types:  # llama.cpp's files first: seconds each (the imatrix: minutes, once)
        for key, with_imatrix in (("llama-imatrix", True), ("llama", False)):
            if "llama_ppl" in bench.row(f"{qtype}/{key}"):
                continue  # measured by an earlier run
            im = bench.imatrix(f32, calib) if with_imatrix else None
            bench.llama_ppl(f"{qtype}/{key}", bench.llama_quantize(qtype, f32, im), held)
    for qtype in types:  # type by type: the first types' rows are whole first
        for setting in settings:
            out = bench.ours(qtype, setting)
            if out is not None:
                bench.llama_ppl(f"{qtype}/{setting}", out, held)
                if not args.no_our_eval:
                    bench.our_ppl(f"{qtype}/{setting}", out)
    if not args.no_our_eval:  # llama.cpp's own files last: a cross-check, not a row of ours
        for qtype in types:
            row = bench.row(f"{qtype}/llama-imatrix")
            if "our_ppl" not in row and not row.get("our_ppl_error"):  # remade if removed
                path = bench.llama_quantize(qtype, f32, bench.imatrix(f32, calib))
                bench.our_ppl(f"{qtype}/llama-imatrix", path)
    print(bench.json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
