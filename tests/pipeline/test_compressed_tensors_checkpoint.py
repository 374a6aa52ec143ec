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
from safetensors.torch import load_file, save_file
from tiny import GROUP, make_char_tokenizer, make_tiny_dense, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized
from latticequant.formats import get_format
from latticequant.formats.compressed_tensors import check_quantization_config
from latticequant.formats.rotation import RotatedLinear, TransformedLinear
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
    (8, True, -1, "act"),  # a channel grid says no actorder in any decode order
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
    said = None if order == "natural" or group_size == -1 else "weight"
    assert weights.get("actorder") == said
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
    stored weights (``W R``) are put back over the weight side it fuses, and the transform
    matrices the file stores (llm-compressor's ``<layer>.<scheme>_input.weight``, one per size:
    the package shares each among the layers of that size) over the ones it built."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model = _transformers(out, dequantize=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stored = load_file(str(Path(out) / "model.safetensors"))
    state.update({k: v for k, v in stored.items() if k.endswith("_input.weight")})
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
        "type 'random-hadamard', whose matrix readers take from the checkpoint, and it stores none",
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


# --- llm-compressor's own layouts ------------------------------------------------------------
#
# What llm-compressor 0.14.0.1 (compressed-tensors 0.19.0) saves, reproduced by hand from a run of
# ours (benchmarks/llmcompressor_load.py makes and loads the real ones): its weights entries carry
# ``observer_kwargs``, ``block_structure``, ``scale_dtype``, ``zp_dtype`` and ``actorder:
# static``; a transform is a submodule ``<scheme>_input`` of each layer whose matrix the
# factory shares among the layers of one size (``ParameterizedDefaultDict`` in
# ``compressed_tensors/transform/factory/hadamard.py``), so the file holds
# ``<layer>.<scheme>_input.weight`` (unnormalised, float64: ``precision`` on CPU) for the first
# layer of each size only. QuIP (``modifiers/transform/quip/base.py``, ``_create_v_scheme``): one
# scheme ``v`` on ``Linear`` ignoring ``lm_head``, ``input`` then ``weight_input`` inverse, type
# ``random-hadamard`` by default or ``hadamard``. SpinQuant (``modifiers/transform/spinquant/
# base.py``): offline ``R1`` and ``R2`` entries fused into the weights, and ``R4``, an online
# ``hadamard`` on ``re:.*down_proj$`` with its matrix stored.

LLMC_WEIGHTS = {
    "block_structure": None,
    "observer": "memoryless_minmax",
    "observer_kwargs": {},
    "scale_dtype": None,
    "zp_dtype": None,
}


def _llmc_args(targets, location, inverse, ignore=()):
    return {"ignore": list(ignore), "inverse": inverse, "location": location, "targets": targets}


def _llmc_scheme(kind, apply, head_dim=None):
    return {
        "apply": apply,
        "head_dim": head_dim,
        "precision": "torch.float64",
        "randomize": False,
        "requires_grad": False,
        "type": kind,
    }


def _as_llmcompressor(out, schemes, matrices) -> None:
    """Our folder rewritten as llm-compressor saves it: no section of ours, its weights keys,
    ``transform_config`` of ``schemes``, ``matrices`` (key -> tensor) added to the file."""
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    del qc["latticequant"]
    for group in qc["config_groups"].values():
        group["weights"].update(LLMC_WEIGHTS)
        if group["weights"].get("actorder") == "weight":
            group["weights"]["actorder"] = "static"
    qc["version"] = "0.19.0"
    qc["transform_config"] = {"config_groups": schemes}
    (out / "config.json").write_text(json.dumps(config))
    state = load_file(str(out / "model.safetensors"))
    save_file({**state, **matrices}, str(out / "model.safetensors"))


def _quip(kind):
    return {
        "v": _llmc_scheme(
            kind,
            [
                _llmc_args(["Linear"], "input", False, ["lm_head"]),
                _llmc_args(["Linear"], "weight_input", True, ["lm_head"]),
            ],
        )
    }


def _signed_hadamard(b: int, seed: int) -> torch.Tensor:
    """``diag(s) H_b``, unnormalised: a random Hadamard matrix as ``random_hadamard_matrix``
    builds one for a power of two (``compressed_tensors/transform/utils/hadamard.py``)."""
    from compressed_tensors.transform import deterministic_hadamard_matrix

    g = torch.Generator().manual_seed(seed)
    signs = (1 - 2 * torch.randint(0, 2, (b,), generator=g)).to(torch.float64)
    return signs[:, None] * deterministic_hadamard_matrix(b, torch.float64)


