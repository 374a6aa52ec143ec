"""The file-level quantization config (what GPTQModel, transformers and vLLM read) checked
against the stored tensors: the writer's outputs pass, every contradiction is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from runs import run_quantize
from tiny import GROUP, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import CheckpointError, load_quantized
from latticequant.methods.hptq import HPTQConfig
from latticequant.methods.ssqr import SSQRConfig
from latticequant.pipeline import Override
from latticequant.pipeline.checkpoint import check_file_config
from latticequant.pipeline.target import TargetConfig

OVERRIDES = [
    Override("layers\\.1\\.mlp\\.down_proj", skip=True),
    Override("o_proj", changes={"bits": 8, "group_size": 16}),
    Override("k_proj", changes={"sym": False}),
]
WRITER_CASES = {
    "gptq-act-permuted": ("gptq", dict(bits=4, group_size=GROUP, order="act"), {}),
    "gptq-act-static": (
        "gptq",
        dict(bits=4, group_size=GROUP, order="act", static_groups=True),
        {},
    ),
    "gptq-3bit-per-row": ("gptq", dict(bits=3, group_size=-1), {}),
    "rtn-2bit-asym-v1": ("rtn", dict(bits=2, group_size=GROUP, sym=False), {}),
    "rtn-8bit-asym-v2": (
        "rtn",
        dict(bits=8, group_size=16, sym=False),
        dict(checkpoint_format="gptq_v2"),
    ),
    "gptq-v2-overrides": (
        "gptq",
        dict(bits=4, group_size=GROUP, order="act", static_groups=False, sym=True),
        dict(checkpoint_format="gptq_v2", overrides=OVERRIDES),
    ),
    "gptq-rotated": (
        "gptq",
        dict(bits=4, group_size=GROUP),
        dict(target=TargetConfig(rotate="hadamard")),
    ),
    "gptq-folded-online": (
        "gptq",
        dict(bits=4, group_size=GROUP),
        dict(target=TargetConfig(rotate="folded+online")),
    ),
    "compressed-tensors": (
        "gptq",
        dict(bits=4, group_size=GROUP, sym=False),
        dict(checkpoint_format="compressed-tensors", overrides=OVERRIDES[:1]),
    ),
    "ssqr": ("ssqr", SSQRConfig(bits=3, group_size=GROUP, outlier_rate=0.02), {}),
    "hptq": ("hptq", HPTQConfig(target_bits=3.125, tol=0.05), {}),
}

K_PROJ = "+:^model[.]layers[.]0[.]self_attn[.]k_proj$"
O_PROJ = "+:^model[.]layers[.]0[.]self_attn[.]o_proj$"
SKIP = "-:^model[.]layers[.]1[.]mlp[.]down_proj$"


def _write(folder, calib_ids, case):
    method, cfg, kw = WRITER_CASES[case]
    if isinstance(cfg, dict):
        cfg = lq.QuantConfig(**cfg)
    run_quantize(make_tiny_llama(), None, calib_ids, method, cfg, folder, **kw)
    return folder


@pytest.mark.parametrize("case", sorted(WRITER_CASES))
def test_the_writers_outputs_pass(tmp_path, calib_ids, case):
    out = _write(tmp_path / case, calib_ids, case)
    check_file_config(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if case == "hptq":  # no fixed code width, no rule for fields a format lacks
        assert qc["bits"] is None and "dynamic" not in qc
    if case == "ssqr":
        assert "dynamic" not in qc
    if case == "gptq-v2-overrides":
        assert qc["desc_act"] is True and qc["sym"] is True
        assert qc["dynamic"][O_PROJ] == {"bits": 8, "group_size": 16}
        assert qc["dynamic"][K_PROJ] == {"sym": False}


@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory):
    """A symmetric gptq_v2 4-bit checkpoint with groups of 32, act-order (permuted g_idx), a
    skipped layer, an 8-bit override and an asymmetric one; each test gets its own copy."""
    from tiny import id_stream

    from latticequant.pipeline.data import calibration_windows

    calib = calibration_windows(id_stream(), nsamples=8, seqlen=32, seed=0)
    return _write(tmp_path_factory.mktemp("w") / "ckpt", calib, "gptq-v2-overrides")


@pytest.fixture
def ckpt(gptq_ckpt, tmp_path):
    return shutil.copytree(gptq_ckpt, tmp_path / "ckpt")


def _edit(out, edit, files=("config.json", "quantize_config.json")):
    """Apply ``edit`` by hand to the quantization config in each of ``files``."""
    for name in files:
        path = out / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        edit(data["quantization_config"] if name == "config.json" else data)
        path.write_text(json.dumps(data))


def _set(**changes):
    return lambda qc: qc.update(changes)


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set(bits=8), r"q_proj: it stores 4-bit codes but the file-level config says bits 8"),
        (_set(bits=2), r"stores 4-bit codes but the file-level config says bits 2"),
        (_set(group_size=64), r"stores 2 groups over 64 inputs, not group_size 64"),
        (_set(group_size=16), r"not group_size 16"),
        (_set(group_size=-1), r"not group_size -1"),
        (_set(desc_act=False), r"g_idx is permuted \(act-order\) but the file-level desc_act"),
        (
            lambda qc: qc["dynamic"][K_PROJ].pop("sym"),
            r"module model.layers.0.self_attn.k_proj: the file-level config says sym true but "
            r"it has zero points other than 8",
        ),
        (_set(quant_method="gptq"), None),  # every module plain GPTQ: a true claim
        (_set(format="gptq"), r"stores gptq_v2 zero points but the file-level format is 'gptq'"),
        (
            _set(checkpoint_format="gptq"),
            r"stores gptq_v2 zero points but the file-level checkpoint_format is 'gptq'",
        ),
        (lambda qc: qc["dynamic"][O_PROJ].update(bits=4), r"o_proj: it stores 8-bit .* bits 4"),
        (lambda qc: qc["dynamic"][O_PROJ].pop("group_size"), r"o_proj: it stores 4 groups .* 32"),
        (
            lambda qc: qc["dynamic"].pop(SKIP),
            r"layer model.layers.1.mlp.down_proj is stored in float but the file-level config "
            r"does not skip it",
        ),
        (
            lambda qc: qc["dynamic"].update({"-:.*q_proj": {}}),
            r"module model.layers.0.self_attn.q_proj: it is stored quantized but the file-level "
            r"config skips it",
        ),
        (lambda qc: qc["dynamic"].update({"+:(": {}}), r"dynamic rule '\+:\(' is not a valid"),
    ],
)
def test_a_file_config_that_contradicts_the_tensors_is_refused(ckpt, edit, message):
    _edit(ckpt, edit)
    if message is None:
        check_file_config(ckpt)
        load_quantized(ckpt)
        return
    for check in (check_file_config, load_quantized):
        with pytest.raises(CheckpointError, match=message):
            check(ckpt)


def test_quantize_config_json_must_equal_config_json(ckpt):
    _edit(ckpt, _set(bits=8), files=("quantize_config.json",))
    with pytest.raises(
        CheckpointError, match=r"quantize_config.json differs .* 'bits': 8 against 4"
    ):
        load_quantized(ckpt)


def test_quant_method_gptq_is_refused_on_hptq_and_rotated_checkpoints(tmp_path, calib_ids):
    for case, fmt in (("hptq", "hptq"), ("gptq-rotated", r"gptq\+hadamard")):
        out = _write(tmp_path / case, calib_ids, case)
        check_file_config(out)
        _edit(out, _set(quant_method="gptq"))
        with pytest.raises(
            CheckpointError, match=rf"module \S+: the layer is {fmt} but the file-level "
            r"quant_method is 'gptq'"
        ):  # fmt: skip
            load_quantized(out)
    _edit(out, _set(format="gptq", quant_method="latticequant"))
    with pytest.raises(CheckpointError, match="is rotated but the file-level format is 'gptq'"):
        load_quantized(out)


def test_hptq_claiming_a_code_width_is_refused(tmp_path, calib_ids):
    out = _write(tmp_path / "h", calib_ids, "hptq")
    _edit(out, _set(bits=4))
    with pytest.raises(CheckpointError, match=r"it is hptq \(.*no fixed code width\) .* bits 4"):
        load_quantized(out)


def test_a_compressed_tensors_config_that_contradicts_the_tensors_is_refused(tmp_path, calib_ids):
    """A checkpoint with our module table is checked against its config groups as well."""
    out = _write(tmp_path / "ct", calib_ids, "compressed-tensors")
    skipped = "model.layers.1.mlp.down_proj"
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert skipped in cfg["ignore"]

    def num_bits(bits):
        return lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=bits)

    _edit(out, num_bits(8))
    with pytest.raises(CheckpointError, match=r"module \S+: .*group_0"):
        load_quantized(out)
    _edit(out, num_bits(4))
    _edit(out, lambda qc: qc["ignore"].remove(skipped))
    with pytest.raises(CheckpointError, match=f"layer {skipped} is stored in float"):
        load_quantized(out)
    _edit(out, lambda qc: qc["ignore"].extend([skipped, "model.layers.0.mlp.up_proj"]))
    with pytest.raises(CheckpointError, match="up_proj: it is stored quantized but the file"):
        load_quantized(out)


def test_the_checked_checkpoint_runs_as_written(ckpt, calib_ids):
    """The check reads; it changes nothing the model runs with."""
    a = load_quantized(ckpt)
    check_file_config(ckpt)
    with torch.no_grad():
        assert torch.equal(a(calib_ids[:2]).logits, load_quantized(ckpt)(calib_ids[:2]).logits)
