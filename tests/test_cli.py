"""The ``latticequant`` command on a tiny Llama saved to a folder."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

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
        "--eval-text",
        str(text),
        "--eval-seqlen",
        "64",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    from tiny import make_char_tokenizer, make_tiny_llama

    from latticequant.pipeline.data import protocol_text

    root = tmp_path_factory.mktemp("cli")
    make_tiny_llama().save_pretrained(root / "model")
    make_char_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(protocol_text()[:6000])
    return root


@pytest.fixture(scope="module")
def quantized_once(cli_files):
    out = cli_files / "q"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(_quantize_args(cli_files / "model", cli_files / "text.txt", out, "--json"))
    assert rc == 0
    return out, json.loads(buf.getvalue())


@pytest.fixture
def quantized(quantized_once, tmp_path):
    out, payload = quantized_once
    copy = tmp_path / "q"
    shutil.copytree(out, copy)
    return copy, payload


@pytest.fixture
def tiny_llama_dir(cli_files):
    return cli_files / "model"


@pytest.fixture
def sample_text_file(cli_files):
    return cli_files / "text.txt"


def test_quantize_prints_perplexity_and_writes_checkpoint(quantized):
    out, payload = quantized
    assert payload["method"] == "gptq" and payload["n_layers"] == 14
    assert payload["config"]["bits"] == 4 and payload["config"]["group_size"] == 32
    assert payload["config"]["order"] == "act"
    assert 1 < payload["ppl_before"] < 1e4 and 1 < payload["ppl_after"] < 1e4
    assert payload["ppl_before"] != payload["ppl_after"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_eval_of_checkpoint_matches_ppl_after(quantized, sample_text_file, capsys):
    out, payload = quantized
    args = ["eval", str(out), "--text", str(sample_text_file), "--seqlen", "64", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(payload["ppl_after"], rel=1e-4)


def test_eval_float_folder_matches_ppl_before(quantized, tiny_llama_dir, sample_text_file, capsys):
    _, payload = quantized
    args = ["eval", str(tiny_llama_dir), "--text", str(sample_text_file), "--seqlen", "64"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("perplexity: ")
    assert float(line.split()[1]) == pytest.approx(payload["ppl_before"], rel=1e-4)


def test_eval_on_a_text_file(quantized, sample_text_file, capsys):
    out, _ = quantized
    args = ["eval", str(out), "--text", str(sample_text_file), "--seqlen", "32", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == len(sample_text_file.read_text())  # one token per character
    assert result["seqlen"] == 32


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
    assert json.loads(capsys.readouterr().out)["n_layers"] == 12
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is True
    model = load_quantized(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def _error(capsys, argv, rc=1):
    assert main(argv) == rc
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # progress bars may come before the one-line error
    assert last.startswith("latticequant: error: ")
    return last


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


def test_kbest_with_refinement_from_the_command_line(
    tiny_llama_dir, sample_text_file, tmp_path, capsys
):
    out = tmp_path / "k"
    args = _quantize_args(tiny_llama_dir, sample_text_file, out, "--no-eval", "--json")
    args[args.index("gptq")] = "kbest"
    args += ["--beam", "2", "--klein-paths", "2", "--seed", "1", "--refine", "cd,scales"]
    args += ["--refine-sweeps", "2", "--refine-rounds", "2"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["method"] == "kbest" and payload["n_layers"] == 14
    assert payload["config"]["beam"] == 2 and payload["config"]["seed"] == 1
    assert payload["config"]["refine"] == "cd,scales"
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4  # a plain GPTQ checkpoint
    model = load_quantized(out)
    assert not isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert main(["report", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert all(r["rel_gptq"] < 1.0 for r in rows)  # refined below GPTQ on every layer
    assert all(r["refine_cd_pct"] >= 0 and r["refine_scales_pct"] >= 0 for r in rows)


def test_objective_and_rotation_from_the_command_line(
    tiny_llama_dir, sample_text_file, tmp_path, capsys
):
    out = tmp_path / "r"
    args = _quantize_args(tiny_llama_dir, sample_text_file, out, "--json", "--bits", "3")
    args += ["--objective", "float-outputs", "--rotate", "hadamard", "--seed", "2"]
    assert main([*args, "--objective", "layer", "--float-reference", "model"]) == 1
    err = capsys.readouterr().err.strip()
    assert "needs the float-outputs objective" in err and "\n" not in err
    assert not out.exists()  # refused before anything was written
    assert main([*args, "--float-reference", "model"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["target"] == {
        "objective": "float-outputs", "rotate": "hadamard", "float_reference": "model"
    }  # fmt: skip
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["quant_method"] == "latticequant" and qc["format"] == "latticequant-hadamard"
    evaluated = ["eval", str(out), "--text", str(sample_text_file), "--seqlen", "64", "--json"]
    assert main(evaluated) == 0
    ppl = json.loads(capsys.readouterr().out)["perplexity"]
    assert ppl == pytest.approx(payload["ppl_after"], rel=1e-4)
    log = json.loads((out / "quant_log.json").read_text())
    assert log["run"]["target"]["seed"] == 2 and log["run"]["target"]["reference"] == "model"
    assert all(s["rotation"] == "hadamard" and "target_shift" in s for s in log["layers"])
    assert all(s["float_reference"] == "model" for s in log["layers"])


def test_generate_from_a_checkpoint(quantized, capsys):
    out, _ = quantized
    argv = ["generate", str(out), "--prompt", "def f", "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["new_tokens"] == len(payload["token_ids"]) <= 8
    assert payload["prompt_tokens"] == 5 and payload["weight_bytes"] > 0
    assert main(["generate", str(out), "--prompt", "def f", "--max-new-tokens", "4"]) == 0
    assert "tokens/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, rc, words",
    [
        (["--temperature", "-1"], 2, "--temperature must be a finite number >= 0"),
        (["--top-p", "2"], 2, "--top-p must be a number in (0, 1], got 2"),
        (["--top-p", "0.5"], 1, "--top-p 0.5 only applies to sampling; add --temperature"),
        (["--device", "cpu:1"], 1, "the CPU takes no index"),
        (["--max-new-tokens", "0"], 2, "--max-new-tokens must be at least 1"),
        (["--device", "tpu"], 1, "--device 'tpu' is not a device"),
    ],
)
def test_generate_bad_input(quantized, capsys, extra, rc, words):
    out, _ = quantized
    assert main(["generate", str(out), "--prompt", "x", *extra]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_bos_per_window_is_recorded_and_used_again_by_eval(cli_files, tmp_path, capsys):
    """A tokenizer that adds a BOS gets one per window (auto); eval of the checkpoint uses it
    again without being told, so its perplexity is the quantize run's 'after'."""
    from tiny import make_char_tokenizer

    model_dir = tmp_path / "bos_model"
    shutil.copytree(cli_files / "model", model_dir)
    make_char_tokenizer(add_bos=True).save_pretrained(model_dir)
    out = tmp_path / "q"
    text = cli_files / "text.txt"
    assert main(_quantize_args(model_dir, text, out, "--json")) == 0
    after = json.loads(capsys.readouterr().out)["ppl_after"]
    run = json.loads((out / "quant_log.json").read_text())["run"]
    assert run["bos"] == "always" and run["bos_token_id"] == 1
    args = ["eval", str(out), "--text", str(text), "--seqlen", "64", "--json"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["bos"] == 1 and payload["perplexity"] == pytest.approx(after, rel=1e-9)
    assert main([*args, "--bos", "never"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] != pytest.approx(after, rel=1e-6)
    assert main([*args, "--bos", "sometimes"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_run_too_big_for_the_machine_is_refused_before_any_forward(
    tiny_llama_dir, sample_text_file, tmp_path, capsys
):
    out = tmp_path / "big"
    argv = ["quantize", str(tiny_llama_dir), "--nsamples", "200000", "--seqlen", "256"]
    argv += ["--text", str(sample_text_file), "--no-eval", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB is free; lower --nsamples" in err[0]
    assert not out.exists() and not (tmp_path / "big.partial").exists()


def test_a_mixture_of_experts_folder_from_the_command_line(cli_files, tmp_path, capsys):
    from tiny import make_char_tokenizer, make_tiny_moe

    folder = tmp_path / "moe"
    make_tiny_moe("qwen3_moe").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    out = tmp_path / "q"
    args = _quantize_args(folder, cli_files / "text.txt", out, "--group-size", "16", "--json")
    args += ["--min-expert-tokens", "24", "--expert-fallback", "rtn"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    # block 0: 4 attention + 6 experts x 3; block 1: 4 attention + a dense MLP of 3
    assert payload["n_layers"] == 4 + 18 + 4 + 3 and payload["n_skipped"] == 0
    assert payload["ppl_after"] < 1.5 * payload["ppl_before"]
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fallback" in text.splitlines()[0]
    fell = [ln for ln in text.splitlines() if ln.startswith("18 expert layers")]
    assert fell and ("on rtn" in fell[0] or fell[0].endswith("none"))
    log = json.loads((out / "quant_log.json").read_text())
    experts = [e for e in log["layers"] if ".experts." in e["name"]]
    assert all(e["expert_fallback"] in (None, "rtn") for e in experts)
    assert any(e["expert_fallback"] == "rtn" for e in experts) == any(
        e["expert_tokens"] < 24 for e in experts
    )
    assert main(["eval", str(out), "--text", str(cli_files / "text.txt"), "--seqlen", "64"]) == 0
    assert f"{payload['ppl_after']:.4f}" in capsys.readouterr().out
    # blocks read from disk: experts split on meta, each read as its own tensor from the files
    offload = [str(tmp_path / "o") if a == str(out) else a for a in args] + ["--offload"]
    assert main(offload) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(out), tensors(tmp_path / "o")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_float_outputs_on_a_mixture_of_experts_folder(cli_files, tmp_path, capsys):
    """--objective float-outputs on a Qwen3-MoE folder: the report still lists each expert
    layer's routed tokens, and blocks read from disk give the in-memory checkpoint."""
    from safetensors.torch import load_file
    from tiny import make_char_tokenizer, make_tiny_moe

    folder = tmp_path / "moe"
    make_tiny_moe("qwen3_moe").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    out = tmp_path / "q"
    args = _quantize_args(folder, cli_files / "text.txt", out, "--group-size", "16", "--json")
    args += ["--objective", "float-outputs", "--min-expert-tokens", "24", "--no-eval"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["target"]["objective"] == "float-outputs"
    assert payload["n_layers"] == 4 + 18 + 4 + 3 and payload["n_skipped"] == 0
    log = json.loads((out / "quant_log.json").read_text())
    experts = [e for e in log["layers"] if ".experts." in e["name"]]
    assert len(experts) == 18 and all(e["objective"] == "float-outputs" for e in experts)
    assert main(["report", str(out)]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln}
    for e in experts:  # the tokens column, and the fallback the count called for
        assert rows[e["name"]][-2:] == [str(e["expert_tokens"]), e["expert_fallback"] or "-"]
    assert any(e["expert_fallback"] == "all-tokens" for e in experts)
    offload = [str(tmp_path / "o") if a == str(out) else a for a in args] + ["--offload"]
    assert main(offload) == 0
    capsys.readouterr()

    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = tensors(out), tensors(tmp_path / "o")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _json_run(argv) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


def test_presets_fill_only_what_no_flag_gave_and_the_summary_names_them(cli_files, tmp_path):
    base = [
        a
        for a in _quantize_args(cli_files / "model", cli_files / "text.txt", tmp_path / "b")
        if a not in ("--order", "act")
    ]
    best = _json_run([*base, "--preset", "best", "--no-eval", "--json"])
    assert best["preset_settings"] == {
        "order": "act",
        "refine": "cd,scales",
        "objective": "float-outputs",
        "rotate": "hadamard",
    }
    assert best["config"]["refine"] == "cd,scales" and best["config"]["order"] == "act"
    assert best["target"] == {
        "objective": "float-outputs", "rotate": "hadamard", "float_reference": "previous-block"
    }  # fmt: skip
    assert best["checkpoint_format"] == "gptq+hadamard"
    qlog = json.loads((tmp_path / "b" / "quant_log.json").read_text())
    assert all(layer["rotation"] == "hadamard" for layer in qlog["layers"])
    # a flag beside the preset wins, and the preset says it set nothing there
    out = [a if a != str(tmp_path / "b") else str(tmp_path / "c") for a in base]
    mine = _json_run([*out, "--preset", "best", "--rotate", "none", "--no-eval", "--json"])
    assert mine["target"]["rotate"] == "none" and "rotate" not in mine["preset_settings"]
    assert mine["checkpoint_format"] == "gptq"
    fast = [a if a != str(tmp_path / "b") else str(tmp_path / "d") for a in base]
    fast_run = _json_run([*fast, "--preset", "fast", "--no-eval", "--json"])
    assert fast_run["config"]["refine"] == "" and fast_run["target"]["rotate"] == "none"


def test_a_run_without_flags_uses_the_methods_defaults_not_the_cores(cli_files, tmp_path):
    """A grid method's run decodes in act-order by default (static groups: the natural g_idx
    every GPTQ reader loads); the core's QuantConfig keeps its literal natural order."""
    import latticequant as lq
    from latticequant.methods import get_method

    args = [a for a in _quantize_args(cli_files / "model", cli_files / "text.txt", tmp_path / "q")]
    i = args.index("--order")
    del args[i : i + 2]
    payload = _json_run([*args, "--no-eval", "--json"])
    assert payload["config"]["order"] == "act" and payload["config"]["static_groups"] is True
    assert lq.QuantConfig().order == "natural"
    assert get_method("gptq").default_config().order == "act"
    assert lq.RunSpec().resolved()[1].order == "act"
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False  # static groups keep g_idx natural
