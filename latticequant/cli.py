"""The ``latticequant`` command: quantize a model, evaluate perplexity, report per-layer figures.

The quantize command builds the method's config from the fields of its config dataclass, so a
newly registered method gets its flags (``--outlier-rate``, ``--target-bits``, ...) for free.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
import time

from latticequant.formats import format_names, kernel_description
from latticequant.formats.gguf.format import GGUF_TYPES
from latticequant.methods import get_method, list_methods, settable_fields
from latticequant.pipeline.checkpoint import is_quantized_checkpoint, read_quant_log
from latticequant.pipeline.data import (
    BOS_POLICIES,
    HF_DATASETS,
    calibration_windows,
    load_text,
    perplexity,
    split_ids,
    tokenize,
    window_bos,
)
from latticequant.pipeline.distributed import RankFailedError, World
from latticequant.pipeline.experts import (
    EXPERT_FALLBACKS,
    ExpertPolicy,
)
from latticequant.pipeline.generate import GenerationConfig, generate, weight_memory
from latticequant.pipeline.gguf_file import check_gguf_output
from latticequant.pipeline.models import DTYPE_CHOICES, default_model_path, load_model
from latticequant.pipeline.offload import store_of
from latticequant.pipeline.overrides import Override, parse_override
from latticequant.pipeline.run import Calibration, quantize_model
from latticequant.pipeline.spec import (
    CalibrationSpec,
    ExecutionSpec,
    OutputSpec,
    RunSpec,
    check_device,
    prepare,
)
from latticequant.pipeline.state import OutputExistsError, output_lock, partial_folder
from latticequant.pipeline.target import OBJECTIVES, REFERENCES, ROTATIONS, TargetConfig
from latticequant.report import format_table, load_report, plot_loss_vs_bound

log = logging.getLogger("latticequant")

__all__ = ["main", "build_parser", "config_from_args"]

# Flags whose spelling differs from the config field they set.
FLAG_ALIASES = {"group_size": ["--group-size", "--groupsize"], "bits": ["--bits", "--wbits"]}
# Config fields set by a flag the command already has (``--seed`` seeds the windows too).
SHARED_FLAGS = {"seed": "seed"}


def _add_config_flags(parser: argparse.ArgumentParser, method) -> None:
    config_cls = method.config_cls
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for f in settable_fields(config_cls):
        if f.name in SHARED_FLAGS:
            continue
        flags = FLAG_ALIASES.get(f.name, [f"--{f.name.replace('_', '-')}"])
        default = method.defaults.get(f.name, f.default)
        helptext = f"(default: {default})"
        if isinstance(default, bool):
            group.add_argument(
                *flags,
                dest=f"cfg_{f.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=helptext,
            )
        else:
            group.add_argument(
                *flags,
                dest=f"cfg_{f.name}",
                type=type(default),
                default=None,
                help=helptext,
            )


def config_from_args(method, args: argparse.Namespace):
    """The method's config with the method's defaults, changed by the flags given."""
    config_cls = method.config_cls
    changes = dict(method.defaults)
    changes |= {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in settable_fields(config_cls)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    for name, flag in SHARED_FLAGS.items():
        if name in {f.name for f in settable_fields(config_cls)} and hasattr(args, flag):
            changes[name] = getattr(args, flag)
    return config_cls(**changes)


class UsageError(Exception):
    """A command line that does not parse; main prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``see --help``) instead of usage plus error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _positive(name: str, minimum: int = 1):
    """An argparse type: an integer of at least ``minimum``, with a message naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}")
        return value

    return parse


def _block_range(text: str) -> tuple[int, int]:
    """``--blocks START:END``: the blocks START <= i < END."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--blocks expects START:END (two integers, e.g. 0:2), got {text!r}"
        ) from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(
            f"--blocks expects START:END with 0 <= START < END, got {text}"
        )
    return start, end


