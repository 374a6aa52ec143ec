"""Our compressed-tensors checkpoints read by GPTQModel: its loader and its dequantizer.

A tiny random Llama (``fold_readers.tiny_model``: 2 blocks, a 128-wide stream, a 384-wide MLP,
a character tokenizer) is quantized by ``latticequant quantize --checkpoint-format
compressed-tensors`` (GPTQ, 8 x 64 calibration windows of the protocol text, seed 0) in each
variant of ``VARIANTS``. Each checkpoint is then read on the CPU by

- ``ours``: ``latticequant.checkpoint.load_quantized``, float32;
- ``load``: ``GPTQModel.load(folder, device="cpu")``, the dtype GPTQModel picks (bfloat16 on
  the CPU, ``auto_dtype`` in ``gptqmodel/utils/model.py``);
- ``load float32``: the same with ``dtype=torch.float32``;
- ``dequantize_model``: GPTQModel's safetensors-level dequantizer
  (``gptqmodel.utils.model_dequant.dequantize_model(src, dst, target_dtype=torch.float32)``,
  run in a subprocess), its float32 output folder loaded by ``from_pretrained``;
- with ``--compressed-tensors DIR``, ``dequantize_model`` again with the compressed-tensors
  release installed in DIR first on the path (the dequantizer imports names that 0.19 and 0.20
  no longer have; ``KNOWN``).

For each route that loads, the maximum relative logit difference ``max|a - b| / max|b|``
against ``ours`` is recorded on 2 x 32 fixed token ids, beside ``ours`` against the float model
(what quantization itself changes); a route that fails records its one-line error. Results go
to docs/ct_readers.json and docs/ct_readers.md. Run in the benchmark environment
(``scripts/bench_env.sh``, GPTQModel 7.7.0), in about three minutes on 2 cores:

    .venv-bench/bin/python benchmarks/ct_readers.py
    pip install --no-deps --target runs/ct-0.14 "compressed-tensors<0.15"
    .venv-bench/bin/python benchmarks/ct_readers.py --compressed-tensors runs/ct-0.14
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fold_readers  # noqa: E402  (its tiny-model builders, logit helpers and ENV)

DOCS = ROOT / "docs"
FAMILY = "llama"
GROUP = fold_readers.GROUP
# name: (description, quantize flags)
VARIANTS = {
    "4g32-sym": ("4-bit, groups of 32, symmetric", ["--bits", "4", "--group-size", "32", "--sym"]),
    "4g32-asym": (
        "4-bit, groups of 32, asymmetric",
        ["--bits", "4", "--group-size", "32", "--no-sym"],
    ),
    "8ch-sym": ("8-bit, channel, symmetric", ["--bits", "8", "--group-size", "-1", "--sym"]),
    "8ch-sym-natural": (
        "8-bit, channel, symmetric, `--order natural` (no `actorder`)",
        ["--bits", "8", "--group-size", "-1", "--sym", "--order", "natural"],
    ),
    "8ch-asym": ("8-bit, channel, asymmetric", ["--bits", "8", "--group-size", "-1", "--no-sym"]),
    "3g32-sym": ("3-bit, groups of 32, symmetric", ["--bits", "3", "--group-size", "32", "--sym"]),
    "2g32-asym": (
        "2-bit, groups of 32, asymmetric",
        ["--bits", "2", "--group-size", "32", "--no-sym"],
    ),
    "4g32-asym-online": (
        "4-bit, groups of 32, asymmetric, `--rotate folded+online` (`transform_config`)",
        ["--bits", "4", "--group-size", "32", "--no-sym", "--rotate", "folded+online"],
    ),
    "4g32-sym-online": (
        "4-bit, groups of 32, symmetric, `--rotate folded+online` (`transform_config`)",
        ["--bits", "4", "--group-size", "32", "--sym", "--rotate", "folded+online"],
    ),
}
ROUTES = ("load", "load float32", "dequantize_model")
LAYER = "model.layers.0.self_attn.q_proj"
UNREADABLE = "dequantize_model wrote a folder that from_pretrained refuses"


def quantize(folder: Path, out: Path, flags: list[str]) -> dict:
    """``latticequant quantize`` of ``folder`` into a compressed-tensors checkpoint ``out``."""
    cmd = [sys.executable, "-m", "latticequant", "quantize", str(folder), "--out", str(out),
           "--method", "gptq", "--checkpoint-format", "compressed-tensors", "--seed", "0",
           "--nsamples", "8", "--seqlen", "64", "--no-eval", "--overwrite", *flags]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=fold_readers.ENV)
    result = {
        "command": "latticequant " + " ".join(cmd[3:]).replace(str(folder.parent), "WORK"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if proc.returncode != 0:
        result["error"] = fold_readers._last_line(proc.stderr or proc.stdout)
    return result


def one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, with a pydantic error's own reason and the
    exception it was raised from (GPTQModel re-raises an ImportError under another message)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [""]
    text = f"{type(exc).__name__}: {lines[0]}"
    reason = next((x for x in lines[1:] if x.startswith("Value error")), None)
    if reason:
        text += f" ... {reason.split(' [type=')[0]}"
    cause = exc.__cause__
    if cause is not None:  # its first line, without the file path Python appends
        first = re.sub(r" \((/|[A-Za-z]:\\)[^()]*\)$", "", str(cause).splitlines()[0].strip())
        text += f" (raised from {type(cause).__name__}: {first})"
    return text[:600]


def read_load(folder: Path, ids: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """``GPTQModel.load(folder, device="cpu")``: its logits and what it built."""
    import gptqmodel_ref

    gptqmodel = gptqmodel_ref.import_gptqmodel()
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        qmodel = gptqmodel.GPTQModel.load(str(folder), device="cpu", **kwargs)
    except Exception as exc:  # a refusal is a result
        return {"loads": False, "error": one_line(exc)}
    model = qmodel.model.eval()
    layer = model.model.layers[0].self_attn.q_proj
    info = {
        "gptqmodel_quantized": bool(qmodel.quantized),
        "hf_quantizer": type(getattr(model, "hf_quantizer", None)).__name__,
        "layer": type(layer).__name__,
        "layer_tensors": sorted(n for n, _ in layer.named_parameters()),
        "dtype": str(model.dtype),
    }
    out = {"loads": True, "info": info, "logits": fold_readers.logits(model, ids)}
    del qmodel, model
    return out


def dequantize(src: Path, dst: Path, ct_path: str | None) -> dict:
    """GPTQModel's ``dequantize_model`` in a subprocess (``--dequantize``), with ``ct_path``
    first on the path when given; the dequantized folder is read by ``from_pretrained``."""
    env = dict(fold_readers.ENV)
    if ct_path:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(ct_path).resolve()), env["PYTHONPATH"]])
    cmd = [sys.executable, __file__, "--dequantize", str(src), str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"loads": False, "error": fold_readers._last_line(proc.stderr or proc.stdout)}
    return json.loads(lines[-1])


def _dequantize_main(src: str, dst: str) -> None:
    """The subprocess of :func:`dequantize`: one JSON line on stdout."""
    import importlib.metadata as md

    import gptqmodel_ref

    gptqmodel_ref.import_gptqmodel()
    from gptqmodel.utils.model_dequant import dequantize_model

    result = {"compressed_tensors": md.version("compressed-tensors")}
    import compressed_tensors

    where = Path(compressed_tensors.__file__).resolve().parent.parent
    result["compressed_tensors_from"] = (
        str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else "site-packages"
    )
    try:
        dequantize_model(src, dst, target_dtype=torch.float32)
        result["loads"] = True
    except Exception as exc:  # a refusal is a result
        result.update(loads=False, error=one_line(exc))
    print(json.dumps(result), flush=True)


def read_dequantized(folder: Path, ids: torch.Tensor, work: Path, ct_path: str | None) -> dict:
    from transformers import AutoModelForCausalLM

    dst = work / f"{folder.name}-dequantized"
    shutil.rmtree(dst, ignore_errors=True)
    out = dequantize(folder, dst, ct_path)
    if out.get("loads"):
        config = json.loads((dst / "config.json").read_text())
        out["info"] = {
            "quantization_config_kept": "quantization_config" in config,
            "q_proj_weight_shape": _stored_shape(dst, f"{LAYER}.weight"),
            "q_proj_weight_shape_in_checkpoint": _stored_shape(folder, f"{LAYER}.weight_shape"),
        }
        try:
            model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
            out["logits"] = fold_readers.logits(model, ids)
        except Exception as exc:  # the dequantized folder itself may not load
            out.update(loads=False, error=f"{UNREADABLE}: {one_line(exc)}")
    shutil.rmtree(dst, ignore_errors=True)
    return out


def _stored_shape(folder: Path, key: str) -> list[int] | None:
    """The shape of ``key`` in the folder's safetensors (its value for ``weight_shape``)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            if key in fh.keys():
                t = fh.get_tensor(key)
                return t.tolist() if key.endswith("weight_shape") else list(t.shape)
    return None


