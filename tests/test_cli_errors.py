"""Bad input to every command: a non-zero exit, one line on stderr naming the problem, no
traceback, and nothing left where the output would have gone."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_char_tokenizer, make_tiny_llama, make_tiny_moe, make_tiny_opt

from latticequant import cli
from latticequant.methods import list_methods
from latticequant.pipeline.data import protocol_text


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Every input the corpus needs, made once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    make_tiny_llama().save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    make_tiny_opt().save_pretrained(root / "opt")
    make_char_tokenizer().save_pretrained(root / "opt")
    make_tiny_llama(hidden_size=8 * 67).save_pretrained(root / "odd")  # d_in 536 = 8 x 67
    make_char_tokenizer().save_pretrained(root / "odd")
    make_tiny_moe("qwen3_moe").save_pretrained(root / "moe")
    make_char_tokenizer().save_pretrained(root / "moe")
    (root / "text.txt").write_text(protocol_text()[:6000])
    (root / "empty.txt").write_text("   \n")
    (root / "short.txt").write_text("too short")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "weights.bin").write_bytes(b"0" * 64)
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    (root / "a-file").write_text("not a folder")
    (root / "exists").mkdir()
    (root / "exists" / "keep.txt").write_text("kept")
    for name, text in {
        "config-list": "[1, 2]",
        "config-garbage": "{garbage",
        "config-bert": json.dumps({"model_type": "bert", "hidden_size": 8}),
    }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    bin_only = root / "bin-only"  # weights as a pickle only, which offloading cannot map
    make_tiny_llama().save_pretrained(bin_only)
    for f in bin_only.glob("*.safetensors"):
        f.unlink()
    torch.save(make_tiny_llama().state_dict(), bin_only / "pytorch_model.bin")
    make_char_tokenizer().save_pretrained(bin_only)
    for name, text in {
        "log-list": "[1]",
        "log-noname": json.dumps({"layers": [{"loss": 1.0}]}),
        "log-garbage": "{",
        "log-layers-dict": json.dumps({"layers": {"a": 1}}),
    }.items():
        (root / name).mkdir()
        (root / name / "quant_log.json").write_text(text)
    args = _quantize(root, root / "ckpt", "--no-eval")
    assert cli.main(args) == 0
    shutil.copytree(root / "ckpt", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # an HPTQ checkpoint whose chunk offsets were tampered with (one offset one bit late)
    args = _quantize(root, root / "hptq-offsets", "--no-eval", "--method", "hptq")
    args[2:4] = []  # HPTQ has no groups
    assert cli.main(args) == 0
    from safetensors.torch import load_file, save_file

    weights = root / "hptq-offsets" / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("hptq_offsets"))
    tensors[key][2] += 1
    save_file(tensors, weights, metadata={"format": "pt"})
    return root


def _quantize(root: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    return [
        "quantize",
        str(root / model),
        "--group-size",
        "32",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--text",
        str(root / "text.txt"),
        "--eval-text",
        str(root / "text.txt"),
        "--eval-seqlen",
        "64",
        "--out",
        str(out),
        *extra,
    ]


# (id, argv builder, what the one line must say). ``q(...)`` is a quantize run into OUT.
def q(*extra, model="model"):
    def argv(root, out):
        return _quantize(root, out, *(a.replace("ROOT", str(root)) for a in extra), model=model)

    return argv


def raw(*argv):
    return lambda root, out: [a.replace("ROOT", str(root)).replace("OUT", str(out)) for a in argv]


def _command(command: str, *extra: str):
    """``command`` run on a valid input with ``extra`` (one wrong flag) added."""
    if command == "quantize" and "hptq" in extra:  # HPTQ has no --group-size
        return raw(command, "ROOT/model", "--out", "OUT", *extra)
    if command == "quantize":
        return q(*extra)
    inputs = {
        "eval": ("ROOT/model", "--seqlen", "64"),
        "generate": ("ROOT/model", "--prompt", "x", "--max-new-tokens", "2"),
        "report": ("ROOT/ckpt",),
    }[command]
    return raw(command, *inputs, *extra)


CORPUS = [
    ("missing model", raw("quantize", "ROOT/nope", "--out", "OUT"), "does not exist"),
    ("model is not gguf", q(model="weights.bin"), "not a .gguf"),
    ("corrupt gguf", q(model="broken.gguf"), "cannot read GGUF"),
    ("config.json a list", q(model="config-list"), "config-list"),
    ("config.json garbage", q(model="config-garbage"), "cannot load model"),
    ("wrong architecture", q(model="config-bert"), "cannot load model"),
    ("offload without safetensors", q("--offload", model="bin-only"), "safetensors"),
    ("out exists", raw("quantize", "ROOT/model", "--out", "ROOT/exists"), "--overwrite"),
    ("out is a file", raw("quantize", "ROOT/model", "--out", "ROOT/a-file"), "is a file"),
    (
        "out parent is a file",
        raw("quantize", "ROOT/model", "--out", "ROOT/a-file/sub/out"),
        "ROOT/a-file is a file, not a folder",
    ),
    ("bits not a number", q("--bits", "x"), "invalid int value: 'x'"),
    ("bits out of range", q("--bits", "9"), "bits must be an integer from 2 to 8"),
    ("bits 5", q("--bits", "5"), "bits=5 (--bits 5) cannot be stored in the GPTQ format"),
    ("bits 6", q("--bits", "6"), "bits=6 (--bits 6) cannot be stored"),
    ("bits 7", q("--bits", "7"), "bits=7 (--bits 7) cannot be stored"),
    ("no-clip with gptq", q("--no-clip"), "--no-clip"),
    ("no-clip with rtn", q("--method", "rtn", "--no-clip"), "ssqr, hptq or hrtn"),
    ("group size zero", q("--group-size", "0"), "group_size"),
    ("negative damping", q("--damp", "-1"), "damp must be a finite non-negative number"),
    ("unknown order", q("--order", "sideways"), "order must be one of"),
    ("unknown method", q("--method", "nope"), "unknown quantization method 'nope'"),
    ("nsamples zero", q("--nsamples", "0"), "--nsamples must be at least 1"),
    ("seqlen one", q("--seqlen", "1"), "--seqlen must be at least 2"),
    ("negative seed", q("--seed", "-1"), "--seed must be at least 0"),
    ("batch size zero", q("--batch-size", "0"), "--batch-size must be at least 1"),
    ("seqlen past positions", q("--seqlen", "4096"), "longer than the model's 256 positions"),
    ("opt seqlen past positions", q("--seqlen", "4096", model="opt"), "positions"),
    ("eval seqlen past positions", q("--eval-seqlen", "1000"), "--eval-seqlen 1000"),
    ("unknown checkpoint format", q("--checkpoint-format", "gptq_v3"), "invalid choice"),
    (
        "compressed-tensors refitted act-order",
        q("--checkpoint-format", "compressed-tensors", "--order", "act", "--no-static-groups"),
        "use --static-groups (the default)",
    ),
    (
        "compressed-tensors from ssqr",
        q("--checkpoint-format", "compressed-tensors", "--method", "ssqr"),
        "method ssqr writes ssqr",
    ),
    ("unknown gguf type", q("--checkpoint-format", "gguf", "--gguf-type", "Q4_K"), "valid: Q8_0"),
    ("gguf type without gguf", q("--gguf-type", "Q4_K_M"), "needs --checkpoint-format gguf"),
    ("gguf without a type", q("--checkpoint-format", "gguf"), "needs --gguf-type TYPE"),
    (
        "gguf with a rotation",
        q("--checkpoint-format", "gguf", "--gguf-type", "Q4_0", "--rotate", "hadamard"),
        "online rotations cannot go into a gguf file",
    ),
    (
        "gguf with a scale search",
        q("--checkpoint-format", "gguf", "--gguf-type", "Q4_0", "--scale-method", "hessian"),
        "block scales are fitted as llama.cpp fits them",
    ),
    (
        "gguf out not a .gguf file",
        q("--checkpoint-format", "gguf", "--gguf-type", "Q4_0"),
        "one file named *.gguf",
    ),
    (
        "gguf from a folder with a word-level tokenizer",
        raw(
            "quantize",
            "ROOT/model",
            "--checkpoint-format",
            "gguf",
            "--gguf-type",
            "Q4_0",
            "--out",
            "OUT.gguf",
        ),
        "byte-level BPE only",
    ),
    ("override unknown field", q("--override", "q_proj:extra=foo"), "unknown field 'extra'"),
    ("override without pattern", q("--override", "bits=3"), "PATTERN"),
    ("override wrong type", q("--override", "q_proj:bits=foo"), "bits expects an integer"),
    ("override out of range", q("--override", "q_proj:bits=9"), "bits must be an integer"),
    ("override bits 5", q("--override", "down_proj:bits=5"), "cannot be stored"),
    ("override bad regex", q("--override", "[:bits=3"), "not a regex"),
    ("skip bad regex", q("--skip", "["), "not a regex"),
    ("skip everything", q("--skip", "."), "no layer left to quantize"),
    (
        "text missing",
        q("--text", "ROOT/none.txt"),
        "neither a file",
    ),
    (
        "text empty",
        q("--text", "ROOT/empty.txt"),
        "empty",
    ),
    (
        "text too short",
        q("--text", "ROOT/short.txt"),
        "too short",
    ),
    (
        "text binary",
        q("--text", "ROOT/binary.txt"),
        "not a text file",
    ),
    ("unknown objective", q("--objective", "outputs"), "invalid choice: 'outputs'"),
    ("unknown rotation", q("--rotate", "walsh"), "invalid choice: 'walsh'"),
    (
        "unknown float reference",
        q("--objective", "float-outputs", "--float-reference", "float"),
        "invalid choice: 'float'",
    ),  # fmt: skip
    (
        "float reference without the objective",
        q("--float-reference", "model"),
        "needs the float-outputs objective",
    ),  # fmt: skip
    (
        "rotation of a size it cannot factor",
        q("--rotate", "hadamard", "--bits", "8", model="odd"),
        "odd factor 67 above 63",
    ),
    ("folded rotation of an opt", q("--rotate", "folded", model="opt"), "cannot fold rotations"),
    ("folded rotation of experts", q("--rotate", "folded+online", model="moe"), "cannot fold"),
    (
        "folded rotation kept on disk",
        q("--rotate", "folded", "--offload"),
        "--offload cannot do yet",
    ),
    ("unknown device", q("--device", "toaster"), "--device"),
    ("cuda without a gpu", q("--device", "cuda:0"), "CUDA is not available"),
    ("eval missing", raw("eval", "ROOT/nope"), "does not exist"),
    ("eval config list", raw("eval", "ROOT/config-list"), "config-list"),
    ("eval truncated", raw("eval", "ROOT/truncated"), "truncated or corrupt"),
    ("eval seqlen zero", raw("eval", "ROOT/model", "--seqlen", "0"), "at least 2"),
    ("eval hptq offsets", raw("eval", "ROOT/hptq-offsets"), "the stream or its offsets"),
    (
        "hptq chunk rows zero",
        raw("quantize", "ROOT/model", "--method", "hptq", "--chunk-rows", "0", "--out", "OUT"),
        "chunk_rows",
    ),
    (
        "eval text missing",
        raw("eval", "ROOT/model", "--text", "ROOT/none.txt", "--seqlen", "64"),
        "neither",
    ),
    ("eval seqlen past positions", raw("eval", "ROOT/model", "--seqlen", "999"), "positions"),
    ("report not a checkpoint", raw("report", "ROOT/exists"), "quant_log.json"),
    ("report log a list", raw("report", "ROOT/log-list"), "not a JSON object"),
    ("report log without name", raw("report", "ROOT/log-noname"), "with a 'name'"),
    ("report log garbage", raw("report", "ROOT/log-garbage"), "not valid JSON"),
    ("report layers not a list", raw("report", "ROOT/log-layers-dict"), "must be a list"),
    ("report plot nowhere", raw("report", "ROOT/ckpt", "--plot", "ROOT/no/where.png"), "where"),
    *[  # every flag of every command, once with a wrong value (``extra`` below)
        (f"{command} {' '.join(argv)}", _command(command, *argv), expected)
        for command, argv, expected in [
            ("quantize", ("--verbose=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--revision", "main"), "--revision main applies to hub ids"),
            ("quantize", ("--device", "cpu:1"), "the CPU takes no index; use --device cpu"),
            ("quantize", ("--dtype", "int8"), "invalid choice: 'int8'"),
            ("quantize", ("--out",), "expected one argument"),
            ("quantize", ("--nsamples", "many"), "--nsamples expects an integer, got 'many'"),
            ("quantize", ("--seqlen", "1.5"), "--seqlen expects an integer, got '1.5'"),
            ("quantize", ("--seed", "x"), "--seed expects an integer, got 'x'"),
            ("quantize", ("--overwrite=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--no-resume=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--skip",), "expected one argument"),
            ("quantize", ("--batch-size", "-2"), "--batch-size must be at least 1, got -2"),
            ("quantize", ("--blocks", "-1:2"), "expects START:END with 0 <= START < END, got -1:2"),
            ("quantize", ("--blocks", "2:1"), "expects START:END with 0 <= START < END, got 2:1"),
            ("quantize", ("--blocks", "one"), "--blocks expects START:END (two integers"),
            ("quantize", ("--hessian-dtype", "float16"), "invalid choice: 'float16'"),
            ("quantize", ("--preset", "fastest"), "invalid choice: 'fastest'"),
            ("quantize", ("--min-expert-tokens", "-1"), "--min-expert-tokens must be at least 0"),
            ("quantize", ("--expert-fallback", "zero"), "invalid choice: 'zero'"),
            ("quantize", ("--offload=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--offload-dir", "ROOT/off"), "--offload-dir ROOT/off needs --offload"),
            (
                "quantize",
                ("--offload", "--offload-dir", "ROOT/a-file"),
                "--offload-dir ROOT/a-file is a file, not a folder",
            ),
            ("quantize", ("--no-eval=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--eval-seqlen", "0"), "--eval-seqlen must be at least 2, got 0"),
            (
                "quantize",
                ("--eval-text", "ROOT/none.txt"),
                "--eval-text 'ROOT/none.txt' is neither",
            ),
            ("quantize", ("--bos", "sometimes"), "invalid choice: 'sometimes'"),
            ("quantize", ("--json=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--wbits", "3.5"), "invalid int value: '3.5'"),
            ("quantize", ("--groupsize", "-2"), "group_size must be -1 (per output channel)"),
            ("quantize", ("--sym=yes",), "ignored explicit argument 'yes'"),
            ("quantize", ("--clip=no",), "ignored explicit argument 'no'"),
            ("quantize", ("--scale-method", "max"), "scale_method must be one of"),
            ("quantize", ("--no-static-groups=1",), "ignored explicit argument '1'"),
            ("quantize", ("--damp", "inf"), "damp must be a finite non-negative number"),
            ("quantize", ("--block-size", "0"), "block_size must be a positive integer"),
            ("quantize", ("--mse-grid", "0"), "mse_grid be positive"),
            ("quantize", ("--mse-maxshrink", "1.5"), "mse_maxshrink must lie in (0, 1)"),
            ("quantize", ("--mse-norm", "-1"), "mse_norm must be a finite positive number"),
            ("quantize", ("--refine", "polish"), "refine must be comma-separated steps"),
            ("quantize", ("--refine-sweeps", "3"), "--refine-sweeps 3 needs --refine cd and/or"),
            ("quantize", ("--refine-rounds", "2"), "--refine-rounds 2 needs --refine cd and/or"),
            ("quantize", ("--refine", "cd", "--refine-rounds", "0"), "refine_rounds must be a"),
            (
                "quantize",
                ("--override", "q_proj:refine_sweeps=2"),
                "refine_sweeps needs refine (cd and/or scales)",
            ),
            ("quantize", ("--method", "hptq", "--target-bits", "30"), "target_bits must be"),
            ("quantize", ("--method", "hptq", "--tol", "-1"), "tol"),
            ("quantize", ("--method", "hptq", "--max-iter", "0"), "max_iter"),
            ("quantize", ("--method", "hptq", "--rounding", "floor"), "rounding"),
            ("quantize", ("--method", "hptq", "--max-code-length", "0"), "max_code_length"),
            ("quantize", ("--method", "ssqr", "--outlier-rate", "2"), "outlier_rate"),
            ("quantize", ("--method", "kbest", "--beam", "0"), "beam"),
            ("quantize", ("--method", "kbest", "--klein-paths", "-1"), "klein_paths"),
            ("eval", ("--verbose=yes",), "ignored explicit argument 'yes'"),
            ("eval", ("--revision", "main"), "--revision main applies to hub ids"),
            ("eval", ("--device", "cpu:1"), "the CPU takes no index; use --device cpu"),
            ("eval", ("--dtype", "int8"), "invalid choice: 'int8'"),
            ("eval", ("--text", "ROOT/none.txt"), "--text 'ROOT/none.txt' is neither"),
            ("eval", ("--seqlen", "many"), "--seqlen expects an integer, got 'many'"),
            ("eval", ("--offload=yes",), "ignored explicit argument 'yes'"),
            ("eval", ("--offload-dir", "ROOT/off"), "--offload-dir ROOT/off needs --offload"),
            (
                "eval",
                ("--offload", "--offload-dir", "ROOT/a-file"),
                "--offload-dir ROOT/a-file is a file, not a folder",
            ),
            ("eval", ("--dense-cache=yes",), "ignored explicit argument 'yes'"),
            ("eval", ("--bos", "sometimes"), "invalid choice: 'sometimes'"),
            ("eval", ("--json=yes",), "ignored explicit argument 'yes'"),
            ("generate", ("--verbose=yes",), "ignored explicit argument 'yes'"),
            ("generate", ("--revision", "main"), "--revision main applies to hub ids"),
            ("generate", ("--device", "cpu:1"), "the CPU takes no index; use --device cpu"),
            ("generate", ("--dtype", "int8"), "invalid choice: 'int8'"),
            ("generate", ("--prompt",), "expected one argument"),
            ("generate", ("--max-new-tokens", "0"), "--max-new-tokens must be at least 1, got 0"),
            ("generate", ("--temperature", "nan"), "--temperature must be a finite number >= 0"),
            ("generate", ("--top-p", "nan"), "--top-p must be a number in (0, 1], got nan"),
            ("generate", ("--top-p", "0"), "--top-p must be a number in (0, 1], got 0"),
            ("generate", ("--top-p", "2"), "--top-p must be a number in (0, 1], got 2"),
            ("generate", ("--top-p", "0.5"), "--top-p 0.5 only applies to sampling; add --temp"),
            ("generate", ("--seed", "-1"), "--seed must be at least 0, got -1"),
            ("generate", ("--no-chat-template=yes",), "ignored explicit argument 'yes'"),
            ("generate", ("--dense-cache=yes",), "ignored explicit argument 'yes'"),
            ("generate", ("--json=yes",), "ignored explicit argument 'yes'"),
            ("report", ("--verbose=yes",), "ignored explicit argument 'yes'"),
            ("report", ("--json=yes",), "ignored explicit argument 'yes'"),
        ]
    ],
    ("no command", raw(), "required"),
    ("unknown command", raw("squash"), "invalid choice"),
]


@pytest.mark.parametrize("make_argv,expected", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_bad_input_is_one_line_and_leaves_nothing(files, tmp_path, capsys, make_argv, expected):
    out = tmp_path / "out"
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    rc = cli.main(make_argv(files, out))
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert rc != 0
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("latticequant: error: ")
    assert expected.replace("ROOT", str(files)) in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nothing written
    assert (files / "exists" / "keep.txt").read_text() == "kept"


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CORPUS) >= 25
    commands = {make_argv(Path("R"), Path("O"))[:1][0] for _, make_argv, _ in CORPUS[:-2]}
    assert commands == {"quantize", "eval", "generate", "report"}


def test_the_corpus_tries_every_flag_of_every_command():
    """Each option of each command (the quantize flags of every method included) is what goes
    wrong in a case of the corpus, under any of its spellings (the valid flags every ``q``
    case starts with do not count)."""
    base = _quantize(Path("R"), Path("O"))
    tried: dict[str, set[str]] = {}
    for _, make_argv, _ in CORPUS:
        argv = make_argv(Path("R"), Path("O"))
        if argv[: len(base)] == base:
            argv = argv[:1] + argv[len(base) :]
        if argv:
            tried.setdefault(argv[0], set()).update(a.split("=")[0] for a in argv[1:])
    for command in ("quantize", "eval", "generate", "report"):
        for method in list_methods() if command == "quantize" else ["gptq"]:
            parser = cli.build_parser(method)
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            for action in sub.choices[command]._actions:
                if action.option_strings and "-h" not in action.option_strings:
                    spellings = set(action.option_strings)
                    assert spellings & tried[command], f"{command} {action.option_strings[0]}"


def test_config_errors_are_refused_before_the_model_loads(files, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "load_model", no_load)
    for extra in (("--bits", "5"), ("--no-clip",), ("--override", "down_proj:bits=6")):
        assert cli.main(_quantize(files, tmp_path / "o", *extra)) == 1
        assert (
            r"cannot be stored\|cannot store" and "latticequant: error:" in capsys.readouterr().err
        )


def test_a_library_runtime_error_is_one_line(files, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)\n  more")

    monkeypatch.setattr(cli, "quantize_model", broken)
    assert cli.main(_quantize(files, tmp_path / "o", "--no-eval")) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("latticequant: error: RuntimeError: mat1 and mat2 shapes")
    assert "-v" in lines[0]


def test_summary_counts_quantized_and_skipped_layers(files, tmp_path, capsys):
    out = tmp_path / "o"
    args = _quantize(files, out, "--no-eval", "--skip", "down_proj", "--json")
    assert cli.main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["n_layers"] == 12 and payload["n_skipped"] == 2
    assert set(payload["skipped"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert all("down_proj" in why for why in payload["skipped"].values())
    log = json.loads((out / "quant_log.json").read_text())
    assert log["skipped"] == payload["skipped"]
    shutil.rmtree(out)
    assert cli.main(_quantize(files, out, "--no-eval", "--skip", "down_proj")) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("quantized 12 layers with gptq, 2 left in float (skipped by pattern")


def _one_line(capsys, bars: bool = False) -> str:
    """The one line of the error; with ``bars``, progress bars may come before it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if bars:
        lines = [ln for ln in lines if not re.search(r"\|.*/s\]$", ln)]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("latticequant: error: ")
    return lines[0].removeprefix("latticequant: error: ")


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