def _glue_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1:2`` as ``--flag=-1:2``: argparse takes a value that starts with ``-`` and is
    not a plain negative number for an option, and says only "expected one argument"; glued,
    the flag's own check names the rule."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if (
            out
            and re.fullmatch(r"-[\d.].*", arg)
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and not re.fullmatch(r"-\d+|-\d*\.\d+", arg)  # argparse reads these as values
        ):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _nonnegative_float(name: str):
    """An argparse type: a finite float >= 0, with a one-line error naming the flag."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects a number, got {text!r}") from None
        if not (value >= 0 and value != float("inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return value

    return parse


def _unit_fraction(name: str):
    """An argparse type: a number in (0, 1], with one wording for every value outside it."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 1:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text}")
        return value

    return parse


def _add_offload_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offload",
        action="store_true",
        help="keep the decoder blocks on disk and read one at a time (HF safetensors folders; "
        "for models larger than memory)",
    )
    parser.add_argument(
        "--offload-dir",
        metavar="DIR",
        help="where --offload writes quantized block weights (default: a temporary folder; "
        "needs --offload)",
    )


def build_parser(method_name: str = "gptq") -> argparse.ArgumentParser:
    """The full parser; the quantize command carries the flags of ``method_name``'s config."""
    parser = Parser(
        prog="latticequant",
        description="Post-training weight quantization of LLMs as a closest-vector problem.",
    )
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    loading = Parser(add_help=False)
    loading.add_argument(
        "--revision", help="branch, tag or commit of a hub id (MODEL given as org/name)"
    )
    loading.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu, cuda or cuda:N (quantize: one block at a time)",
    )
    loading.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype the model lives and runs in (auto: a HF folder's own, float32 for GGUF "
        "files and checkpoints)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = _add_quantize(sub, [common, loading])
    _add_quantize_run(q)
    _add_config_flags(q, get_method(method_name))
    _add_eval(sub, [common, loading])
    _add_generate(sub, [common, loading])
    _add_report(sub, [common])
    return parser


def _add_quantize(sub, parents) -> argparse.ArgumentParser:
    """The quantize command: the model, the method, the calibration and the output."""
    q = sub.add_parser(
        "quantize",
        parents=parents,
        help="quantize a model block by block and save a checkpoint",
    )
    q.add_argument(
        "model", nargs="?", help="HF folder, .gguf file or hub id org/name (default: SmolLM2-135M)"
    )
    q.add_argument("--method", default="gptq", help=f"one of {', '.join(list_methods())}")
    q.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="settings chosen for you, each named in the summary; flags given beside it win: "
        + "; ".join(f"{name}: {describe_preset(name)}" for name in PRESETS),
    )
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument(
        "--nsamples", type=_positive("--nsamples"), default=64, help="calibration windows (64)"
    )
    q.add_argument(
        "--seqlen", type=_positive("--seqlen", 2), default=512, help="tokens per window (512)"
    )
    q.add_argument(
        "--seed", type=_positive("--seed", 0), default=0, help="seed of the window draw (0)"
    )
    q.add_argument(
        "--text",
        help="calibration text: file, folder, wikitext2 or c4 "
        "(default: the protocol's pydoc_data text, first 80%%)",
    )
    q.add_argument(
        "--checkpoint-format",
        choices=format_names(),
        default=None,
        help="the format the layers are stored in (default: the method's own; the grid "
        "methods write gptq, v1, gptq_v2 or compressed-tensors, which vLLM serves)",
    )
    q.add_argument(
        "--gguf-type",
        default=None,
        metavar="TYPE",
        help="llama.cpp's file type of a --checkpoint-format gguf output (--out FILE.gguf): "
        f"{', '.join(GGUF_TYPES)}",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    q.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="discard the state of an interrupted run instead of resuming it",
    )
    q.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave modules whose name matches this regex in float (repeatable)",
    )
    q.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="PATTERN:FIELD=VALUE",
        help="other settings for matching modules, e.g. 'down_proj:bits=8'",
    )
    return q