def read_all(folder: Path, ids, reference, work: Path, ct_path: str | None) -> dict:
    """Every route on one checkpoint, compared with our loader."""
    from latticequant.checkpoint import load_quantized

    ours = fold_readers.logits(load_quantized(folder).float().eval(), ids)
    routes = {
        "load": read_load(folder, ids, None),
        "load float32": read_load(folder, ids, torch.float32),
        "dequantize_model": read_dequantized(folder, ids, work, None),
    }
    if ct_path:
        routes["dequantize_model, --compressed-tensors"] = read_dequantized(
            folder, ids, work, ct_path
        )
    for r in routes.values():
        logits = r.pop("logits", None)
        if logits is not None:
            r["rel_logit_diff_vs_ours"] = fold_readers.rel(logits, ours)
    return {"ours_vs_float": fold_readers.rel(ours, reference), "routes": routes}


def run(work: Path, names: list[str], ct_path: str | None) -> dict:
    model, tokenizer = fold_readers.tiny_model(FAMILY)
    folder = work / FAMILY
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    ids = fold_readers.token_ids(model.config.vocab_size)
    reference = fold_readers.logits(model, ids)
    variants = {}
    for name in names:
        label, flags = VARIANTS[name]
        out = work / name
        run_ = {"label": label, "quantize": quantize(folder, out, flags)}
        if "error" not in run_["quantize"]:
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            run_["weights"] = qc["config_groups"]["group_0"]["weights"]
            run_["transform_config"] = bool(qc.get("transform_config"))
            run_.update(read_all(out, ids, reference, work, ct_path))
        variants[name] = run_
        print(name, json.dumps(_brief(run_)), flush=True)
    return variants


