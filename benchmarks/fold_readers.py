"""A folded-rotation GPTQ checkpoint read by three loaders: ours, GPTQModel's and transformers'.

For each family the fold supports, a tiny random model is built from the fields of a published
config (rotary base, norm epsilon, biases, tied embeddings, sliding window, head size; the sizes
shrunk to a 128-wide stream), its norm scales drawn away from one (so that ``--rotate folded``
unties a tied head) and written as a Hugging Face folder with a character tokenizer. Each folder
is quantized by ``latticequant quantize`` (GPTQ, 4 bits, groups of 32) with ``--rotate folded``
and, as a control, ``--rotate none``, in each GPTQ checkpoint format of ``FORMATS``. Each
checkpoint is then loaded in float32 on the CPU by

- ``ours``: ``latticequant.checkpoint.load_quantized``;
- ``gptqmodel``: ``GPTQModel.load(folder, device="cpu", backend=...)`` (``gptqmodel_ref``);
- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` with a ``GPTQConfig`` (through
  optimum and GPTQModel's kernels, as ``transformers_load.py`` does);

and the maximum relative logit difference ``max|a - b| / max|b|`` of each pair is recorded on
fixed token ids, beside that of ours against the float model the run started from (what the
quantization itself changes). Results go to docs/fold_readers.json and .md.

    .venv-bench/bin/python benchmarks/fold_readers.py                    # 4 families: minutes
    .venv-bench/bin/python benchmarks/fold_readers.py --families qwen3 --formats gptq_v2
    .venv-bench/bin/python benchmarks/fold_readers.py --model runs/folded-4g128 --seqlen 512

``--model CHECKPOINT`` reads an existing checkpoint folder instead (one of the protocol model,
say, from ``latticequant quantize --rotate folded --checkpoint-format gptq_v2``), on two windows
of ``--seqlen`` tokens of the protocol's held-out text; nothing is quantized, and the results go
to runs/fold_readers/ unless ``--out`` says otherwise. GPTQModel 7.7.0 refuses asymmetric
checkpoints in the v1 ``gptq`` format that it did not write itself (``KNOWN``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
DOCS = ROOT / "docs"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}

# The fields that make each family what it is, from the published config.json of one model
# (sizes left out: SHAPE and the head sizes below replace them).
FAMILIES = {
    "llama": (
        "LlamaConfig",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        dict(rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
             attention_bias=False, mlp_bias=False, head_dim=32),
    ),
    "mistral": (
        "MistralConfig",
        "mistralai/Mistral-7B-v0.1",
        dict(rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
             sliding_window=4096, head_dim=32),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen/Qwen2.5-0.5B",
        dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
             use_sliding_window=False, sliding_window=32768),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen/Qwen3-0.6B",
        dict(rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
             attention_bias=False, head_dim=64),  # 4 x 64 query features on a 128 stream
    ),
}  # fmt: skip
SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
GROUP = 32  # every in_features of SHAPE is a multiple of it
ROTATIONS = ("folded", "none")
# name: (--checkpoint-format, symmetric grid)
FORMATS = {"gptq-sym": ("gptq", True), "gptq": ("gptq", False), "gptq_v2": ("gptq_v2", False)}
READERS = ("ours", "gptqmodel", "transformers")
WIDENED = "transformers, float32 scales and biases"
PAIRS = (
    ("gptqmodel", "ours"),
    ("transformers", "ours"),
    ("transformers", "gptqmodel"),
    (WIDENED, "ours"),
)


def char_tokenizer():
    """Printable ASCII, one id per character: the protocol text calibrates a tiny vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", *string.printable]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def tiny_model(family: str, seed: int = 0):
    """The family's tiny random model in float32: norm scales ``1 + 0.5 N(0, 1)``, biases
    ``0.3 N(0, 1)``, matrices (not the embedding) scaled by 3 so that the layers interact."""
    import transformers

    cls, _, fields = FAMILIES[family]
    tokenizer = char_tokenizer()
    config = getattr(transformers, cls)(
        **SHAPE,
        **fields,
        vocab_size=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed" not in name:
                p.mul_(3.0)
    return model, tokenizer


def token_ids(vocab: int, seed: int = 5) -> torch.Tensor:
    """Two windows of 32 fixed ids, special ids left out."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, min(vocab, 100), (2, 32), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def quantize(folder: Path, out: Path, rotate: str, fmt: str) -> dict:
    checkpoint_format, sym = FORMATS[fmt]
    cmd = [sys.executable, "-m", "latticequant", "quantize", str(folder), "--out", str(out),
           "--method", "gptq", "--bits", "4", "--group-size", str(GROUP),
           "--sym" if sym else "--no-sym", "--rotate", rotate, "--seed", "0",
           "--checkpoint-format", checkpoint_format, "--nsamples", "8", "--seqlen", "64",
           "--no-eval", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    result = {"command": "latticequant " + " ".join(cmd[3:]),
              "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    if proc.returncode != 0:
        result["error"] = _last_line(proc.stderr or proc.stdout)
    return result


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1][:400] if lines else "no output"


def load_reader(reader: str, folder: Path, backend: str):
    """One reader's float32 CPU model of the checkpoint folder."""
    if reader == "ours":
        from latticequant.checkpoint import load_quantized

        return load_quantized(folder).float().eval()
    if reader == "gptqmodel":
        import gptqmodel_ref

        return gptqmodel_ref.load_checkpoint(folder, backend=backend)
    import gptqmodel_ref
    from transformers import AutoModelForCausalLM, GPTQConfig

    gptqmodel_ref.import_gptqmodel()
    if backend == "gptq_torch":
        gptqmodel_ref.allow_float32_torch_kernel()
    bits = json.loads((folder / "quantize_config.json").read_text())["bits"]
    return AutoModelForCausalLM.from_pretrained(
        folder,
        device_map="cpu",
        dtype=torch.float32,
        quantization_config=GPTQConfig(bits=bits, backend=backend),
    ).eval()


def read_all(folder: Path, ids: torch.Tensor, backend: str) -> tuple[dict, dict]:
    """Each reader's logits (or its error), and what each loaded model holds."""
    out, info = {}, {}
    for reader in READERS:
        try:
            model = load_reader(reader, folder, backend)
            out[reader] = logits(model, ids)
            info[reader] = describe(model)
            if reader == "transformers":
                widen(model, folder)
                out[WIDENED] = logits(model, ids)
            del model
        except Exception as exc:  # a reader's refusal is a result; record it and go on
            out[reader] = f"{type(exc).__name__}: {_last_line(str(exc))}"
    return out, info


def describe(model) -> dict:
    """The head (tied or not) and the quantized layers' class and buffer dtypes."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    layers = [m for m in model.modules() if hasattr(m, "qweight")]
    biases = {str(m.bias.dtype) for m in layers if getattr(m, "bias", None) is not None}
    return {
        "lm_head": type(head).__name__,
        "tied": head.weight.data_ptr() == embed.weight.data_ptr(),
        "quantized_layers": sorted({type(m).__name__ for m in layers}),
        "scales": sorted({str(m.scales.dtype) for m in layers}),
        "biases": sorted(biases),
    }


def widen(model, folder: Path) -> None:
    """The transformers-loaded layers with float32 scales and the file's own biases.

    GPTQModel's ``QuantLinear`` registers ``scales`` and ``bias`` as float16 buffers, and
    transformers copies the file into them: the float32 biases we write are rounded, and
    ``TorchLinear`` dequantizes ``scales * (q - z)`` in the scales' dtype. GPTQModel's own loader
    casts the model to the dtype asked for instead. Here both are put back in float32.
    """
    from safetensors import safe_open

    stored = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            stored.update({k: fh.get_tensor(k) for k in fh.keys() if k.endswith(".bias")})
    for name, m in model.named_modules():
        if not hasattr(m, "qweight"):
            continue
        m.scales = m.scales.float()
        if getattr(m, "bias", None) is not None:
            m.bias = stored[f"{name}.bias"].float()
        if hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()


def compare(read: dict, reference: torch.Tensor | None = None) -> dict:
    diffs = {}
    for a, b in PAIRS:
        if isinstance(read.get(a), torch.Tensor) and isinstance(read.get(b), torch.Tensor):
            diffs[f"{a} vs {b}"] = rel(read[a], read[b])
    if reference is not None and isinstance(read.get("ours"), torch.Tensor):
        diffs["ours vs float"] = rel(read["ours"], reference)
    return diffs


def run_family(family: str, formats: list[str], work: Path, backend: str) -> dict:
    model, tokenizer = tiny_model(family)
    folder = work / family
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    ids = token_ids(model.config.vocab_size)
    reference = logits(model, ids)
    runs = {}
    for fmt in formats:
        for rotate in ROTATIONS:
            out = work / f"{family}-{rotate}-{fmt}"
            run = quantize(folder, out, rotate, fmt)
            if "error" not in run:
                qc = json.loads((out / "config.json").read_text())
                run["tie_word_embeddings"] = qc.get("tie_word_embeddings")
                read, run["loaded"] = read_all(out, ids, backend)
                run["errors"] = {r: v for r, v in read.items() if isinstance(v, str)}
                run["rel_logit_diff"] = compare(read, reference)
            runs[f"{rotate}-{fmt}"] = run
            print(family, rotate, fmt, json.dumps(_brief(run)), flush=True)
    _, source, fields = FAMILIES[family]
    return {"config_of": source, "fields": fields, "runs": runs}


def run_checkpoint(folder: Path, seqlen: int, backend: str) -> dict:
    """An existing checkpoint (the protocol model's): the readers on its held-out text."""
    from latticequant.pipeline.data import load_text, split_ids, tokenize
    from latticequant.pipeline.models import load_tokenizer

    heldout = split_ids(tokenize(load_tokenizer(str(folder)), load_text(None)))[1]
    ids = heldout[: 2 * seqlen].view(2, seqlen)
    read, loaded = read_all(folder, ids, backend)
    return {
        "checkpoint": str(folder),
        "seqlen": seqlen,
        "loaded": loaded,
        "errors": {r: v for r, v in read.items() if isinstance(v, str)},
        "rel_logit_diff": compare(read),
    }


def _brief(run: dict) -> dict:
    return {k: run[k] for k in ("rel_logit_diff", "errors", "error") if run.get(k)}


def environment(
    names: tuple[str, ...] = ("latticequant", "gptqmodel", "transformers", "optimum", "torch"),
) -> str:
    """The versions of ``names`` (``absent`` when not installed), Python and the machine."""
    import importlib.metadata as m

    versions = []
    for name in names:
        try:
            versions.append(f"{name} {m.version(name)}")
        except m.PackageNotFoundError:
            versions.append(f"{name} absent")
    return ", ".join(versions) + f"; Python {platform.python_version()}, {platform.machine()}"


def _cell(run: dict, key: str) -> str:
    if "error" in run:
        return "quantize failed"
    if key in run.get("rel_logit_diff", {}):
        return f"{run['rel_logit_diff'][key]:.1e}"
    failed = [r for r in key.split(" vs ") if r.split(",")[0] in run.get("errors", {})]
    return f"{' and '.join(failed)} failed" if failed else ""


# Why a reader refuses or differs, from its source (GPTQModel 7.7.0, transformers 5.25.0).
KNOWN = {
    "Loading of a sym=False model with format=FORMAT.GPTQ": (
        "GPTQModel's limitation: `gptqmodel/models/loader.py` lines 2099-2104 refuse an "
        "asymmetric v1 (`gptq`) checkpoint unless its `meta.quantizer` names gptqmodel >= 0.9.0 "
        "(`QuantizeConfig.is_quantized_by_gptaq`, `gptqmodel/quantization/config.py` line "
        "3864); ours names latticequant. The same grid as `gptq_v2`, or a symmetric grid as "
        "`gptq`, loads."
    ),
}
TRANSFORMERS_GAP = (
    "transformers vs ours: transformers builds GPTQModel's `QuantLinear`, whose `scales` "
    "(`gptqmodel/nn_modules/qlinear/__init__.py` lines 946-952) and `bias` (line 190) are "
    "float16 buffers, copies the file into them, and they stay float16 under "
    "`from_pretrained(..., dtype=torch.float32)` (the `scales`/`biases` dtypes in the JSON). "
    "`TorchLinear` dequantizes `scales[g_idx] * (q - z)` in the scales' dtype "
    "(`nn_modules/qlinear/torch.py` line 734), and the float32 biases we write (Qwen2's q/k/v) "
    "are rounded to float16. GPTQModel's own loader holds both in float32. With the scales "
    "cast to float32 and the biases read from the file (`transformers, float32 scales and "
    "biases`), the model transformers loaded gives our logits."
)


def _lines_for_errors(errors: dict[str, list[str]]) -> list[str]:
    if not errors:
        return []
    lines = ["", "Refusals:", ""]
    for msg, where in errors.items():
        why = next((w for k, w in KNOWN.items() if k in msg), "")
        lines.append(f"- {msg} ({', '.join(where)}). {why}".rstrip())
    return lines


def write_table(results: dict, path: Path) -> None:
    keys = [f"{a} vs {b}" for a, b in PAIRS]
    head = [f"`{results['command']}` ({results['environment']}; {results['machine']}).", ""]
    if results.get("checkpoint"):
        c = results["checkpoint"]
        lines = ["# A checkpoint in three readers", "", *head]
        lines += [f"Checkpoint `{c['checkpoint']}`: maximum relative logit difference in "
                  f"float32 on 2 x {c['seqlen']} tokens of the protocol's held-out text; "
                  f"the `{results['backend']}` kernel.", ""]  # fmt: skip
        lines += [f"- {k}: {v:.1e}" for k, v in c["rel_logit_diff"].items()]
        lines += _lines_for_errors({f"{r}: {v}": [c["checkpoint"]] for r, v in c["errors"].items()})
        lines += ["", TRANSFORMERS_GAP]
        _write(lines, path)
        return
    keys.append("ours vs float")
    lines = [
        "# A folded-rotation checkpoint in three readers",
        "",
        *head,
        "Tiny random models (2 blocks, a 128-wide stream, 384-wide MLP, 4 query and 2 KV heads, "
        "a 128-id character vocabulary; norm scales drawn away from one) with the fields of each "
        "named config; GPTQ 4-bit, groups of 32, seed 0, 8 x 64 calibration windows of the "
        "protocol text; `--rotate folded` and the control `--rotate none`. Format `gptq-sym`: "
        "`--checkpoint-format gptq --sym`; `gptq`: the default, v1 with an asymmetric grid; "
        "`gptq_v2`: asymmetric. `tied`: the checkpoint's `tie_word_embeddings`. Each cell is "
        "the maximum relative logit difference `max|a - b| / max|b|` in float32 on 2 x 32 fixed "
        f"ids; GPTQModel and transformers run the `{results['backend']}` kernel. `ours vs "
        "float`: our loader against the float model the run started from (what 4-bit "
        "quantization of a random model changes).",
        "",
        "| family (config of) | rotation | format | tied | " + " | ".join(keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    errors: dict[str, list[str]] = {}
    for family, fam in results["families"].items():
        for name, run in fam["runs"].items():
            rotate, fmt = name.split("-", 1)
            tied = run.get("tie_word_embeddings")
            cells = [_cell(run, k) for k in keys]
            lines.append(
                f"| {family} ({fam['config_of']}) | {rotate} | {fmt} | "
                f"{'' if tied is None else str(tied).lower()} | " + " | ".join(cells) + " |"
            )
            for reader, message in run.get("errors", {}).items():
                errors.setdefault(f"{reader}: {message}", []).append(f"{family} {name}")
            if "error" in run:
                errors.setdefault(f"quantize: {run['error']}", []).append(f"{family} {name}")
    lines += _lines_for_errors(errors)
    lines += ["", TRANSFORMERS_GAP]
    _write(lines, path)


def _write(lines: list[str], path: Path) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"from {', '.join(FORMATS)}")
    p.add_argument("--backend", default="gptq_torch", help="GPTQModel's kernel (gptq_torch)")
    p.add_argument("--model", help="an existing checkpoint folder to read instead")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window with --model")
    p.add_argument(
        "--out",
        help="results file, beside its .md (default docs/fold_readers.json; with --model "
        "runs/fold_readers/NAME.json)",
    )
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(given)
    families = [f for f in args.families.split(",") if f]
    formats = [f for f in args.formats.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"fold_readers: unknown {unknown}")
    if args.out:
        out_json = Path(args.out)
    elif args.model:
        out_json = ROOT / "runs" / "fold_readers" / f"{Path(args.model).resolve().name}.json"
    else:
        out_json = DOCS / "fold_readers.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "command": " ".join([".venv-bench/bin/python", "benchmarks/fold_readers.py", *given]),
        "environment": environment(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": args.backend,
        "families": {},
    }
    if args.model:
        results["checkpoint"] = run_checkpoint(Path(args.model), args.seqlen, args.backend)
    else:
        with tempfile.TemporaryDirectory(prefix="fold_readers.") as tmp:
            for family in families:
                results["families"][family] = run_family(family, formats, Path(tmp), args.backend)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, out_json.with_suffix(".md"))
    print(out_json.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