def _add_target_flags(q: argparse.ArgumentParser) -> None:
    """The problem each layer solves (``TargetConfig``): objective, its reference, rotation."""
    q.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="what each layer matches: its float weights on its own inputs (layer, the default) "
        "or the float model's outputs (float-outputs: a float copy of each block runs beside it)",
    )
    q.add_argument(
        "--float-reference",
        choices=REFERENCES,
        default=None,
        help="with --objective float-outputs, which float outputs: the float model restarted "
        "from the quantized stream one block back (previous-block, the default), the whole "
        "float model (model), or each block's float copy on the quantized stream (block)",
    )
    q.add_argument(
        "--rotate",
        choices=ROTATIONS,
        default=None,
        help="folded: rotations of the residual stream and the attention heads, drawn from "
        "--seed, folded into the float weights before quantizing (an ordinary checkpoint every "
        "reader runs); folded+online: also down_proj's input rotated at run time; hadamard: "
        "every layer in a randomised Hadamard basis of its inputs, applied at run time "
        "(latticequant's loader; with --checkpoint-format compressed-tensors both online kinds "
        "are written as its transform_config, in the block Hadamard its readers build); none "
        "(default)",
    )


def _add_quantize_run(q: argparse.ArgumentParser) -> None:
    """How a quantize run executes: batches, blocks, the problem each layer solves, experts,
    offload and the perplexity around it."""
    q.add_argument(
        "--batch-size",
        type=_positive("--batch-size"),
        default=None,
        help="windows per forward pass (default: all, one pass per block)",
    )
    q.add_argument(
        "--blocks",
        type=_block_range,
        metavar="START:END",
        help="quantize only the blocks START <= i < END (the others stay in float; the run stops "
        "after END)",
    )
    q.add_argument(
        "--hessian-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype the Hessians accumulate in (float32; the solves run in float64 on the CPU)",
    )
    _add_target_flags(q)
    q.add_argument(
        "--min-expert-tokens",
        type=_positive("--min-expert-tokens", 0),
        default=ExpertPolicy.min_tokens,
        help="mixture-of-experts: routed calibration tokens an expert needs for its own Hessian "
        f"(default {ExpertPolicy.min_tokens}); one with fewer follows --expert-fallback",
    )
    q.add_argument(
        "--expert-fallback",
        choices=EXPERT_FALLBACKS,
        default=ExpertPolicy.fallback,
        help="what such an expert is quantized on: the Hessian of all the block's tokens "
        "(all-tokens, the default), none (rtn: round to nearest) or nothing (float: kept in "
        "float, said in the log and the report)",
    )
    _add_offload_flags(q)
    q.add_argument(
        "--no-eval",
        dest="evaluate",
        action="store_false",
        help="skip the perplexity before and after",
    )
    q.add_argument(
        "--eval-seqlen",
        type=_positive("--eval-seqlen", 2),
        default=512,
        help="perplexity window (default 512)",
    )
    q.add_argument(
        "--eval-text", help="perplexity text file or folder (default: the protocol's held-out 20%%)"
    )
    _add_bos_flag(q, "auto")
    q.add_argument("--json", action="store_true", help="print one JSON object")


def _add_eval(sub, parents) -> None:
    e = sub.add_parser("eval", parents=parents, help="perplexity of a float or quantized model")
    e.add_argument("model", nargs="?", help="HF folder, .gguf file, checkpoint or hub id")
    e.add_argument("--text", help="text file or folder (default: the protocol's held-out 20%%)")
    e.add_argument(
        "--seqlen", type=_positive("--seqlen", 2), default=512, help="window length (default 512)"
    )
    _add_offload_flags(e)
    _add_cache_flag(e)
    _add_bos_flag(e, None)
    e.add_argument("--json", action="store_true", help="print one JSON object")


