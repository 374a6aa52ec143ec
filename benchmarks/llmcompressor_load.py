"""Checkpoints made by llm-compressor itself, read by our loader and by transformers.

For each variant below, llm-compressor (``oneshot``, in ``.venv-llmc``: llm-compressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0, made by ``scripts/llmcompressor_env.sh``) writes
a checkpoint of a float model; this script, run by the interpreter that has latticequant's
``test`` extra (transformers 5.25, compressed-tensors 0.20.1), then reads the folder

* with our loader (``latticequant.checkpoint.load_quantized``, what ``latticequant eval`` runs),
* with transformers + compressed-tensors 0.20.1: ``CompressedTensorsConfig(dequantize=True)``,
  and for a checkpoint with a ``transform_config`` compressed-tensors' ``apply_transform_config``
  on the loaded model, the stored weights and transform matrices put back (the route of
  ``tests/pipeline/test_compressed_tensors_checkpoint.py``; transformers applies no transform),
* with the venv's transformers 5.17 + compressed-tensors 0.19.0, the same route (``read``, run
  in the venv),
* and with plain ``from_pretrained`` (transformers 5.25), whose outcome is recorded,

and compares held-out perplexity (equal to the 4th decimal or not) and the logits of the first
two windows (largest difference relative to the largest logit).

Models (``--model``): ``tiny`` (default), a random Llama from ``LlamaConfig`` with SmolLM2-135M's
settings at small sizes (hidden 256, intermediate 512, 2 blocks, 4 heads, 2 KV heads, a
character tokenizer; every input size a power of two, so every preset and transform applies),
seconds per variant; ``protocol``, SmolLM2-135M-Instruct as the command line loads it offline,
written once as a float32 folder, minutes per variant (groups of 64: llm-compressor refuses
groups of 128 on its 576 inputs; transforms in blocks of 64 for the same reason). Calibration
(GPTQ only): ``--nsamples`` windows of ``--seqlen`` tokens of the protocol text's first 80%
(``calibration_windows``, seed 0); perplexity on the last 20%.

Folders live in ``--work`` (default ``.bench/llmcompressor``) and are reused; results go to
docs/llmcompressor_load.json and .md, rewritten after each variant, and a rerun skips what is
measured (``--redo`` measures again).

    bash scripts/llmcompressor_env.sh
    python benchmarks/llmcompressor_load.py                            # tiny, every variant
    python benchmarks/llmcompressor_load.py --variants quip-random-hadamard,spinquant
    python benchmarks/llmcompressor_load.py --model protocol --nsamples 16
    python benchmarks/llmcompressor_load.py --tables                   # the .md from the .json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import string
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))
VENV_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
#: the subprocesses import this checkout's package, installed or not
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

#: name -> (recipe, in words; modifier; preset scheme; transform modifier and its type)
VARIANTS = {
    "w4a16-asym": ("QuantizationModifier(scheme=W4A16_ASYM)", "quant", "W4A16_ASYM", None),
    "w4a16-sym-gptq": ("GPTQModifier(scheme=W4A16), actorder static", "gptq", "W4A16", None),
    "w8a16": ("QuantizationModifier(scheme=W8A16)", "quant", "W8A16", None),
    "quip-hadamard": (
        "QuIPModifier(transform_type=hadamard) + QuantizationModifier(scheme=W4A16)",
        "quant",
        "W4A16",
        ("quip", "hadamard"),
    ),
    "quip-random-hadamard": (
        "QuIPModifier() (random-hadamard) + QuantizationModifier(scheme=W4A16)",
        "quant",
        "W4A16",
        ("quip", "random-hadamard"),
    ),
    "spinquant": (
        "SpinQuantModifier(rotations=[R1, R2, R4], hadamard) + QuantizationModifier(W4A16)",
        "quant",
        "W4A16",
        ("spinquant", "hadamard"),
    ),
}
#: the presets' weights (compressed-tensors 0.19.0 ``quant_scheme.py``): bits, symmetric
PRESETS = {"W4A16_ASYM": (4, False), "W4A16": (4, True), "W8A16": (8, True)}
#: group size and transform block per model (None: the preset's 128, the layer's whole input)
MODEL_GROUPS = {"tiny": (None, None), "protocol": (64, 64)}
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
RTOL_LINE = 1e-5  # the tests' tolerance on logits, quoted in the table
WEIGHT_KEYS = ("num_bits", "symmetric", "strategy", "group_size", "actorder")


# -- the float models --------------------------------------------------------------------------


def _char_tokenizer():
    """A character-level fast tokenizer (printable ASCII and four specials, 104 ids)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + list(string.printable)
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
        eos_token="[EOS]",
    )  # fmt: skip