def _unwritable(monkeypatch, folder: Path) -> None:
    """``folder`` reads as not writable (a read-only mount; root ignores chmod)."""
    access = cli.os.access
    monkeypatch.setattr(
        cli.os,
        "access",
        lambda path, mode, **kw: (
            (os.path.abspath(path) != str(folder)) and access(path, mode, **kw)
        ),
    )


EARLY = [  # (argv, the one line): refused with the model never loaded
    (q("--device", "cpu:1"), "--device cpu:1: the CPU takes no index; use --device cpu"),
    (
        q("--device", "cuda:2"),
        "--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)",
    ),
    (q("--refine-sweeps", "3"), "--refine-sweeps 3 needs --refine cd and/or scales"),
    (q("--refine-rounds", "2"), "--refine-rounds 2 needs --refine cd and/or scales"),
    (q("--offload-dir", "ROOT/off"), "--offload-dir ROOT/off needs --offload"),
    (q("--offload", "--offload-dir", "ROOT/a-file"), "--offload-dir ROOT/a-file is a file"),
    (q("--text", "ROOT/none.txt"), "--text 'ROOT/none.txt' is neither a file"),
    (q("--eval-text", "ROOT/none.txt"), "--eval-text 'ROOT/none.txt' is neither a file"),
    (raw("quantize", "--out", "ROOT/a-file/x/y"), "--out ROOT/a-file/x/y: ROOT/a-file is a file"),
    (raw("quantize", "--out", "ROOT/readonly/x/y"), "cannot write in ROOT/readonly (permission"),
    (raw("eval", "ROOT/model", "--device", "cpu:1"), "--device cpu:1: the CPU takes no index"),
    (raw("eval", "--offload-dir", "ROOT/off"), "--offload-dir ROOT/off needs --offload"),
    (raw("eval", "--offload", "--offload-dir", "ROOT/a-file"), "ROOT/a-file is a file, not a"),
    (raw("generate", "--prompt", "x", "--device", "cpu:1"), "the CPU takes no index"),
    (raw("generate", "--prompt", "x", "--device", "cuda:2"), "this machine has 2 CUDA devices"),
    (raw("generate", "--prompt", "x", "--top-p", "0.5"), "--top-p 0.5 only applies to sampling"),
]