def _add_generate(sub, parents) -> None:
    g = sub.add_parser(
        "generate",
        parents=parents,
        help="generate text from a float model or a checkpoint",
    )
    g.add_argument("model", nargs="?", help="HF folder, .gguf file, checkpoint or hub id")
    g.add_argument("--prompt", required=True, help="the prompt (a user turn of the chat template)")
    g.add_argument(
        "--max-new-tokens",
        type=_positive("--max-new-tokens"),
        default=64,
        help="tokens to generate at most (64)",
    )
    g.add_argument(
        "--temperature",
        type=_nonnegative_float("--temperature"),
        default=0.0,
        help="0 for greedy decoding (default), above 0 to sample",
    )
    g.add_argument(
        "--top-p",
        type=_unit_fraction("--top-p"),
        default=None,
        help="nucleus sampling, with --temperature above 0 (1.0)",
    )
    g.add_argument("--seed", type=_positive("--seed", 0), default=0, help="sampling seed (0)")
    g.add_argument(
        "--no-chat-template",
        dest="chat",
        action="store_false",
        help="feed the prompt as is, even when the tokenizer has a chat template",
    )
    _add_cache_flag(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")


def _add_report(sub, parents) -> None:
    r = sub.add_parser(
        "report", parents=parents, help="per-layer table of a checkpoint's quantization log"
    )
    r.add_argument("dir", help="checkpoint folder written by latticequant quantize")
    r.add_argument("--plot", metavar="PNG", help="also draw loss and bound per layer")
    r.add_argument("--json", action="store_true", help="print one JSON object")


def _method_name(argv: list[str]) -> str:
    pre = Parser(add_help=False)
    pre.add_argument("--method", default="gptq")
    known, _ = pre.parse_known_args(argv)
    return known.method


def _load(args):
    """The model of ``args.model`` (``--offload-dir`` without ``--offload`` is refused before
    by :func:`_check_offload`). A checkpoint keeps its packed codes resident unless
    ``--dense-cache`` asks for speed."""
    cache = True if getattr(args, "dense_cache", False) else False
    offload = getattr(args, "offload", False)
    offload_dir = getattr(args, "offload_dir", None)
    return load_model(args.model, offload, offload_dir, cache, args.revision, args.dtype)


def _add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dense-cache",
        action="store_true",
        help="keep a dense float copy of each quantized weight (faster on the CPU, no memory "
        "saved); by default only the packed codes stay resident",
    )


def _kernels(model) -> tuple[list[str], str]:
    """The kernels the quantized layers ran, and one line saying so."""
    ran = sorted({k for m in model.modules() if (k := getattr(m, "last_kernel", None))})
    if not ran:
        return [], "kernels: none (a float model)"
    return ran, "kernels: " + "; ".join(f"{k} ({kernel_description(k)})" for k in ran)


def _eval_ids(tokenizer, text_source: str | None, bos: int | None = None):
    special = bos is None  # windows with their own BOS read a stream without one
    if text_source is None:
        return split_ids(tokenize(tokenizer, load_text(None), special))[1]
    return tokenize(tokenizer, load_text(text_source, split="validation"), special)


def _calibration(tokenizer, args, bos: int | None = None):
    ids = tokenize(tokenizer, load_text(args.text, split="train"), bos is None)
    if args.text is None:
        ids = split_ids(ids)[0]
    return calibration_windows(ids, args.nsamples, args.seqlen, args.seed, bos)


def _add_bos_flag(parser: argparse.ArgumentParser, default: str | None) -> None:
    saved = "; default: as the checkpoint was calibrated, else auto" if default is None else ""
    parser.add_argument(
        "--bos",
        choices=BOS_POLICIES,
        default=default,
        help="start every window with the tokenizer's BOS: auto (when the tokenizer adds one "
        f"to a text), always, never{saved}",
    )


def _checkpoint_bos(model_path: str | None) -> str | None:
    """The ``--bos`` a checkpoint was calibrated with (None for a float model or an older one)."""
    if model_path is None or not is_quantized_checkpoint(model_path):
        return None
    try:
        return (read_quant_log(model_path).get("run") or {}).get("bos")
    except (OSError, ValueError):
        return None