def _brief(run_: dict) -> dict:
    return {
        k: v.get("rel_logit_diff_vs_ours", v.get("error"))
        for k, v in run_.get("routes", {}).items()
    } or run_["quantize"]


def environment() -> str:
    names = ("latticequant", "gptqmodel", "compressed-tensors", "transformers", "torch")
    return fold_readers.environment(names)


# Why a route fails or differs, from GPTQModel 7.7.0's source (paths under its package).
KNOWN = {
    UNREADABLE: (
        "compressed-tensors 0.14.0.1's `PackedQuantizationCompressor.decompress_weight` "
        "(`compressors/quantized_compressors/pack_quantized.py`, `unpack_from_int32`) reads "
        "`32 // b` values per int32 word, the layout of that release: for 3 bits 10 per word, "
        "while the file holds the dense stream of compressed-tensors 0.20 (32 values in 3 "
        "words, docs/compressed_tensors.md, '2 and 3 bits'). A 128-wide row's 12 words give "
        "120 values, cut to `weight_shape` only when longer, so `dequantize_model` writes "
        "`q_proj.weight` as `(128, 120)` (`q_proj_weight_shape` in the JSON) without checking it "
        "against `weight_shape`, and transformers' load report refuses the size. 2, 4 and 8 "
        "bits have the same layout in both releases."
    ),
    "ignore_mismatched_sizes": (
        "`GPTQModel.load` does not read compressed-tensors itself: `quant_method: "
        "compressed-tensors` is not among the methods `_is_supported_quantization_config` "
        "(`models/auto.py`) accepts, and the folder has no `quantize_config.json`, so `load` "
        "calls `from_pretrained` with no quantize config, whose `quantize_config is None` branch "
        "(`ModelLoader.from_pretrained`, `models/loader.py`) hands the folder to transformers' "
        "`AutoModelForCausalLM.from_pretrained` ('load a non-quantized model ... for "
        "evaluation'); `backend` only enters the choice of device there, so no GPTQModel kernel "
        "is picked. transformers' compressed-tensors integration "
        "then fails on every asymmetric layer: its load report lists `weight_zero_point` of the "
        "file, `(ceil(d_out b / 32), G)`, against `(d_out, G)` in the model, because "
        "compressed-tensors 0.20.1's `PackedQuantizationCompressor.compress` "
        "(`compressors/pack_quantized/base.py`) leaves the zero point unpacked on the meta "
        "device (docs/compressed_tensors.md, 'What loads where')."
    ),
    "map_module_to_scheme": (
        "`dequantize_model` (`utils/model_dequant.py`) reaches "
        "`_prepare_compressed_tensors_context`, whose `_get_compressed_tensors_dependencies` "
        "imports `map_module_to_scheme` from "
        "`compressed_tensors.compressors.model_compressors.model_compressor` and re-raises the "
        "ImportError as 'requires the compressed-tensors package'. compressed-tensors 0.19.0 and "
        "0.20.1 have no such function (0.14.0.1 has it), nor the `BaseCompressor."
        "load_from_registry(...).decompress_weight` that `convert_compressed_pack_file` calls: "
        "the dequantizer is written against that older API. It fails before reading any tensor, "
        "so the same way on every `pack-quantized` checkpoint, llm-compressor's included."
    ),
    "Must use group or tensor_group": (
        "compressed-tensors 0.14.0.1's `QuantizationArgs.validate_model_after` "
        "(`quantization/quant_args.py`) refuses any `actorder` with a strategy other than "
        "`group`/`tensor_group`; `_prepare_compressed_tensors_context` validates the file's "
        "config with it (`QuantizationConfig.model_validate`). Our writer says no `actorder` on "
        "a channel grid (`said_actorder`), so a file written by another tool that does meets "
        "this; compressed-tensors 0.19.0 and 0.20.1 have no such check."
    ),
}
NOTES = (
    "`load` loads a symmetric checkpoint through transformers' compressed-tensors integration "
    "(the `info` in the JSON: `gptqmodel_quantized` false, `hf_quantizer` "
    "`CompressedTensorsHfQuantizer`, layers plain `Linear` holding `weight_packed`), none of "
    "GPTQModel's kernels; in GPTQModel's default dtype on the CPU, bfloat16 (`auto_dtype`, "
    "`utils/model.py`), so its logits differ from ours by bfloat16 rounding, and with "
    "`dtype=torch.float32` they equal ours. A `transform_config` is applied by neither route: "
    "`load` goes through transformers, which does not apply it (docs/compressed_tensors.md), "
    "and `dequantize_model` drops the whole `quantization_config` from the output's "
    '`config.json` (`new_config.pop("quantization_config")`), so both run the stored `W R` on '
    "unrotated inputs: wrong logits (above `ours vs float`), no error."
)


