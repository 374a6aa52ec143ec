"""Checkpoints in the compressed-tensors format (``--checkpoint-format compressed-tensors``):
written by the pipeline, read by our loader and by plain transformers to the same logits,
refused up front where the format cannot store the run, and read back without our section (as
llm-compressor writes them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import run_quantize
from safetensors.torch import load_file
from tiny import GROUP, make_char_tokenizer, make_tiny_dense, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized
from latticequant.formats import get_format
from latticequant.formats.compressed_tensors import check_quantization_config
from latticequant.formats.rotation import RotatedLinear
from latticequant.methods import UnsupportedConfigError, get_method
from latticequant.methods.grid import KBestConfig
from latticequant.pipeline.layout import UnsupportedModelError
from latticequant.pipeline.overrides import parse_override
from latticequant.pipeline.spec import OutputSpec, RunSpec, prepare
from latticequant.pipeline.target import TargetConfig

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

CT = "compressed-tensors"
CT_ROTATED = "compressed-tensors+hadamard"
RTOL = 1e-5


def _quantize(out, calib_ids, config, method="gptq", **kw):
    model = make_tiny_llama()
    run_quantize(
        model, make_char_tokenizer(), calib_ids, method, config, out, checkpoint_format=CT, **kw
    )
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _qconfig(out) -> dict:
    return json.loads((Path(out) / "config.json").read_text())["quantization_config"]


def _transformers(out, dequantize: bool):
    """transformers' default route, or each module decompressed as it is read (the route that
    loads asymmetric checkpoints with compressed-tensors 0.20.1, docs/compressed_tensors.md)."""
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw)


# (bits, sym, group_size, order); act-order keeps static groups (``actorder: weight``)
VARIANTS = [
    (4, True, GROUP, "natural"),
    (4, False, GROUP, "natural"),
    (8, True, -1, "natural"),
    (8, False, -1, "natural"),
    (4, True, GROUP, "act"),
    (8, False, GROUP, "act"),
    (2, False, GROUP, "natural"),
    (3, True, -1, "natural"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "b{}-{}-g{}-{}".format(*v))
def test_transformers_and_our_loader_give_the_same_logits(tmp_path, calib_ids, variant):
    bits, sym, group_size, order = variant
    out = tmp_path / "ct"
    cfg = lq.QuantConfig(bits=bits, group_size=group_size, sym=sym, order=order)
    model = _quantize(out, calib_ids, cfg)
    ids = calib_ids[:2]
    ours = _logits(load_quantized(out), ids)
    assert _rel(ours, _logits(model, ids)) < RTOL  # the Q the run fed forward
    assert _rel(_logits(_transformers(out, dequantize=True), ids), ours) < RTOL
    if sym:  # plain from_pretrained, no quantization_config argument
        assert _rel(_logits(_transformers(out, dequantize=False), ids), ours) < RTOL

    qc = _qconfig(out)
    assert qc["quant_method"] == CT and qc["format"] == "pack-quantized"
    assert "latticequant" in qc  # our module table: transformers loaded the folder with it
    from compressed_tensors.quantization import QuantizationConfig

    assert QuantizationConfig.model_validate(qc).quant_method == CT  # unknown keys ignored
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    weights = group["weights"]
    assert group["targets"] == ["Linear"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, sym)
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    assert weights.get("actorder") == (None if order == "natural" else "weight")
    state = load_file(str(out / "model.safetensors"))
    layers = check_quantization_config(qc, state)
    assert len(layers) == len(qc["latticequant"]["modules"]) == 14
    assert not (out / "quantize_config.json").exists()  # llm-compressor writes none either
    assert is_quantized_checkpoint(out)


def test_skipped_layers_are_ignored_and_overrides_get_their_own_group(tmp_path, calib_ids):
    out = tmp_path / "ct"
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, sym=True)
    overrides = [
        parse_override(r"\.mlp\.:bits=8", lq.QuantConfig),
        parse_override(r"layers\.1\.self_attn\.o_proj:skip", lq.QuantConfig),
    ]
    model = _quantize(out, calib_ids, cfg, overrides=overrides)
    qc = _qconfig(out)
    assert qc["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj"]
    assert "dynamic" not in qc  # GPTQModel's rules: compressed-tensors says it with groups
    bits = {g["weights"]["num_bits"]: sorted(g["targets"]) for g in qc["config_groups"].values()}
    assert set(bits) == {4, 8}
    assert all(".mlp." in t for t in bits[8]) and not any(".mlp." in t for t in bits[4])
    assert "model.layers.1.self_attn.o_proj" not in bits[4]
    check_quantization_config(qc, load_file(str(out / "model.safetensors")))
    ids = calib_ids[:2]
    ours = _logits(load_quantized(out), ids)
    assert _rel(ours, _logits(model, ids)) < RTOL
    assert _rel(_logits(_transformers(out, dequantize=False), ids), ours) < RTOL


@pytest.mark.parametrize("sym", [True, False])
def test_a_checkpoint_without_our_section_loads(tmp_path, calib_ids, sym):
    """What llm-compressor writes has no ``latticequant`` section: the module table comes from
    the ``weight_packed`` tensors and the config groups that claim them."""
    out = tmp_path / "ct"
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, sym=sym, order="act")
    overrides = [parse_override(r"mlp\.down_proj:bits=8", lq.QuantConfig)]
    _quantize(out, calib_ids, cfg, overrides=overrides)
    ids = calib_ids[:2]
    ours = _logits(load_quantized(out), ids)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["latticequant"]
    (out / "config.json").write_text(json.dumps(config))
    assert is_quantized_checkpoint(out)
    assert torch.equal(_logits(load_quantized(out), ids), ours)

    config["quantization_config"]["config_groups"].popitem()  # a layer no group claims
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no config group targets it"):
        load_quantized(out)


@pytest.mark.parametrize(
    "method, kw",
    [
        ("rtn", {}),
        ("babai", {}),
        ("kbest", {}),
        ("gptq", {"refine": "cd,scales"}),
        ("gptq", {"objective": "float-outputs"}),
    ],
    ids=["rtn", "babai", "kbest", "gptq-refine", "gptq-float-outputs"],
)
def test_every_grid_method_and_option_writes_the_format(tmp_path, calib_ids, method, kw):
    out = tmp_path / "ct"
    objective = kw.pop("objective", None)
    config_cls = KBestConfig if method == "kbest" else lq.QuantConfig
    cfg = config_cls(bits=4, group_size=GROUP, sym=False, **kw)
    target = TargetConfig(objective=objective) if objective else None
    model = _quantize(out, calib_ids, cfg, method=method, target=target)
    ids = calib_ids[:2]
    ours = _logits(load_quantized(out), ids)
    assert _rel(ours, _logits(model, ids)) < RTOL
    assert _rel(_logits(_transformers(out, dequantize=True), ids), ours) < RTOL


@pytest.mark.parametrize(
    "changes, target, match",
    [
        ({"bits": 5}, None, "writes 2, 3, 4, 8 bits"),
        ({"clip": False}, None, "drop --no-clip"),
        ({"order": "act", "static_groups": False}, None, r"use --static-groups \(the default\)"),
        ({"group_size": 48}, None, "does not divide d_in=64"),
    ],
    ids=["bits5", "no-clip", "act-order-refitted", "group-48"],
)
def test_what_the_format_cannot_store_is_refused_before_any_work(tmp_path, changes, target, match):
    cfg = lq.QuantConfig(**{"bits": 4, "group_size": GROUP, **changes})
    spec = RunSpec(
        "gptq",
        cfg,
        target=target or TargetConfig(),
        output=OutputSpec(str(tmp_path / "x"), CT),
    )
    from latticequant.pipeline.spec import prepare

    with pytest.raises(UnsupportedConfigError, match=match) as err:
        prepare(make_tiny_llama(), spec)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_the_format_is_registered_for_the_grid_methods():
    fmt = get_format(CT)
    assert fmt.quant_method == CT and not fmt.writes_quantize_config
    for name in ("rtn", "gptq", "babai", "kbest"):
        assert get_method(name).format(CT) is fmt


@pytest.mark.parametrize("rotate", ["none", "folded+online"])
def test_quantize_and_eval_from_the_command_line(
    tmp_path, tiny_llama_dir, sample_text_file, rotate
):
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(Path(lq.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    common = ["--nsamples", "4", "--seqlen", "32", "--text", str(sample_text_file)]
    quantize = [sys.executable, "-m", "latticequant", "quantize", str(tiny_llama_dir)]
    quantize += ["--checkpoint-format", CT, "--out", str(out), "--no-eval", "--group-size", "32"]
    quantize += ["--rotate", rotate]
    done = subprocess.run(quantize + common, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _qconfig(out)["quant_method"] == CT
    assert bool(_qconfig(out)["transform_config"]) == (rotate != "none")
    evaluate = [sys.executable, "-m", "latticequant", "eval", str(out), "--text"]
    evaluate += [str(sample_text_file), "--seqlen", "64"]
    done = subprocess.run(evaluate, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("perplexity: ")


def test_a_model_kept_on_disk_writes_the_same_checkpoint(tmp_path, calib_ids):
    """Blocks kept on disk (``--offload``) are written shard by shard; the file-level config
    and the logits are those of the in-memory run."""
    from latticequant.pipeline.offload import load_offloaded

    make_tiny_llama().save_pretrained(tmp_path / "m")
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, sym=True)
    _quantize(tmp_path / "mem", calib_ids, cfg)
    model = load_offloaded(tmp_path / "m")
    run_quantize(model, None, calib_ids, "gptq", cfg, tmp_path / "off", checkpoint_format=CT)
    assert (tmp_path / "off" / "model.safetensors.index.json").is_file()
    a, b = _qconfig(tmp_path / "mem"), _qconfig(tmp_path / "off")
    assert {k: v for k, v in a.items() if k != "latticequant"} == {
        k: v for k, v in b.items() if k != "latticequant"
    }
    ids = calib_ids[:2]
    ours = _logits(load_quantized(tmp_path / "off"), ids)
    assert torch.equal(ours, _logits(load_quantized(tmp_path / "mem"), ids))
    assert _rel(_logits(_transformers(tmp_path / "off", dequantize=False), ids), ours) < RTOL


def test_other_compressed_tensors_formats_are_left_to_transformers(tmp_path):
    """FP8 or W8A8 checkpoints (``float-quantized``, ``int-quantized``) are not ours to load."""
    folder = tmp_path / "fp8"
    folder.mkdir()
    config = make_tiny_llama().config.to_dict()
    config["quantization_config"] = {"quant_method": CT, "format": "float-quantized"}
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_quantized_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no quantization_config latticequant reads"):
        load_quantized(folder)


# --- online rotations: compressed-tensors' transform_config ----------------------------------

# (rotate, family, intermediate size): 128 is one Sylvester block; 192 = 3 blocks of 64
# (``head_dim: 64``), as the protocol model's 1536 = 3 blocks of 512
ONLINE = [
    ("folded+online", "llama", 128),
    ("folded+online", "llama", 192),
    ("folded+online", "qwen2", 192),
    ("folded+online", "qwen3", 128),
    ("hadamard", "llama", 192),
]


def _rotated_run(out, calib_ids, rotate, family="llama", intermediate=192, **kw):
    model = make_tiny_dense(family, intermediate_size=intermediate)
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, sym=True)
    target = TargetConfig(rotate=rotate, seed=1)
    run_quantize(
        model, make_char_tokenizer(), calib_ids, "gptq", cfg, out,
        checkpoint_format=CT, target=target, **kw,
    )  # fmt: skip
    return model


def _applied_by_compressed_tensors(out):
    """transformers' model with the file's transform_config applied by compressed-tensors'
    ``apply_transform_config``, as a reader that applies it before the weights load: the
    stored weights (``W R``) are put back over the weight side it fuses."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model = _transformers(out, dequantize=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_transform_config(model, TransformConfig.model_validate(_qconfig(out)["transform_config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_input.weight") for k in missing)
    return model


