"""Checkpoint folders: save, load with the CPU loader, and clear errors for broken ones."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cases import bit_fields
from runs import run_quantize
from safetensors.torch import load_file, save_file
from tiny import GROUP, make_char_tokenizer, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized
from latticequant.formats import unpack_gptq
from latticequant.pipeline import Override


def _quantize(out, calib_ids, **kw):
    model = make_tiny_llama()
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, order="act", sym=True)
    stats = run_quantize(
        model, make_char_tokenizer(), calib_ids, "gptq", cfg, out, progress=False, **kw
    )
    return model, stats


@pytest.fixture
def saved(tmp_path, calib_ids):
    out = tmp_path / "ckpt"
    model, stats = _quantize(out, calib_ids)
    return out, model, stats


def test_round_trip_logits_equal_in_memory_model(saved, calib_ids):
    out, model, _ = saved
    loaded = load_quantized(out)
    ref = model(calib_ids[:3]).logits
    got = loaded(calib_ids[:3]).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert not isinstance(layer, torch.nn.Linear)  # the format's dequantizing module


def test_folder_contents_and_configs(saved):
    out, model, stats = saved
    names = sorted(p.name for p in out.iterdir())
    for required in ("config.json", "model.safetensors", "quantize_config.json", "quant_log.json"):
        assert required in names
    assert "tokenizer.json" in names
    assert not any(n.startswith(".") for n in names)  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    tensors = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to the embeddings, stored once
    assert "model.embed_tokens.weight" in tensors
    for s in stats:
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert f"{s['name']}.{key}" in tensors
        assert f"{s['name']}.weight" not in tensors
    qc = json.loads((out / "quantize_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == qc
    # act-order with static groups stores the natural g_idx: nothing for a reader to permute
    assert qc["bits"] == 4 and qc["group_size"] == GROUP and qc["desc_act"] is False
    assert qc["sym"] is True and qc["quant_method"] == "gptq"
    assert qc["checkpoint_format"] == "gptq" and qc["true_sequential"] is True
    assert qc["latticequant"]["method"] == "gptq"
    assert qc["latticequant"]["config"]["order"] == "act"
    log = json.loads((out / "quant_log.json").read_text())
    assert [e["name"] for e in log["layers"]] == [s["name"] for s in stats]


def test_stored_codes_reproduce_the_in_memory_weights(saved):
    out, model, stats = saved
    tensors = load_file(str(out / "model.safetensors"))
    for s in stats:
        layer = {k: tensors[f"{s['name']}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        codes, scales, zeros, g_idx = unpack_gptq(layer, 4)
        W = scales.double()[:, g_idx] * (codes.double() - zeros.double()[:, g_idx])
        assert torch.allclose(W.float(), model.get_submodule(s["name"]).weight, atol=1e-6)


def test_gptq_v2_and_overrides_round_trip(tmp_path, calib_ids):
    out = tmp_path / "v2"
    overrides = [
        Override("layers\\.1\\.mlp\\.down_proj", skip=True),
        Override("o_proj", changes={"bits": 8}),
    ]
    model, stats = _quantize(out, calib_ids, checkpoint_format="gptq_v2", overrides=overrides)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2"
    assert "-:^model[.]layers[.]1[.]mlp[.]down_proj$" in qc["dynamic"]
    assert qc["dynamic"]["+:^model[.]layers[.]0[.]self_attn[.]o_proj$"] == {"bits": 8}
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.1.mlp.down_proj.weight" in tensors
    loaded = load_quantized(out)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert torch.allclose(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits, atol=1e-5)


def test_truncated_checkpoint_is_refused(saved):
    out = saved[0]
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_quantized(out)


def test_missing_tensor_is_named(saved):
    out = saved[0]
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.qzeros"):
        load_quantized(out)


def test_float_tensor_missing_or_mismatched(saved):
    out = saved[0]
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \[3\]"):
        load_quantized(out)
    del tensors["model.norm.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor model.norm.weight"):
        load_quantized(out)


def test_config_that_does_not_match_the_tensors(saved):
    out = saved[0]
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_quantized(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(tmp_path / "empty")
    assert not is_quantized_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="no quantization_config latticequant reads"):
        load_quantized(tmp_path / "empty")


def test_gpt2_conv1d_round_trip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)).eval()
    calib = torch.randint(0, 128, (4, 32))
    stats = run_quantize(
        model,
        None,
        calib,
        "gptq",
        lq.QuantConfig(bits=4, group_size=GROUP),
        tmp_path / "g",
        progress=False,
    )
    assert len(stats) == 8
    loaded = load_quantized(tmp_path / "g")
    assert torch.allclose(loaded(calib).logits, model(calib).logits, atol=1e-4)


def honouring_reader(folder) -> dict[str, torch.Tensor]:
    """A reader that follows ``desc_act`` as loaders that skip ``g_idx`` do: with
    ``desc_act: false`` it takes the natural ``g_idx = j // group_size``. Dense weights by name."""
    qc = json.loads((folder / "quantize_config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        parts = {k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        codes, scales, zeros, g_idx = unpack_gptq(parts, qc["bits"], qc["checkpoint_format"])
        if not qc["desc_act"]:
            g_idx = torch.arange(codes.shape[1]) // qc["group_size"]
        weights[name] = scales.double()[:, g_idx] * (codes - zeros[:, g_idx]).double()
    return weights


@pytest.mark.parametrize(
    "order,static_groups,permuted",
    [
        ("act", True, False),
        ("act", False, True),
        ("min-pivot", False, True),
        ("reverse", False, True),
        ("natural", False, False),
    ],
)
def test_desc_act_is_read_off_g_idx(tmp_path, calib_ids, order, static_groups, permuted):
    model = make_tiny_llama()
    cfg = lq.QuantConfig(bits=4, group_size=GROUP, order=order, static_groups=static_groups)
    out = tmp_path / "ckpt"
    run_quantize(model, None, calib_ids, "gptq", cfg, out, progress=False)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["desc_act"] is permuted
    # a reader that honours the flag reads exactly the weights the model runs with
    for name, W in honouring_reader(out).items():
        ref = model.get_submodule(name).weight.double()
        assert torch.allclose(W, ref, atol=1e-6), name


def original_convention_reader(folder) -> dict[str, torch.Tensor]:
    """A v1 reader written from the original convention: zero point = field + 1, field by
    field of the little-endian bit stream (as AutoGPTQ-style kernels and vLLM read it)."""
    qc = json.loads((folder / "quantize_config.json").read_text())
    bits, tensors = qc["bits"], load_file(str(folder / "model.safetensors"))
    weights = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight, qzeros = tensors[key], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"].double(), tensors[f"{name}.g_idx"].long()

        d_in, d_out = g_idx.numel(), scales.shape[1]
        codes = torch.tensor([bit_fields(qweight[:, j].tolist(), d_in, bits) for j in range(d_out)])
        zeros = (
            torch.tensor([bit_fields(row.tolist(), d_out, bits) for row in qzeros]) + 1
        )  # (G, d_out)
        weights[name] = scales.t()[:, g_idx] * (codes - zeros.t()[:, g_idx]).double()
    return weights


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_asymmetric_checkpoint_reads_the_same_by_the_original_convention(
    tmp_path, calib_ids, bits
):
    model = make_tiny_llama()
    with torch.no_grad():  # groups without negative weights: min-max would give offset 0
        for block in model.model.layers:
            block.mlp.up_proj.weight[:, :GROUP].abs_()
            block.self_attn.o_proj.weight[:8].abs_()
    cfg = lq.QuantConfig(bits=bits, group_size=GROUP, sym=False)
    out = tmp_path / "ckpt"
    run_quantize(model, None, calib_ids, "rtn", cfg, out, progress=False)
    weights = original_convention_reader(out)
    assert len(weights) == 14
    for name, W in weights.items():
        torch.testing.assert_close(W, model.get_submodule(name).weight.double(), rtol=0, atol=1e-6)
    zeros = unpack_gptq(
        {
            k: load_file(str(out / "model.safetensors"))[f"model.layers.0.mlp.up_proj.{k}"]
            for k in ("qweight", "qzeros", "scales", "g_idx")
        },
        bits,
    )[2]
    assert int(zeros.min()) >= 1


def test_a_layer_neither_quantized_nor_skipped_is_never_written_in_float(tmp_path, calib_ids):
    from latticequant.methods import get_method
    from latticequant.pipeline.checkpoint import QuantizedLayer, save_quantized

    model = make_tiny_llama()
    cfg = lq.QuantConfig(bits=4, group_size=GROUP)
    out = tmp_path / "ckpt"
    run_quantize(model, None, calib_ids, "rtn", cfg, out, progress=False)
    layers = {}  # the layers of a finished run, read back from its checkpoint
    tensors = load_file(str(out / "model.safetensors"))
    for name in json.loads((out / "quant_log.json").read_text())["layers"]:
        key = name["name"]
        layers[key] = QuantizedLayer(
            key,
            "gptq",
            {k: tensors[f"{key}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
            name,
            {"bits": 4, "group_size": GROUP, "sym": False},
        )
    dropped = "model.layers.1.mlp.down_proj"
    del layers[dropped]
    (tmp_path / "w").mkdir()
    with pytest.raises(CheckpointError, match=f"layer {dropped} is neither quantized nor skipped"):
        save_quantized(model, tmp_path / "w", layers, method=get_method("rtn"), config=cfg)
    save_quantized(
        model, tmp_path / "w", layers, method=get_method("rtn"), config=cfg,
        skipped={dropped: "skipped by pattern 'down'"},
    )  # fmt: skip
    log = json.loads((tmp_path / "w" / "quant_log.json").read_text())
    assert log["skipped"] == {dropped: "skipped by pattern 'down'"}


def test_a_modules_tensors_decide_its_kind_and_no_tensor_is_left_unread(tmp_path, calib_ids):
    """A rotated checkpoint whose module entry lost its rotation would run W R as W: refused,
    as is a tensor nothing in config.json reads."""
    from safetensors.torch import load_file, save_file

    from latticequant.pipeline.target import TargetConfig

    out = tmp_path / "rot"
    cfg = lq.QuantConfig(bits=4, group_size=GROUP)
    target = TargetConfig(rotate="hadamard")
    run_quantize(make_tiny_llama(), None, calib_ids, "gptq", cfg, out, target=target)
    load_quantized(out)  # as written, it loads
    config = json.loads((out / "config.json").read_text())
    name = "model.layers.0.self_attn.q_proj"
    assert config["quantization_config"]["latticequant"]["modules"][name]["format"] == (
        "gptq+hadamard"
    )
    lost = json.loads(json.dumps(config))
    lost["quantization_config"]["latticequant"]["modules"][name]["format"] = "gptq"
    (out / "config.json").write_text(json.dumps(lost))
    with pytest.raises(CheckpointError, match=f"module {name} stores .*rot_signs.*'gptq'"):
        load_quantized(out)
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.rot_signs_copy"] = torch.zeros(3)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="rot_signs_copy is read by nothing"):
        load_quantized(out)


def reference_load(folder, cache_weight=None) -> torch.nn.Module:
    """A checkpoint loaded the whole-model way, as the loader did before its skeleton moved to
    ``meta``: a float32 model from config.json, the file's float tensors loaded into it, the
    embeddings tied, then each module of config.json's list built by its format and swapped
    in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from latticequant.formats import get_format

    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    tensors = load_file(str(folder / "model.safetensors"))
    modules = qc["latticequant"]["modules"]
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in modules}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    for name, entry in modules.items():
        own = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        bias = own.pop("bias", None)
        fmt = get_format(entry["format"])
        meta = {**fmt.module_meta(entry, qc), "cache_weight": cache_weight}
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fmt.module(own, meta, bias))
    return model.eval()


def _rotated(tmp_path, calib_ids, method="gptq", config=None, rotate="hadamard"):
    from latticequant.pipeline.target import TargetConfig

    model = make_tiny_llama()
    out = tmp_path / f"rotated-{method}"
    config = config or lq.QuantConfig(bits=4, group_size=GROUP, order="act")
    run_quantize(model, None, calib_ids, method, config, out, target=TargetConfig(rotate=rotate))
    return out, model


def _edit_config(out, edit) -> None:
    """Apply ``edit`` by hand to config.json's quantization_config and write the same to
    quantize_config.json (so that the two still agree)."""
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "quantize_config.json").write_text(json.dumps(cfg["quantization_config"]))


def test_a_module_kind_is_read_off_its_tensors_without_our_section(tmp_path, calib_ids):
    """A GPTQ checkpoint without our module list (as another tool writes it): each module's
    format comes from its tensors, and the model still runs right."""
    out = tmp_path / "plain"
    model, _ = _quantize(out, calib_ids)
    _edit_config(out, lambda qc: qc.pop("latticequant"))
    loaded = load_quantized(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib_ids[:2]).logits, model(calib_ids[:2]).logits,
                                   rtol=2e-4, atol=2e-4)  # fmt: skip


def test_an_entry_whose_format_contradicts_the_tensors_is_refused(saved):
    out = saved[0]
    name = "model.layers.1.self_attn.k_proj"
    _edit_config(out, lambda qc: qc["latticequant"]["modules"][name].update(format="hptq"))
    with pytest.raises(CheckpointError, match=f"module {name} stores .* config.json says 'hptq'"):
        load_quantized(out)


def test_an_entry_whose_bits_contradict_the_tensors_is_refused(saved):
    out = saved[0]
    name = "model.layers.1.self_attn.k_proj"
    _edit_config(out, lambda qc: qc["latticequant"]["modules"][name].update(bits=8))
    with pytest.raises(CheckpointError, match=f"module {name}: "):
        load_quantized(out)


@pytest.mark.parametrize(
    "extra",
    [
        "model.layers.0.mlp.up_proj.rot_signs",  # a rotation no entry asks for
        "model.layers.0.mlp.up_proj.outlier_val",  # an outlier list of another format
        "model.layers.0.mlp.up_proj.weight",  # the float weight of a quantized layer
        "model.layers.0.extra_scale",  # a tensor of no module at all
        "lm_head.weight",  # a different head where config.json ties it to the embeddings
    ],
)
def test_every_tensor_the_loader_would_not_use_is_refused(saved, extra):
    out = saved[0]
    tensors = load_file(str(out / "model.safetensors"))
    tensors[extra] = torch.ones(8, dtype=torch.uint8 if "rot" in extra else torch.float32)
    if extra == "lm_head.weight":
        tensors[extra] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(out / "model.safetensors"))
    module, _, key = extra.rpartition(".")
    with pytest.raises(CheckpointError, match=rf"{module.replace('.', '[.]')}.*\b{key}\b"):
        load_quantized(out)


def test_a_head_config_json_no_longer_ties_is_refused_not_left_random(saved):
    """config.json edited to untie the head of a checkpoint that stores it once (our section
    still lists the tie): the head would be left as initialised; the loader names it instead."""
    out = saved[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["latticequant"]["tied"]
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        load_quantized(out)


@pytest.mark.parametrize(
    "case", ["gptq-act", "v2-overrides", "rotated-hptq", "folded-online", "ssqr", "gpt2"]
)
def test_logits_equal_the_whole_model_loader_bit_for_bit(tmp_path, calib_ids, case):
    from latticequant.methods.hptq import HPTQConfig
    from latticequant.methods.ssqr import SSQRConfig

    if case == "rotated-hptq":
        out, _ = _rotated(tmp_path, calib_ids, "hptq", HPTQConfig(target_bits=3.125, tol=0.05))
    elif case == "folded-online":
        out, _ = _rotated(tmp_path, calib_ids, rotate="folded+online")
    elif case == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128))
        out = tmp_path / "g"
        cfg = lq.QuantConfig(bits=4, group_size=GROUP)
        run_quantize(model.eval(), None, calib_ids, "rtn", cfg, out)
    elif case == "ssqr":
        out = tmp_path / "s"
        cfg = SSQRConfig(bits=3, group_size=GROUP, outlier_rate=0.02)
        run_quantize(make_tiny_llama(), None, calib_ids, "ssqr", cfg, out)
    else:
        out = tmp_path / case
        overrides = [Override("layers\\.1\\.mlp\\.down_proj", skip=True)]
        kw = dict(checkpoint_format="gptq_v2", overrides=overrides)
        _quantize(out, calib_ids, **(kw if case == "v2-overrides" else {}))
    for cache in (None, False):
        ref = reference_load(out, cache)
        loaded = load_quantized(out, cache_weight=cache)
        assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in ref.named_parameters()]
        with torch.no_grad():
            assert torch.equal(loaded(calib_ids[:3]).logits, ref(calib_ids[:3]).logits)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    if case != "gpt2":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again
    else:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


LOAD_PEAK = """
import gc, re, sys
from latticequant.checkpoint import load_quantized

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

load_quantized(sys.argv[1], cache_weight=False)  # imports and first-use buffers
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS")
model = load_quantized(sys.argv[2], cache_weight=False)
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_loading_does_not_build_the_float_model(tmp_path, calib_ids):
    """The peak memory of a load stays well under the float32 weights of its quantized layers:
    the model is built on ``meta`` and only the file's tensors are materialised (a whole
    float32 model would cost at least those weights)."""
    import subprocess
    import sys

    # many layers, each small: the transient of building one module stays small beside them
    model = make_tiny_llama(hidden_size=256, intermediate_size=1024, num_hidden_layers=16)
    out = tmp_path / "wide"
    cfg = lq.QuantConfig(bits=4, group_size=128)
    run_quantize(model, None, calib_ids[:2, :16], "rtn", cfg, out)
    _quantize(tmp_path / "small", calib_ids)
    linear = 4 * sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj"))
    run = [sys.executable, "-c", LOAD_PEAK, str(tmp_path / "small"), str(out)]
    rise = int(subprocess.run(run, capture_output=True, text=True, check=True).stdout.split()[-1])
    assert rise < 0.6 * linear, (rise / 2**20, linear / 2**20)


def test_packed_modules_keep_no_dense_copy_without_the_cache(tmp_path, calib_ids):
    """``cache_weight=False`` (eval's default for checkpoints): after a forward, every HPTQ
    and GPTQ module holds less than a byte per weight, so no decoded copy of any width."""
    from latticequant.formats import HuffmanLinear, QuantLinear
    from latticequant.methods.hptq import HPTQConfig

    hptq, _ = _rotated(tmp_path, calib_ids, "hptq", HPTQConfig(target_bits=3.125, tol=0.05))
    _quantize(tmp_path / "gptq", calib_ids)
    for folder, kind in ((hptq, HuffmanLinear), (tmp_path / "gptq", QuantLinear)):
        model = load_quantized(folder, cache_weight=False)
        with torch.no_grad():
            model(calib_ids[:2])
        modules = [m for m in model.modules() if isinstance(m, kind)]
        assert len(modules) == 14
        for m in modules:
            held = {id(t): t for t in m.buffers()}
            held.update({id(v): v for v in vars(m).values() if isinstance(v, torch.Tensor)})
            nbytes = sum(t.numel() * t.element_size() for t in held.values())
            assert nbytes < m.in_features * m.out_features, (type(m).__name__, nbytes)