def _cell(route: dict | None, errors: list[str]) -> str:
    if route is None:
        return ""
    if not route.get("loads"):
        if route["error"] not in errors:
            errors.append(route["error"])
        return f"fails ({errors.index(route['error']) + 1})"
    if "rel_logit_diff_vs_ours" not in route:
        return "loads"
    return f"loads, {route['rel_logit_diff_vs_ours']:.1e}"


def write_table(results: dict, path: Path) -> None:
    variants = results["variants"]
    routes = list(ROUTES)
    if any(len(v.get("routes", {})) > len(ROUTES) for v in variants.values()):
        routes.append("dequantize_model, --compressed-tensors")
    versions = results.get("dequantizer_compressed_tensors", {})
    heads = [f"{r} ({versions[r]})" if r in versions else r for r in routes]
    lines = [
        "# Our compressed-tensors checkpoints in GPTQModel",
        "",
        f"`{results['command']}` ({results['environment']}; {results['machine']}).",
        "",
        "A tiny random Llama (2 blocks, 128-wide stream, 384-wide MLP, 128-id character "
        "vocabulary), quantized by `latticequant quantize --method gptq --checkpoint-format "
        "compressed-tensors` (8 x 64 calibration windows, seed 0, default `--order act` unless "
        "said). Each cell: whether the route loads, and the maximum relative logit difference "
        "`max|a - b| / max|b|` against our loader (`load_quantized`, float32) on 2 x 32 fixed "
        'ids. `load`: `GPTQModel.load(folder, device="cpu")` (its default dtype, bfloat16 on '
        "the CPU); `load float32`: the same with `dtype=torch.float32`; `dequantize_model`: "
        "`gptqmodel.utils.model_dequant.dequantize_model(src, dst, target_dtype=torch.float32)`, "
        "the output read by `from_pretrained`, with the compressed-tensors release in brackets. "
        "`ours vs float`: our loader against the float model (what quantization changes).",
        "",
        "| variant | " + " | ".join(heads) + " | ours vs float |",
        "|---|" + "---|" * (len(heads) + 1),
    ]
    errors: list[str] = []
    for run_ in variants.values():
        if "error" in run_["quantize"]:
            lines.append(f"| {run_['label']} | quantize failed: {run_['quantize']['error']} |")
            continue
        cells = [_cell(run_["routes"].get(r), errors) for r in routes]
        lines.append(
            f"| {run_['label']} | " + " | ".join(cells) + f" | {run_['ours_vs_float']:.1e} |"
        )
    lines += ["", "Errors, each as GPTQModel gives it in one line, and why (GPTQModel 7.7.0's "
              "source, paths under `gptqmodel/`):", ""]  # fmt: skip
    for i, msg in enumerate(errors, 1):
        why = next((w for k, w in KNOWN.items() if k in msg), "")
        lines.append(f"{i}. `` {msg} `` {why}".rstrip())
    lines += ["", NOTES]
    fold_readers._write(lines, path)


