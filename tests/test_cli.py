"""The ``latticequant`` command on a tiny Llama saved to a folder."""

from __future__ import annotations

import json

import pytest
import torch

from latticequant.checkpoint import load_quantized
from latticequant.cli import main


def _quantize_args(model_dir, text, out, *extra):
    return [
        "quantize",
        str(model_dir),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--order",
        "act",
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--seed",
        "0",
        "--text",
        str(text),
        "--eval-seqlen",
        "64",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def quantized(tiny_llama_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(_quantize_args(tiny_llama_dir, sample_text_file, out, "--json"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return out, json.loads(captured.out)


def test_quantize_prints_perplexity_and_writes_checkpoint(quantized):
    out, payload = quantized
    assert payload["method"] == "gptq" and payload["n_layers"] == 14
    assert payload["config"]["bits"] == 4 and payload["config"]["group_size"] == 32
    assert payload["config"]["order"] == "act"
    assert 1 < payload["ppl_before"] < 1e4 and 1 < payload["ppl_after"] < 1e4
    assert payload["ppl_before"] != payload["ppl_after"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_eval_of_checkpoint_matches_ppl_after(quantized, capsys):
    out, payload = quantized
    assert main(["eval", str(out), "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(payload["ppl_after"], rel=1e-4)


def test_eval_float_folder_matches_ppl_before(quantized, tiny_llama_dir, capsys):
    _, payload = quantized
    assert main(["eval", str(tiny_llama_dir), "--seqlen", "64"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity: ")
    assert float(line.split()[1]) == pytest.approx(payload["ppl_before"], rel=1e-4)


def test_eval_on_a_text_file(quantized, sample_text_file, capsys):
    out, _ = quantized
    assert main(["eval", str(out), "--text", str(sample_text_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len(sample_text_file.read_text())  # one token per character


def test_report_table_and_plot(quantized, tmp_path, capsys):
    out, _ = quantized
    png = tmp_path / "plot.png"
    assert main(["report", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.count("model.layers.") == 14 and "/rtn" in text and "bound" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 14 and data["summary"]["n_layers"] == 14


def test_overrides_and_v2_from_the_command_line(tiny_llama_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "o"
    args = _quantize_args(
        tiny_llama_dir,
        sample_text_file,
        out,
        "--no-eval",
        "--sym",
        "--skip",
        "down_proj",
        "--override",
        "o_proj:bits=8",
        "--checkpoint-format",
        "gptq_v2",
        "--json",
    )
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["n_layers"] == 10
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is True
    model = load_quantized(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def _error(capsys, argv, rc=1):
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_bad_input_messages(tiny_llama_dir, sample_text_file, tmp_path, capsys):
    err = _error(capsys, ["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert "does not exist" in err
    (tmp_path / "exists").mkdir()
    err = _error(capsys, _quantize_args(tiny_llama_dir, sample_text_file, tmp_path / "exists"))
    assert "already exists" in err and "--overwrite" in err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    err = _error(capsys, _quantize_args(tiny_llama_dir, short, tmp_path / "y"))
    assert "too short" in err
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _error(capsys, _quantize_args(tiny_llama_dir, empty, tmp_path / "z"))
    err = _error(capsys, ["quantize", "--method", "nope", "--out", str(tmp_path / "w")], rc=2)
    assert "unknown quantization method 'nope'" in err
    err = _error(
        capsys,
        _quantize_args(tiny_llama_dir, sample_text_file, tmp_path / "v", "--override", "bits=3"),
    )
    assert "PATTERN" in err
    err = _error(
        capsys, _quantize_args(tiny_llama_dir, sample_text_file, tmp_path / "u", "--bits", "9")
    )
    assert "bits must be an integer from 2 to 8" in err
    assert "no config.json" in _error(capsys, ["eval", str(tmp_path / "exists")])
    assert "quant_log.json" in _error(capsys, ["report", str(tmp_path / "exists")])


def test_truncated_checkpoint_from_the_command_line(quantized, capsys):
    out, _ = quantized
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "truncated or corrupt" in _error(capsys, ["eval", str(out)])


def test_help_lists_method_config_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--bits",
        "--group-size",
        "--order",
        "--sym",
        "--damp",
        "--static-groups",
        "--no-static-groups",
        "--checkpoint-format",
        "--overwrite",
        "--skip",
        "--override",
    ):
        assert flag in text