def _check_device(name: str) -> None:
    """Refuse a device that cannot be used here, before the model is loaded."""
    check_device(name)


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_seqlen(model, flag: str, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (OPT and GPT-2 have learned ones)."""
    limit = _max_positions(model)
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"{flag} {seqlen} is longer than the model's {limit} positions; use {flag} {limit} "
            "or less"
        )


def _check_out(out: str, overwrite: bool) -> None:
    """Refuse an output path that cannot be written, before any slow work. Missing parent
    folders are made (like ``mkdir -p``) when the run takes its lock; here only a parent that
    cannot be made, or cannot be written in, is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExistsError(f"--out {out} is a file, not a folder; choose another path")
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} already exists; pass --overwrite to replace it"
        )
    _check_can_make("--out", out, os.path.dirname(os.path.abspath(out)))


def _check_can_make(flag: str, given: str, folder: str) -> None:
    """Refuse ``folder`` when it cannot be made or written in: its nearest existing ancestor
    must be a folder this process may write in."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and not os.path.islink(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {given}: {path} is a file, not a folder; choose another path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {given}: cannot write in {path} (permission denied or read-only)")


def _check_offload(args) -> None:
    """``--offload-dir`` needs ``--offload`` and a folder that can be made; refused here, before
    the model loads."""
    folder = getattr(args, "offload_dir", None)
    if folder is None:
        return
    if not args.offload:
        raise ValueError(f"--offload-dir {folder} needs --offload (it is where --offload writes)")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--offload-dir {folder} is a file, not a folder; choose another path")
    _check_can_make("--offload-dir", folder, folder)


def _check_text(flag: str, source: str | None) -> None:
    """Refuse a text source that names nothing, before the model loads."""
    if source is not None and source not in HF_DATASETS and not os.path.exists(source):
        raise ValueError(f"{flag} {source!r} is neither a file, a folder, nor one of {HF_DATASETS}")


def _check_sampling(args) -> None:
    """``--top-p`` only shapes sampling: refuse it with greedy decoding."""
    if args.top_p is not None and args.top_p < 1 and args.temperature == 0:
        raise ValueError(
            f"--top-p {args.top_p:g} only applies to sampling; add --temperature T (T > 0) "
            "or drop --top-p"
        )


def _emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print("\n".join(lines))


PRESETS: dict[str, dict[str, str]] = {
    "fast": {"refine": "", "objective": "layer", "rotate": "none"},
    "best": {
        "order": "act",
        "refine": "cd,scales",
        "objective": "float-outputs",
        "rotate": "hadamard",
    },
}
"""What ``--preset`` sets: config fields (where the method's config has them) and the target.
``fast`` leaves out everything that costs time beyond the decode; ``best`` takes the
highest-quality settings whatever the cost (the per-layer rotation: a checkpoint only our loader
runs)."""

TARGET_FLAGS = ("objective", "rotate")


def describe_preset(name: str) -> str:
    return " ".join(f"--{k} {v!r}" if not v else f"--{k} {v}" for k, v in PRESETS[name].items())


def apply_preset(args) -> dict[str, str]:
    """Fill the flags the user left out with the preset's values; returns what it set."""
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    fields = {f.name for f in settable_fields(get_method(args.method).config_cls)}
    chosen = {}
    for key, value in preset.items():
        attr = key if key in TARGET_FLAGS else f"cfg_{key}"
        if key not in TARGET_FLAGS and key not in fields:
            continue  # the method has no such setting
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)
            chosen[key] = value
    return chosen


def run_spec(args) -> RunSpec:
    """The run the quantize command's flags describe (after ``--preset`` filled its part)."""
    method = get_method(args.method)
    overrides = [Override(p, skip=True) for p in args.skip]
    for text in args.override:
        overrides.append(parse_override(text, method.config_cls))
    return RunSpec(
        method=method.name,
        config=config_from_args(method, args),
        overrides=tuple(overrides),
        target=TargetConfig(
            args.objective or "layer",
            args.rotate or "none",
            args.seed,
            reference=args.float_reference or "previous-block",
        ),
        experts=ExpertPolicy(args.min_expert_tokens, args.expert_fallback),
        calibration=CalibrationSpec(args.text, args.nsamples, args.seqlen, args.seed, args.bos),
        output=OutputSpec(
            args.out,
            args.checkpoint_format,
            args.overwrite,
            args.resume,
            gguf_type=args.gguf_type,
            gguf_source=_gguf_source(args.model) if args.checkpoint_format == "gguf" else None,
        ),
        execution=ExecutionSpec(args.device, args.batch_size, args.blocks, args.hessian_dtype),
    )