@pytest.mark.parametrize("case", ONLINE, ids=lambda c: "-".join(map(str, c)))
def test_online_rotations_run_in_compressed_tensors_and_in_our_loader(tmp_path, calib_ids, case):
    rotate, family, intermediate = case
    out = tmp_path / "ct"
    model = _rotated_run(out, calib_ids, rotate, family, intermediate)
    ids = calib_ids[:2]
    ours = load_quantized(out)
    assert _rel(_logits(ours, ids), _logits(model, ids)) < RTOL  # the Q the run fed forward
    qc = _qconfig(out)
    formats = {n: e["format"] for n, e in qc["latticequant"]["modules"].items()}
    rotated = {n for n, f in formats.items() if f == CT_ROTATED}
    if rotate == "folded+online":
        assert rotated == {n for n in formats if n.endswith("mlp.down_proj")}
    else:
        assert rotated == set(formats)
    schemes = qc["transform_config"]["config_groups"]
    assert {t for s in schemes.values() for t in s["apply"][0]["targets"]} == rotated
    assert all(s["type"] == "hadamard" and not s["randomize"] for s in schemes.values())

    theirs = _applied_by_compressed_tensors(out)
    assert _rel(_logits(theirs, ids), _logits(ours, ids)) < RTOL
    # the matrix our module runs is the one compressed-tensors built for that layer
    name = sorted(rotated)[-1]
    module = ours.get_submodule(name)
    assert isinstance(module, RotatedLinear)
    (transform,) = [m for n, m in theirs.get_submodule(name).named_children() if "_input" in n]
    eye = torch.eye(module.in_features)
    assert torch.allclose(module.rotate(eye), transform(eye), atol=1e-6, rtol=0)
    # transformers 5.25 does not apply transform_config: plain from_pretrained runs W R on
    # unrotated inputs (docs/compressed_tensors.md)
    assert _rel(_logits(_transformers(out, dequantize=False), ids), _logits(ours, ids)) > 1e-2