def float_folder(model: str, work: Path) -> Path:
    """The float32 model llm-compressor starts from, written once."""
    folder = work / model / "float"
    if (folder / "config.json").is_file():
        return folder
    if model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = _char_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, **TINY)
        net = LlamaForCausalLM(config).float().eval()
        with torch.no_grad():  # larger weights make the random layers interact (tests/tiny.py)
            for name, p in net.named_parameters():
                if p.dim() == 2 and "embed" not in name:
                    p.mul_(3.0)
    else:
        from latticequant.pipeline.models import load_model

        net, tokenizer = load_model(None)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _ids(folder: Path):
    """``(calibration, held-out)`` token ids of the protocol text with the folder's tokenizer."""
    from transformers import AutoTokenizer

    from latticequant.pipeline.data import load_text, split_ids, tokenize

    return split_ids(tokenize(AutoTokenizer.from_pretrained(folder), load_text(None)))


# -- making a checkpoint (in .venv-llmc) ----------------------------------------------------


def _recipe(variant: str, model: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    _, modifier, scheme, transform = VARIANTS[variant]
    group, block = MODEL_GROUPS[model]
    if group is None:
        kw = {"scheme": scheme}
    else:
        bits, sym = PRESETS[scheme]
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group",
                   "group_size": group}  # fmt: skip
        kw = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    cls = GPTQModifier if modifier == "gptq" else QuantizationModifier
    recipe = [cls(targets="Linear", ignore=["lm_head"], **kw)]
    if transform is not None:
        kind, ttype = transform
        if kind == "quip":
            t = QuIPModifier(transform_type=ttype, transform_block_size=block)
        else:
            t = SpinQuantModifier(
                rotations=["R1", "R2", "R4"], transform_type=ttype, transform_block_size=block
            )
        recipe.insert(0, t)
    return recipe


def make(variant: str, model: str, folder: Path, out: Path, nsamples: int, seqlen: int) -> None:
    """llm-compressor's ``oneshot`` on ``folder``, saved compressed to ``out`` (run in the venv);
    ``make.json`` records the wall time and the versions."""
    import importlib.metadata as md

    from llmcompressor import oneshot

    from latticequant.pipeline.data import calibration_windows

    kw = {}
    if VARIANTS[variant][1] == "gptq":
        from datasets import Dataset

        windows = calibration_windows(_ids(folder)[0], nsamples, seqlen, seed=0)
        kw = dict(
            dataset=Dataset.from_dict(
                {"input_ids": windows.tolist(), "attention_mask": [[1] * seqlen] * nsamples}
            ),
            num_calibration_samples=nsamples,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
        )
    t0 = time.perf_counter()
    oneshot(model=str(folder), recipe=_recipe(variant, model), output_dir=str(out), **kw)
    versions = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers")}
    record = {"wall_s": round(time.perf_counter() - t0, 1), "versions": versions}
    (out / "make.json").write_text(json.dumps(record, indent=1))