@pytest.mark.parametrize(
    "make_argv,expected", EARLY, ids=[f"{c[0](Path(), Path())[0]}: {c[1][:40]}" for c in EARLY]
)
def test_silently_ignored_or_unwritable_is_refused_before_the_model_loads(
    files, tmp_path, monkeypatch, capsys, make_argv, expected
):
    monkeypatch.setattr(cli, "load_model", _no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _unwritable(monkeypatch, files / "exists")
    argv = make_argv(files, tmp_path / "o")
    argv = [a.replace(f"{files}/readonly", str(files / "exists")) for a in argv]
    expected = expected.replace("ROOT/readonly", "ROOT/exists")
    assert cli.main(argv) != 0
    assert expected.replace("ROOT", str(files)) in _one_line(capsys)
    assert not (tmp_path / "o").exists() and not (files / "exists" / "x").exists()


def test_out_in_missing_folders_makes_them(files, tmp_path, capsys):
    """``--out runs/x`` where ``runs/`` does not exist yet: made like ``mkdir -p``."""
    out = tmp_path / "runs" / "deeper" / "x"
    assert cli.main(_quantize(files, out, "--no-eval")) == 0
    assert (out / "quant_log.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]  # no lock, no .partial left


def test_a_second_run_on_one_out_is_refused_before_it_touches_anything(
    files, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial" / "state"
    partial.mkdir(parents=True)
    (partial / "run.json").write_text('{"fingerprint": "another run"}')
    lock = tmp_path / "out.lock"  # held by this process, which is alive
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    monkeypatch.setattr(cli, "load_model", _no_load)
    assert cli.main(_quantize(files, out, "--no-resume", "--overwrite")) == 1
    line = _one_line(capsys)
    assert line.startswith(f"another run (pid {os.getpid()}) is writing {out}; wait for it")
    assert (partial / "run.json").read_text() == '{"fingerprint": "another run"}'
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_the_lock_of_a_run_that_exited_is_taken_over(files, tmp_path, capsys):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "out"
    lock = tmp_path / "out.lock"
    lock.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname()}))
    assert cli.main(_quantize(files, out, "--no-eval")) == 0
    assert (out / "quant_log.json").is_file() and not lock.exists()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        pytest.param("safetensors", id="SafetensorError"),
    ],
)
def test_a_full_disk_is_one_sentence_and_the_run_resumable(
    files, tmp_path, monkeypatch, capsys, error
):
    import safetensors.torch
    from safetensors import SafetensorError

    if error == "safetensors":  # what safetensors 0.x raises on a full disk
        error = SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    def full(*args, **kwargs):
        raise error

    out = tmp_path / "out"
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert cli.main(_quantize(files, out, "--no-eval")) == 1
    assert _one_line(capsys, bars=True) == (
        f"no space left on device while writing {out} (the unfinished run in {out}.partial is "
        "resumable: free space and rerun the same command)"
    )
    assert not out.exists() and not (tmp_path / "out.lock").exists()
    monkeypatch.undo()  # space freed: the same command finishes the run
    assert cli.main(_quantize(files, out, "--no-eval")) == 0
    assert (out / "quant_log.json").is_file()


def test_a_bad_row_block_setting_is_one_line_before_any_forward(
    files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("LATTICEQUANT_ROW_BLOCK_ROWS", "zero")

    def no_quantize(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "quantize_model", no_quantize)
    out = tmp_path / "o"
    assert cli.main(_quantize(files, out, "--no-eval")) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "LATTICEQUANT_ROW_BLOCK_ROWS='zero'" in lines[0], lines
    assert not out.exists()