def _gguf_source(model: str | None) -> str | None:
    """Where a GGUF output takes the tokenizer from: the GGUF file a model argument reads (the
    default model's included), or the Hugging Face folder it names; else None."""
    if model is None:
        return default_model_path()
    if os.path.isfile(model) and model.endswith(".gguf"):
        return model
    if os.path.isdir(model):
        ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        files = os.listdir(model)
        if "config.json" in files:
            return model
        if len(ggufs) == 1:
            return os.path.join(model, ggufs[0])
    return None


def cmd_quantize(args) -> int:
    """Quantize; under torchrun every rank runs this with the same arguments."""
    args.preset_settings = apply_preset(args)
    spec = run_spec(args)
    container = spec.resolved()[2].container  # refuses a wrong --gguf-type in one line
    if container == "folder":
        _check_out(args.out, args.overwrite)
    else:
        check_gguf_output(args.out, args.overwrite, spec.output.gguf_source)
    _check_device(args.device)
    _check_offload(args)
    _check_text("--text", args.text)
    if args.evaluate:
        _check_text("--eval-text", args.eval_text)
    spec.check()  # what the method or its format cannot take is refused before the model loads
    world = World.from_env(args.device)
    with world.failing_together():
        world.shard(args.nsamples)  # enough windows for every rank, before the model loads
        # the lock comes before anything is written or deleted (--no-resume); rank 0 writes
        lock = output_lock(args.out) if world.rank == 0 else contextlib.nullcontext()
        with lock:
            code = _quantize(args, spec, world)
    world.close()
    return code


def _quantize(args, spec: RunSpec, world: World) -> int:
    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; calibration needs a tokenizer")
    _check_seqlen(model, "--seqlen", args.seqlen)
    if args.evaluate:
        _check_seqlen(model, "--eval-seqlen", args.eval_seqlen)
    plan = prepare(model, spec, world)  # every check against the model, before any slow work
    method, config = plan.method, plan.config
    bos = window_bos(tokenizer, args.bos)
    calib = _calibration(tokenizer, args, bos)
    load_s = time.perf_counter() - t0
    ppl_before = ppl_after = None
    heldout = None
    if args.evaluate:
        heldout = _eval_ids(tokenizer, args.eval_text, bos)
        ppl_before = perplexity(model, heldout, args.eval_seqlen, world=world, bos=bos)
        log.info("perplexity before: %.4f", ppl_before)
    t1 = time.perf_counter()
    summary = quantize_model(
        model,
        Calibration(calib, tokenizer=tokenizer),
        plan,
        run_info={"bos": "never" if bos is None else "always", "bos_token_id": bos},
    )
    quantize_s = time.perf_counter() - t1
    if args.evaluate:
        ppl_after = perplexity(model, heldout, args.eval_seqlen, world=world, bos=bos)
    total_s = time.perf_counter() - t0
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "method": method.name,
        "config": {f.name: getattr(config, f.name) for f in settable_fields(method.config_cls)},
        "out": args.out,
        "n_layers": len(summary),
        "n_skipped": len(summary.skipped),
        "skipped": summary.skipped,
        "load_s": load_s,
        "quantize_s": quantize_s,
        "total_s": total_s,
        "blocks_resumed": summary.blocks_resumed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "timings": summary.timings,
        "checkpoint_format": plan.stored_format.name,
        "rotation": None if plan.fold is None else plan.fold.as_dict(),
        "preset": args.preset,
        "preset_settings": args.preset_settings,
        "target": {
            "objective": spec.target.objective,
            "rotate": spec.target.rotate,
            "float_reference": spec.target.reference if spec.target.float_outputs else None,
        },
    }
    lines = _summary_lines(args, spec, plan, summary, quantize_s, total_s, world)
    if args.evaluate:
        lines.append(f"perplexity before: {ppl_before:.4f}")
        lines.append(f"perplexity after:  {ppl_after:.4f}")
    if world.rank == 0:
        _emit(args, payload, lines)
    return 0