# -- reading a checkpoint ----------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def read_transformers(folder: Path, heldout: torch.Tensor, seqlen: int) -> dict:
    """Perplexity and the first two windows' logits through transformers + compressed-tensors
    (``dequantize=True``; the file's ``transform_config`` applied by compressed-tensors with the
    stored weights and matrices put back), in whichever interpreter runs this."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from latticequant.pipeline.data import perplexity

    net = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    route = "dequantize=True"
    if qc.get("transform_config"):
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        state = {k: v.clone() for k, v in net.state_dict().items()}
        files = sorted(folder.glob("*.safetensors"))
        for f in files:
            state.update({k: v for k, v in load_file(str(f)).items() if "_input." in k})
        apply_transform_config(net, TransformConfig.model_validate(qc["transform_config"]))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("_input.weight") for k in missing):
            raise RuntimeError(f"transform state does not fit: {unexpected[:2]} {missing[:2]}")
        route += " + apply_transform_config"
    with torch.no_grad():
        logits = net(heldout[: 2 * seqlen].view(2, seqlen)).logits
        ppl = perplexity(net, heldout, seqlen, progress=False)
    return {"ppl": ppl, "logits": logits, "route": route}


def _read_in_venv(folder: Path, out: Path, seqlen: int) -> dict:
    cmd = [str(VENV_PYTHON), __file__, "read", str(folder), "--out", str(out),
           "--seqlen", str(seqlen)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"error": " | ".join(tail)[:200]}
    return torch.load(out)


class _Captured(logging.Handler):
    """transformers' log lines while a reader loads (its load report says what mismatched)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().splitlines()