def _edit(out, change) -> None:
    config = json.loads((out / "config.json").read_text())
    change(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


def _schemes(qc) -> list:
    return list(qc["transform_config"]["config_groups"].values())


def _drop_target(qc):
    for args in _schemes(qc)[0]["apply"]:
        args["targets"].remove("model.layers.1.mlp.down_proj")


def _rotate_a_plain_layer(qc):
    for args in _schemes(qc)[0]["apply"]:
        args["targets"].append("model.layers.0.mlp.up_proj")


def _rotate_a_float_layer(qc):
    for args in _schemes(qc)[0]["apply"]:
        args["targets"].append("model.layers.1.self_attn.o_proj")


CONTRADICTIONS = {
    "unrotated-input": (_drop_target, "layers.1.mlp.down_proj: it is stored rotated but"),
    "rotated-plain": (_rotate_a_plain_layer, "up_proj: it is stored without a rotation"),
    "rotated-float": (_rotate_a_float_layer, "o_proj: it is stored in float but transform_config"),
    "other-block": (
        lambda qc: _schemes(qc)[0].update(head_dim=32),
        "blocks of 32 to it, but it was quantized in blocks of 64",
    ),
    "random-hadamard": (
        lambda qc: _schemes(qc)[0].update(type="random-hadamard"),
        "type 'random-hadamard'; latticequant runs only 'hadamard'",
    ),
    "output": (
        lambda qc: _schemes(qc)[0]["apply"][0].update(location="output"),
        "applies a 'output' transform",
    ),
}


def test_a_transform_config_that_contradicts_the_tensors_is_refused(tmp_path, calib_ids):
    """What the file-level transform_config says must be what the layers hold and something
    we run; without our section (llm-compressor's layout) the rotated layers are read from it."""
    out = tmp_path / "ct"
    skip = [parse_override(r"layers\.1\.self_attn\.o_proj:skip", lq.QuantConfig)]
    _rotated_run(out, calib_ids, "folded+online", overrides=skip)
    ids = calib_ids[:2]
    ours = _logits(load_quantized(out), ids)
    original = (out / "config.json").read_text()
    for key, (change, match) in CONTRADICTIONS.items():
        _edit(out, change)
        with pytest.raises(CheckpointError, match=match) as err:
            load_quantized(out)
        assert "\n" not in str(err.value), key
        (out / "config.json").write_text(original)

    _edit(out, lambda qc: qc.pop("latticequant"))
    assert torch.equal(_logits(load_quantized(out), ids), ours)
    _edit(out, lambda qc: _schemes(qc)[0].update(head_dim=32))  # theirs: run as it says
    assert not torch.equal(_logits(load_quantized(out), ids), ours)


@pytest.mark.parametrize("rotate", ["hadamard", "folded+online"])
def test_a_size_the_rotation_cannot_take_is_refused_before_any_work(tmp_path, rotate):
    """2080 = 32 x 65: more blocks than the rotations take (the sizes our own formats take)."""
    spec = RunSpec(
        "gptq",
        lq.QuantConfig(bits=4, group_size=GROUP),
        target=TargetConfig(rotate=rotate),
        output=OutputSpec(str(tmp_path / "x"), CT),
    )
    model = make_tiny_llama(intermediate_size=2080)
    with pytest.raises((UnsupportedConfigError, UnsupportedModelError)) as err:
        prepare(model, spec)
    message = str(err.value)
    assert "down_proj" in message and "2080 = 32 x 65" in message and "\n" not in message
    assert "--skip" in message or "drop --rotate" in message
    assert not (tmp_path / "x").exists()
