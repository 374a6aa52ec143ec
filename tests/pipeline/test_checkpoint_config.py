"""The file-level quantization config (what GPTQModel, transformers and vLLM read) checked
against the stored tensors: the writer's outputs pass, every contradiction is refused."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import GROUP, make_tiny_llama

import latticequant as lq
from latticequant.checkpoint import CheckpointError, load_quantized
from latticequant.methods.hptq import HPTQConfig
from latticequant.methods.ssqr import SSQRConfig
from latticequant.pipeline import Override, quantize_model
from latticequant.pipeline.checkpoint import check_file_config
from latticequant.pipeline.target import TargetConfig

WRITER_CASES = {
    "gptq-act-permuted": (
        "gptq",
        dict(bits=4, group_size=GROUP, order="act", static_groups=False),
        {},
    ),
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
        dict(
            checkpoint_format="gptq_v2",
            overrides=[
                Override("layers\\.1\\.mlp\\.down_proj", skip=True),
                Override("o_proj", changes={"bits": 8, "group_size": 16}),
                Override("k_proj", changes={"sym": False}),
            ],
        ),
    ),
    "gptq-rotated": (
        "gptq",
        dict(bits=4, group_size=GROUP),
        dict(target=TargetConfig(rotate="hadamard")),
    ),
    "ssqr": ("ssqr", SSQRConfig(bits=3, group_size=GROUP, outlier_rate=0.02), {}),
    "hptq": ("hptq", HPTQConfig(target_bits=3.125, tol=0.05), {}),
}


def _write(folder, calib_ids, case):
    method, cfg, kw = WRITER_CASES[case]
    if isinstance(cfg, dict):
        cfg = lq.QuantConfig(**cfg)
    quantize_model(make_tiny_llama(), None, calib_ids, method, cfg, folder, progress=False, **kw)
    return folder


@pytest.mark.parametrize("case", sorted(WRITER_CASES))
def test_the_writers_outputs_pass(tmp_path, calib_ids, case):
    out = _write(tmp_path / case, calib_ids, case)
    check_file_config(out)
    qc = json.loads((out / "quantize_config.json").read_text())
    if case == "hptq":  # no fixed code width, no GPTQ fields for a format that lacks them
        assert qc["bits"] is None and "dynamic" not in qc
    if case == "gptq-v2-overrides":
        assert qc["desc_act"] is True and qc["sym"] is True
        assert qc["dynamic"][O_PROJ] == {"bits": 8, "group_size": 16}
        assert qc["dynamic"][K_PROJ] == {"sym": False}


@pytest.fixture(scope="module")
def gptq_ckpt(tmp_path_factory):
    """A symmetric 4-bit checkpoint with groups of 32, act-order (permuted g_idx), a skipped
    layer, an 8-bit override and an asymmetric one; each test gets its own copy."""
    from tiny import id_stream

    from latticequant.pipeline.data import calibration_windows

    calib = calibration_windows(id_stream(), nsamples=8, seqlen=32, seed=0)
    return _write(tmp_path_factory.mktemp("w") / "ckpt", calib, "gptq-v2-overrides")


@pytest.fixture
def ckpt(gptq_ckpt, tmp_path):
    import shutil

    return shutil.copytree(gptq_ckpt, tmp_path / "ckpt")


def _edit(out, edit, files=("config.json", "quantize_config.json")):
    """Apply ``edit`` to the quantization config in each of ``files``."""
    for name in files:
        path = out / name
        data = json.loads(path.read_text())
        edit(data["quantization_config"] if name == "config.json" else data)
        path.write_text(json.dumps(data))


def _set(**changes):
    return lambda qc: qc.update(changes)


K_PROJ = "+:^model[.]layers[.]0[.]self_attn[.]k_proj$"
O_PROJ = "+:^model[.]layers[.]0[.]self_attn[.]o_proj$"
SKIP = "-:^model[.]layers[.]1[.]mlp[.]down_proj$"


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set(bits=8), r"stores 4-bit codes but the quantize config says bits 8"),
        (_set(bits=2), r"stores 4-bit codes but the quantize config says bits 2"),
        (_set(group_size=64), r"stores \d+ groups over \d+ inputs, not group_size 64"),
        (_set(group_size=16), r"not group_size 16"),
        (_set(group_size=-1), r"not group_size -1"),
        (_set(desc_act=False), r"g_idx is permuted \(act-order\) but desc_act is false"),
        (
            lambda qc: qc["dynamic"][K_PROJ].pop("sym"),
            r"sym true but module model.layers.0.self_attn.k_proj has zero points other than 8",
        ),
        (_set(quant_method="gptq"), None),  # every module plain GPTQ: a true claim
        (_set(format="gptq"), r"format 'gptq' differs from its checkpoint_format 'gptq_v2'"),
        (lambda qc: qc["dynamic"][O_PROJ].update(bits=4), r"o_proj stores 8-bit codes .* bits 4"),
        (lambda qc: qc["dynamic"][O_PROJ].pop("group_size"), r"o_proj stores 4 groups .* 32"),
        (
            lambda qc: qc["dynamic"].pop(SKIP),
            r"layer model.layers.1.mlp.down_proj is stored in float",
        ),
        (
            lambda qc: qc["dynamic"].update({"-:.*q_proj": {}}),
            r"module model.layers.0.self_attn.q_proj is stored quantized but a dynamic '-:'",
        ),
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
    for case, what in (("hptq", "is hptq"), ("gptq-rotated", "is rotated gptq")):
        out = _write(tmp_path / case, calib_ids, case)
        _edit(out, _set(quant_method="gptq"))
        with pytest.raises(CheckpointError, match=rf"quant_method is 'gptq' but module \S+ {what}"):
            load_quantized(out)
    _edit(out, _set(format="gptq", quant_method="latticequant"))
    with pytest.raises(CheckpointError, match="is rotated but quantize config's format is 'gptq'"):
        load_quantized(out)


def test_hptq_claiming_a_code_width_is_refused(tmp_path, calib_ids):
    out = _write(tmp_path / "h", calib_ids, "hptq")
    _edit(out, _set(bits=4))
    with pytest.raises(CheckpointError, match=r"is hptq \(no fixed code width\) .* bits 4"):
        load_quantized(out)


def test_the_checked_checkpoint_runs_as_written(ckpt, calib_ids):
    """The check reads; it changes nothing the model runs with."""
    a = load_quantized(ckpt)
    check_file_config(ckpt)
    with torch.no_grad():
        assert torch.equal(a(calib_ids[:2]).logits, load_quantized(ckpt)(calib_ids[:2]).logits)