def _plain(folder: Path, ids: torch.Tensor, ours: torch.Tensor) -> str:
    """What plain ``from_pretrained`` (no quantization_config argument) does with the folder."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    captured = _Captured()
    root = hf_logging.get_logger("transformers")
    root.addHandler(captured)
    hf_logging.disable_default_handler()
    try:
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            rel = _rel(net(ids).logits, ours)
    except Exception as exc:  # a reader's failure is a result here, recorded in one line
        mismatch = [line for line in captured.lines if "MISMATCH" in line and "|" in line]
        if mismatch:  # "<key> | MISMATCH | Reinit due to size mismatch - ckpt: ... vs model: ..."
            key, _, why = (part.strip() for part in mismatch[0].split("|", 2))
            return f"fails: size mismatch on {key} ({why.split(' - ')[-1]})"
        return f"fails ({_first_line(exc)})"
    finally:
        root.removeHandler(captured)
        hf_logging.enable_default_handler()
    return f"loads, logits rel. {rel:.1e}" + ("" if rel < RTOL_LINE else " (wrong)")


def measure(variant: str, model: str, work: Path, nsamples: int, seqlen: int) -> dict:
    """Make (in the venv) unless the folder is there, then read with every reader."""
    from latticequant.checkpoint import load_quantized
    from latticequant.pipeline.data import perplexity

    folder = float_folder(model, work)
    out = work / model / variant
    if not (out / "make.json").is_file():
        cmd = [str(VENV_PYTHON), __file__, "make", variant, "--model", model,
               "--out", str(out), "--work", str(work), "--nsamples", str(nsamples),
               "--seqlen", str(seqlen)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            return {"error": "llm-compressor: " + " | ".join(tail)[:300]}
    made = json.loads((out / "make.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    from safetensors.torch import load_file

    keys = [k for f in sorted(out.glob("*.safetensors")) for k in load_file(str(f))]
    transforms = {
        name: f"{s['type']}, head_dim {s['head_dim']}"
        for name, s in (qc.get("transform_config") or {}).get("config_groups", {}).items()
    }
    heldout = _ids(folder)[1]
    ids = heldout[: 2 * seqlen].view(2, seqlen)
    result = {
        "recipe": VARIANTS[variant][0],
        "make_s": made["wall_s"],
        "made_with": made["versions"],
        "weights": {k: group["weights"].get(k) for k in WEIGHT_KEYS},
        "transforms": transforms,
        "stored_matrices": sorted(k for k in keys if "_input." in k),
    }
    try:
        t0 = time.perf_counter()
        ours_net = load_quantized(out)
        with torch.no_grad():
            ours_logits = ours_net(ids).logits
            result["ours_ppl"] = perplexity(ours_net, heldout, seqlen, progress=False)
        result["ours_s"] = round(time.perf_counter() - t0, 1)
        del ours_net
    except Exception as exc:  # our loader's refusal is the finding
        result["ours_error"] = _first_line(exc)
        ours_logits = None
    readers = {"tf": None, "venv": None}
    try:
        readers["tf"] = read_transformers(out, heldout, seqlen)
    except Exception as exc:
        readers["tf"] = {"error": _first_line(exc)}
    readers["venv"] = _read_in_venv(out, out / "venv_read.pt", seqlen)
    for key, got in readers.items():
        if "error" in got:
            result[f"{key}_error"] = got["error"]
            continue
        result[f"{key}_ppl"] = got["ppl"]
        result[f"{key}_route"] = got["route"]
        if ours_logits is not None:
            result[f"{key}_logits_rel"] = _rel(ours_logits, got["logits"])
            result[f"{key}_equal_4dp"] = round(got["ppl"], 4) == round(result["ours_ppl"], 4)
    if ours_logits is not None:
        result["plain_from_pretrained"] = _plain(out, ids, ours_logits)
    return result


# -- the table ---------------------------------------------------------------------------------


def _ppl(r: dict, key: str) -> str:
    if f"{key}_error" in r:
        return f"fails: {r[f'{key}_error']}"
    if f"{key}_ppl" not in r:
        return ""
    out = f"{r[f'{key}_ppl']:.4f}"
    if f"{key}_logits_rel" in r:
        same = "yes" if r[f"{key}_equal_4dp"] else "**no**"
        out += f" ({same}; logits {r[f'{key}_logits_rel']:.1e})"
    return out


def write_table(results: dict, path: Path) -> None:
    lines = [
        "# llm-compressor's own checkpoints in our loader",
        "",
        f"`python benchmarks/llmcompressor_load.py` on {results.get('machine', '?')}. Each "
        "checkpoint is written by llm-compressor itself (`oneshot`, made with the versions "
        "below) and read by our loader (`load_quantized`, as `latticequant eval` does), by "
        "transformers 5.25 + compressed-tensors 0.20.1 (`CompressedTensorsConfig(dequantize="
        "True)`, plus compressed-tensors' `apply_transform_config` with the stored matrices for "
        "a `transform_config`), by the venv's transformers 5.17 + compressed-tensors 0.19.0 (the "
        "same route) and by plain `from_pretrained` (5.25). Perplexity on the protocol text's "
        "held-out 20%; in brackets: equal to ours to the 4th decimal, and the largest logit "
        "difference on two windows relative to the largest logit.",
        "",
    ]
    for model, block in results.get("models", {}).items():
        lines += [f"## {model}: {block.get('about', '')}", ""]
        if "float_ppl" in block:
            lines += [f"Float model: perplexity {block['float_ppl']:.4f}.", ""]
        made = [r["made_with"] for r in block["variants"].values() if "made_with" in r]
        if made:
            versions = ", ".join(f"{k} {v}" for k, v in made[0].items())
            lines += [f"Made with {versions}; make s: `oneshot`'s wall time.", ""]
        lines += [
            "| variant | llm-compressor recipe | weights | transforms (stored matrices) | make s "
            "| ours | transformers 5.25 + ct 0.20.1 | transformers 5.17 + ct 0.19.0 "
            "| plain from_pretrained (5.25) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in VARIANTS:
            r = block["variants"].get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {VARIANTS[name][0]} | error: {r['error']} |||||||")
                continue
            w = r["weights"]
            weights = (f"{w['num_bits']}-bit {'sym' if w['symmetric'] else 'asym'}, "
                       f"{w['strategy']} {w['group_size']}, actorder {w['actorder']}")  # fmt: skip
            tr = "; ".join(f"{k}: {v}" for k, v in r["transforms"].items()) or "none"
            if r["stored_matrices"]:
                tr += (
                    f" ({len(r['stored_matrices'])}: "
                    + ", ".join(k.split("model.layers.")[-1] for k in r["stored_matrices"])
                    + ")"
                )
            ours = (f"fails: {r['ours_error']}" if "ours_error" in r
                    else f"{r['ours_ppl']:.4f}")  # fmt: skip
            lines.append(
                f"| {name} | {r['recipe']} | {weights} | {tr} | {r['make_s']:.0f} | {ours} "
                f"| {_ppl(r, 'tf')} | {_ppl(r, 'venv')} | {r.get('plain_from_pretrained', '')} |"
            )
        lines.append("")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def _save(results: dict, out_json: Path) -> None:
    tmp = out_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out_json)
    write_table(results, out_json.with_suffix(".md"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "make", "read"),
        help="run (default); make and read are what the venv is asked to do",
    )
    p.add_argument("target", nargs="?", help="make: the variant; read: the folder")
    p.add_argument("--model", default="tiny", choices=tuple(MODEL_GROUPS))
    p.add_argument("--variants", help="comma-separated variants (default: all)")
    p.add_argument("--nsamples", type=int, default=16, help="GPTQ calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--work", default=str(ROOT / ".bench" / "llmcompressor"))
    p.add_argument("--out", help="make: the checkpoint folder; read: the result file")
    p.add_argument("--json", default=str(DOCS / "llmcompressor_load.json"))
    p.add_argument("--redo", action="store_true", help="measure again what is measured")
    p.add_argument("--tables", action="store_true", help="rewrite the .md from the .json only")
    args = p.parse_args(argv)
    work = Path(args.work)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.command == "make":
        make(args.target, args.model, float_folder(args.model, work), Path(args.out),
             args.nsamples, args.seqlen)  # fmt: skip
        return
    if args.command == "read":
        folder = Path(args.target)
        got = read_transformers(folder, _ids(folder)[1], args.seqlen)
        torch.save(got, args.out)
        return
    out_json = Path(args.json)
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    if args.tables:
        write_table(results, out_json.with_suffix(".md"))
        return
    if not VENV_PYTHON.is_file():
        raise SystemExit(f"llmcompressor_load: no {VENV_PYTHON}; run scripts/llmcompressor_env.sh")
    names = list(VARIANTS) if not args.variants else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"llmcompressor_load: unknown variants {unknown}; known: {list(VARIANTS)}")
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    block = results.setdefault("models", {}).setdefault(args.model, {"variants": {}})
    block["about"] = (
        "random Llama, hidden 256, intermediate 512, 2 blocks, character tokenizer, presets' "
        "groups of 128"
        if args.model == "tiny"
        else "SmolLM2-135M-Instruct (the protocol model), groups of 64, transforms in blocks of 64"
    ) + f"; GPTQ on {args.nsamples} x {args.seqlen} windows; perplexity windows of {args.seqlen}"
    if "float_ppl" not in block:
        from transformers import AutoModelForCausalLM

        from latticequant.pipeline.data import perplexity

        folder = float_folder(args.model, work)
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        block["float_ppl"] = perplexity(net, _ids(folder)[1], args.seqlen, progress=False)
    for name in names:
        done = block["variants"].get(name)
        if done is not None and "error" not in done and not args.redo:
            continue
        block["variants"][name] = measure(name, args.model, work, args.nsamples, args.seqlen)
        _save(results, out_json)
        print(name, json.dumps({k: v for k, v in block["variants"][name].items()
                                if k != "stored_matrices"}), flush=True)  # fmt: skip
    _save(results, out_json)
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