def _summary_lines(args, spec, plan, summary, quantize_s, total_s, world) -> list[str]:
    """What a quantize run prints: the layers, what stayed in float and why, the rotation, the
    preset's choices and, across ranks, where the time went."""
    method = plan.method
    skipped = ""
    if summary.skipped:
        reasons = sorted({r.split(" (")[0] for r in summary.skipped.values()})
        skipped = f", {len(summary.skipped)} left in float ({'; '.join(reasons)})"
    fell_back = [s["expert_fallback"] for s in summary if s.get("expert_fallback")]
    if fell_back:
        skipped += (
            f", {len(fell_back)} expert layers with fewer than {spec.experts.min_tokens} routed "
            f"tokens quantized on {spec.experts.fallback}"
        )
    lines = [
        f"quantized {len(summary)} layers with {method.name}{skipped} in {quantize_s:.1f} s "
        f"(total {total_s:.1f} s); checkpoint: {args.out}"
    ]
    lines += plan.format.run_notes()
    if plan.fold is not None:
        lines.append(
            f"rotations folded into the weights (--rotate {spec.target.rotate}, seed "
            f"{plan.fold.seed})"
            + (
                "; the tied embeddings were untied: the checkpoint holds the head's own matrix"
                if plan.fold.untied
                else ""
            )
        )
    if args.preset:
        chosen = " ".join(f"--{k} {v or repr(v)}" for k, v in args.preset_settings.items())
        lines.append(f"preset {args.preset}: {chosen or 'every setting given by a flag'}")
        if spec.target.rotate == "hadamard" and plan.stored_format.quant_method == "latticequant":
            lines.append("the per-layer rotation's checkpoint runs in latticequant's loader only")
    if world.distributed:
        t = summary.timings
        lines.append(
            f"{world.size} ranks; rank 0: forwards {t['forward_s']:.1f} s, Hessians "
            f"{t['hessian_s']:.1f} s, solves {t['solve_s']:.1f} s, exchanges "
            f"{sum(t.get(f'{kind}_s', 0.0) for kind in world.timings):.1f} s"  # each exchange kind
        )
    return lines


def cmd_eval(args) -> int:
    """Perplexity; under torchrun the windows are shared out across the ranks."""
    world = World.from_env("cpu")
    with world.failing_together():
        code = _evaluate(args, world)
    world.close()
    return code


def _evaluate(args, world: World) -> int:
    t0 = time.perf_counter()
    _check_device(args.device)
    _check_offload(args)
    _check_text("--text", args.text)
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; perplexity needs a tokenizer")
    _check_seqlen(model, "--seqlen", args.seqlen)
    policy = args.bos or _checkpoint_bos(args.model) or "auto"
    bos = window_bos(tokenizer, policy)
    ids = _eval_ids(tokenizer, args.text, bos)
    if store_of(model) is None:  # blocks kept on disk go to the device one at a time
        model.to(args.device)
    ppl = perplexity(model, ids, args.seqlen, device=args.device, world=world, bos=bos)
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "text": args.text,
        "seqlen": args.seqlen,
        "bos": bos,
        "tokens": len(ids),
        "perplexity": ppl,
        "time_s": time.perf_counter() - t0,
        "kernels": _kernels(model)[0],
    }
    if world.rank == 0:
        lines = [f"perplexity: {ppl:.4f} ({len(ids)} tokens, windows of {args.seqlen})"]
        lines.append(_kernels(model)[1])
        _emit(args, payload, lines)
    return 0