def _write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["--dequantize"]:
        _dequantize_main(given[1], given[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    p.add_argument(
        "--compressed-tensors",
        metavar="DIR",
        help="also run dequantize_model with the compressed-tensors installed in DIR "
        "(pip install --no-deps --target DIR 'compressed-tensors<0.15')",
    )
    p.add_argument("--out", default=str(DOCS / "ct_readers.json"), help="results, beside its .md")
    args = p.parse_args(given)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"ct_readers: unknown variants {unknown}")
    results = {
        "command": " ".join([".venv-bench/bin/python", "benchmarks/ct_readers.py", *given]),
        "environment": environment(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory(prefix="ct_readers.") as tmp:
        results["variants"] = run(Path(tmp), names, args.compressed_tensors)
    results["dequantizer_compressed_tensors"] = _dequantizer_versions(results["variants"])
    out_json = Path(args.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    _write_json(results, out_json)
    write_table(results, out_json.with_suffix(".md"))
    print(out_json.with_suffix(".md").read_text())


def _dequantizer_versions(variants: dict) -> dict:
    """The compressed-tensors release each dequantize_model route imported."""
    found = {}
    for run_ in variants.values():
        for route, r in run_.get("routes", {}).items():
            if "compressed_tensors" in r:
                found[route] = f"compressed-tensors {r['compressed_tensors']}"
    return found


if __name__ == "__main__":
    main()