# the first layer of each input size, under which saving keeps the shared matrix
FIRST_64 = "model.layers.0.self_attn.q_proj"
FIRST_128 = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard"])
def test_llmcompressor_quip_checkpoints_load(tmp_path, calib_ids, kind):
    """QuIP on every linear layer (hidden 64, intermediate 128: one block each), its matrices
    stored once per size: ours runs them as compressed-tensors does. ``hadamard`` stores the
    Sylvester matrix our run was quantized in, so the logits are the run's; ``random-hadamard``
    stores signed ones, which change the model: compressed-tensors' reading is the reference."""
    from compressed_tensors.transform import deterministic_hadamard_matrix

    out = tmp_path / "ct"
    model = _rotated_run(out, calib_ids, "hadamard", intermediate=128)
    if kind == "hadamard":
        m64, m128 = (deterministic_hadamard_matrix(b, torch.float64) for b in (64, 128))
    else:
        m64, m128 = _signed_hadamard(64, 1), _signed_hadamard(128, 2)
    matrices = {f"{FIRST_64}.v_input.weight": m64, f"{FIRST_128}.v_input.weight": m128}
    _as_llmcompressor(out, _quip(kind), matrices)
    ids = calib_ids[:2]
    ours = load_quantized(out)
    down = [ours.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in (0, 1)]
    if kind == "hadamard":
        assert all(isinstance(m, RotatedLinear) for m in down)
        assert _rel(_logits(ours, ids), _logits(model, ids)) < RTOL
    else:
        assert all(isinstance(m, TransformedLinear) for m in down)
        assert down[0].matrix is down[1].matrix  # stored once, held once
        assert torch.equal(down[1].matrix, m128)
    theirs = _applied_by_compressed_tensors(out)
    assert _rel(_logits(theirs, ids), _logits(ours, ids)) < RTOL


def test_an_llmcompressor_spinquant_checkpoint_loads(tmp_path, calib_ids):
    """SpinQuant R1 and R2 (offline: in the weights already) and R4 (online on down_proj, its
    matrix stored once): our folded+online run relabelled, the same logits."""
    from compressed_tensors.transform import deterministic_hadamard_matrix

    out = tmp_path / "ct"
    model = _rotated_run(out, calib_ids, "folded+online", intermediate=128)
    ids = calib_ids[:2]
    schemes = {
        "R1": _llmc_scheme(
            "hadamard",
            [
                _llmc_args(
                    ["re:.*embed_tokens$", "re:.*o_proj$", "re:.*down_proj$"],
                    "weight_output",
                    False,
                ),
                _llmc_args(
                    [
                        "re:.*q_proj$",
                        "re:.*k_proj$",
                        "re:.*v_proj$",
                        "re:.*up_proj$",
                        "re:.*gate_proj$",
                        "lm_head",
                    ],
                    "weight_input",
                    True,
                ),
            ],  # fmt: skip
        ),
        "R2": _llmc_scheme(
            "hadamard",
            [
                _llmc_args(["re:.*v_proj$"], "weight_output", False),
                _llmc_args(["re:.*o_proj$"], "weight_input", True),
            ],
            head_dim=16,
        ),
        "R4": _llmc_scheme(
            "hadamard",
            [
                _llmc_args(["re:.*down_proj$"], "input", False),
                _llmc_args(["re:.*down_proj$"], "weight_input", True),
            ],
        ),
    }
    H = deterministic_hadamard_matrix(128, torch.float64)
    _as_llmcompressor(out, schemes, {f"{FIRST_128}.R4_input.weight": H})
    assert _rel(_logits(load_quantized(out), ids), _logits(model, ids)) < RTOL

    state = load_file(str(out / "model.safetensors"))
    signs = torch.ones(128, dtype=torch.float64)
    signs[3] = -1
    save_file({**state, f"{FIRST_128}.R4_input.weight": signs[:, None] * H},
              str(out / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match="not the Sylvester Hadamard matrix") as err:
        load_quantized(out)
    assert "\n" not in str(err.value)


def test_what_an_llmcompressor_transform_lacks_is_refused_in_one_line(tmp_path, calib_ids):
    out = tmp_path / "ct"
    _rotated_run(out, calib_ids, "hadamard", intermediate=128)
    _as_llmcompressor(out, _quip("random-hadamard"), {})
    with pytest.raises(CheckpointError, match="stores none for it") as err:
        load_quantized(out)
    assert "v_input.weight" in str(err.value) and "\n" not in str(err.value)

    state = load_file(str(out / "model.safetensors"))
    extra = {f"{FIRST_64}.v_input.weight": _signed_hadamard(64, 1),
             f"{FIRST_128}.v_input.weight": _signed_hadamard(128, 2),
             "model.layers.1.mlp.up_proj.v_input.weight": _signed_hadamard(64, 3)}  # fmt: skip
    save_file({**state, **extra}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="different matrices of size 64") as err:
        load_quantized(out)
    assert "\n" not in str(err.value)