def cmd_generate(args) -> int:
    """Generate from a float model or a checkpoint; the speed and the weight memory with it."""
    _check_sampling(args)
    top_p = 1.0 if args.top_p is None else args.top_p
    config = GenerationConfig(args.max_new_tokens, args.temperature, top_p, args.seed, args.chat)
    _check_device(args.device)
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files; generation needs a tokenizer")
    model.to(args.device)
    result = generate(model, tokenizer, args.prompt, config, args.device)
    memory = weight_memory(model)
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "prompt": args.prompt,
        **result.to_dict(),
        "weight_bytes": memory["stored"],
        "weight_cache_bytes": memory["cache"],
        "kernels": _kernels(model)[0],
    }
    mib = 1 << 20
    lines = [
        result.text,
        "",
        f"{result.new_tokens} tokens"
        + (" (stopped at end of sequence)" if result.stopped_at_eos else "")
        + f"; prefill {result.prompt_tokens} tokens in {result.prefill_s:.2f} s, decode "
        f"{result.decode_tokens_per_s:.1f} tokens/s; weights {memory['stored'] / mib:.1f} MiB"
        + (f" + {memory['cache'] / mib:.1f} MiB dense cache" if memory["cache"] else ""),
        _kernels(model)[1],
    ]
    _emit(args, payload, lines)
    return 0


def cmd_report(args) -> int:
    qlog, rows, total = load_report(args.dir)
    if args.plot:
        plot_loss_vs_bound(rows, args.plot, title=f"{args.dir} ({qlog.get('method')})")
    lines = [format_table(rows), ""]
    lines.append(
        f"{total['n_layers']} layers ({total['skipped']} skipped), method {total['method']}: "
        f"loss {total['loss']:.4g} = {total['rel_rtn']:.3f} x RTN, {total['clipped']} clipped "
        f"codes, {total['bits_per_weight']:.3f} bits per weight"
    )
    if total["expert_layers"]:
        fb = total["expert_fallbacks"]
        lines.append(
            f"{total['expert_layers']} expert layers; fell back for too few routed tokens: "
            + (", ".join(f"{n} on {k}" for k, n in sorted(fb.items())) if fb else "none")
        )
    if args.plot:
        lines.append(f"plot: {args.plot}")
    _emit(args, {"summary": total, "layers": rows, "plot": args.plot}, lines)
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``latticequant`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _glue_negative_values(argv)
        parser = build_parser(_method_name(argv) if argv[:1] == ["quantize"] else "gptq")
        args = parser.parse_args(argv)
    except (ValueError, UsageError) as exc:
        print(f"latticequant: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    _quiet_transformers(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("latticequant: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, RankFailedError) as exc:
        return _fail(args, exc)
    except Exception as exc:  # anything else is still one line, never a traceback
        return _fail(args, exc, unexpected=True)


def _quiet_transformers(verbose: bool) -> None:
    """Our own progress bars and one-line errors only: transformers' loading bars and notices
    are shown with ``-v``."""
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _fail(args, exc: BaseException, unexpected: bool = False) -> int:
    """Print one line for a failed command (the traceback too with ``-v``); exit status 1.

    An exception the library does not raise on purpose is named by its type, with a hint.
    """
    if args.verbose:
        log.error("failed", exc_info=exc)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    message = lines[0] if lines else type(exc).__name__
    if _disk_full(exc):
        message, unexpected = _disk_full_message(args), False
    if unexpected:
        message = f"{type(exc).__name__}: {message} (rerun with -v for the traceback)"
    print(f"latticequant: error: {message}", file=sys.stderr)
    return 1


def _disk_full(exc: BaseException) -> bool:
    """An error that means the disk (or the quota) is full, raised by Python or by a library
    that reports the OS error in its message (safetensors: ``... (os error 28)``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or f"os error {errno.ENOSPC}" in text


def _disk_full_message(args) -> str:
    """What a full disk means for the command that ran, and what to do."""
    if args.command == "quantize":
        work = partial_folder(args.out)
        return (
            f"no space left on device while writing {args.out} (the unfinished run in {work} "
            "is resumable: free space and rerun the same command)"
        )
    where = getattr(args, "offload_dir", None) or getattr(args, "plot", None)
    where = f" while writing {where}" if where else ""
    return f"no space left on device{where}; free space and rerun the same command"


if __name__ == "__main__":
    sys.exit(main())
