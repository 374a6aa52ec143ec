"""The ``latticequant`` command: quantize a model, evaluate perplexity, report per-layer figures.

The quantize command builds the method's config from the fields of its config dataclass, so a
newly registered method gets its flags (``--outlier-rate``, ``--target-bits``, ...) for free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

log = logging.getLogger("latticequant")

__all__ = ["main", "build_parser", "config_from_args"]

# Flags whose spelling differs from the config field they set.
FLAG_ALIASES = {"group_size": ["--group-size", "--groupsize"], "bits": ["--bits", "--wbits"]}
SKIP_FIELDS = {"extra"}


def _config_fields(config_cls) -> list[dataclasses.Field]:
    """Fields that a flag can set: those whose default is a bool, int, float or str."""
    out = []
    for f in dataclasses.fields(config_cls):
        if f.name in SKIP_FIELDS or f.default is dataclasses.MISSING:
            continue
        if isinstance(f.default, (bool, int, float, str)):
            out.append(f)
    return out


def _add_config_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    group = parser.add_argument_group(f"{config_cls.__name__} fields")
    for f in _config_fields(config_cls):
        flags = FLAG_ALIASES.get(f.name, [f"--{f.name.replace('_', '-')}"])
        default = f.default
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


def config_from_args(config_cls, args: argparse.Namespace):
    """The method's config with the defaults of its dataclass, changed by the flags given."""
    changes = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in _config_fields(config_cls)
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    return config_cls(**changes)


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
        help="where --offload writes quantized block weights (default: a temporary folder)",
    )


def build_parser(method_name: str = "gptq") -> argparse.ArgumentParser:
    """The full parser; the quantize command carries the flags of ``method_name``'s config."""
    from latticequant.methods import get_method, list_methods

    parser = argparse.ArgumentParser(
        prog="latticequant",
        description="Post-training weight quantization of LLMs as a closest-vector problem.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize", parents=[common], help="quantize a model block by block and save a checkpoint"
    )
    q.add_argument("model", nargs="?", help="HF folder or .gguf file (default: SmolLM2-135M)")
    q.add_argument("--method", default="gptq", help=f"one of {', '.join(list_methods())}")
    q.add_argument("--out", required=True, help="output checkpoint folder")
    q.add_argument("--nsamples", type=int, default=64, help="calibration windows (default 64)")
    q.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    q.add_argument("--seed", type=int, default=0, help="seed of the window draw (default 0)")
    q.add_argument(
        "--text",
        help="calibration text: file, folder, wikitext2 or c4 "
        "(default: the protocol's pydoc_data text, first 80%%)",
    )
    q.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq")
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
    q.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward pass (default: all, one pass per block)",
    )
    q.add_argument("--device", default="cpu", help="compute device for the blocks (cpu, cuda)")
    _add_offload_flags(q)
    q.add_argument(
        "--no-eval",
        dest="evaluate",
        action="store_false",
        help="skip the perplexity before and after",
    )
    q.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window (default 512)")
    q.add_argument(
        "--eval-text", help="perplexity text file or folder (default: the protocol's held-out 20%%)"
    )
    q.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(q, get_method(method_name).config_cls)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a float or quantized model")
    e.add_argument("model", nargs="?", help="HF folder, .gguf file or checkpoint folder")
    e.add_argument("--text", help="text file or folder (default: the protocol's held-out 20%%)")
    e.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    _add_offload_flags(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser(
        "report", parents=[common], help="per-layer table of a checkpoint's quantization log"
    )
    r.add_argument("dir", help="checkpoint folder written by latticequant quantize")
    r.add_argument("--plot", metavar="PNG", help="also draw loss and bound per layer")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _method_name(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="gptq")
    known, _ = pre.parse_known_args(argv)
    return known.method


def _load(args):
    """The model of ``args.model``; ``--offload-dir`` alone also asks for offloading."""
    from latticequant.models import load_model

    return load_model(args.model, args.offload or bool(args.offload_dir), args.offload_dir)


def _eval_ids(tokenizer, text_source: str | None):
    from latticequant.data import load_text, split_ids, tokenize

    if text_source is None:
        return split_ids(tokenize(tokenizer, load_text(None)))[1]
    return tokenize(tokenizer, load_text(text_source, split="validation"))


def _calibration(tokenizer, args):
    from latticequant.data import calibration_windows, load_text, split_ids, tokenize

    ids = tokenize(tokenizer, load_text(args.text, split="train"))
    if args.text is None:
        ids = split_ids(ids)[0]
    return calibration_windows(ids, args.nsamples, args.seqlen, args.seed)


def _emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print("\n".join(lines))


def cmd_quantize(args) -> int:
    from latticequant.data import perplexity
    from latticequant.methods import get_method
    from latticequant.pipeline import (
        OutputExistsError,
        Override,
        parse_override,
        quantize_model,
    )

    method = get_method(args.method)
    config = config_from_args(method.config_cls, args)
    if os.path.exists(args.out) and not args.overwrite:  # refuse before any slow work
        raise OutputExistsError(
            f"output folder {args.out} already exists; pass --overwrite to replace it"
        )
    overrides = [Override(p, skip=True) for p in args.skip]
    overrides += [parse_override(o, method.config_cls) for o in args.override]
    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    calib = _calibration(tokenizer, args)
    load_s = time.perf_counter() - t0
    ppl_before = ppl_after = None
    heldout = None
    if args.evaluate:
        heldout = _eval_ids(tokenizer, args.eval_text)
        ppl_before = perplexity(model, heldout, args.eval_seqlen)
        log.info("perplexity before: %.4f", ppl_before)
    t1 = time.perf_counter()
    stats = quantize_model(
        model,
        tokenizer,
        calib,
        method,
        config,
        args.out,
        overrides=overrides,
        resume=args.resume,
        overwrite=args.overwrite,
        device=args.device,
        batch_size=args.batch_size,
        checkpoint_format=args.checkpoint_format,
    )
    quantize_s = time.perf_counter() - t1
    if args.evaluate:
        ppl_after = perplexity(model, heldout, args.eval_seqlen)
    total_s = time.perf_counter() - t0
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "method": method.name,
        "config": {f.name: getattr(config, f.name) for f in _config_fields(method.config_cls)},
        "out": args.out,
        "n_layers": len(stats),
        "load_s": load_s,
        "quantize_s": quantize_s,
        "total_s": total_s,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
    }
    lines = [
        f"quantized {len(stats)} layers with {method.name} in {quantize_s:.1f} s "
        f"(total {total_s:.1f} s); checkpoint: {args.out}"
    ]
    if args.evaluate:
        lines.append(f"perplexity before: {ppl_before:.4f}")
        lines.append(f"perplexity after:  {ppl_after:.4f}")
    _emit(args, payload, lines)
    return 0


def cmd_eval(args) -> int:
    from latticequant.data import perplexity

    t0 = time.perf_counter()
    model, tokenizer = _load(args)
    ids = _eval_ids(tokenizer, args.text)
    ppl = perplexity(model, ids, args.seqlen)
    payload = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "text": args.text,
        "seqlen": args.seqlen,
        "tokens": len(ids),
        "perplexity": ppl,
        "time_s": time.perf_counter() - t0,
    }
    _emit(args, payload, [f"perplexity: {ppl:.4f} ({len(ids)} tokens, windows of {args.seqlen})"])
    return 0


def cmd_report(args) -> int:
    from latticequant.report import format_table, load_report, plot_loss_vs_bound

    qlog, rows, total = load_report(args.dir)
    if args.plot:
        plot_loss_vs_bound(rows, args.plot, title=f"{args.dir} ({qlog.get('method')})")
    lines = [format_table(rows), ""]
    lines.append(
        f"{total['n_layers']} layers ({total['skipped']} skipped), method {total['method']}: "
        f"loss {total['loss']:.4g} = {total['rel_rtn']:.3f} x RTN, {total['clipped']} clipped "
        f"codes, {total['bits_per_weight']:.3f} bits per weight"
    )
    if args.plot:
        lines.append(f"plot: {args.plot}")
    _emit(args, {"summary": total, "layers": rows, "plot": args.plot}, lines)
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``latticequant`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_method_name(argv) if argv[:1] == ["quantize"] else "gptq")
    except ValueError as exc:
        print(f"latticequant: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("latticequant: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as exc:
        if args.verbose:
            log.exception("failed")
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"latticequant: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
