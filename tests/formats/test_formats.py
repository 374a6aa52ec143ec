"""Every registered format, walked through pack, unpack, dequantize, save, load and run.

Formats written as a checkpoint folder are walked here; a format of a single-file container
(GGUF) needs a model of its own kind and is walked by its own test
(``tests/pipeline/test_gguf_file.py``), which the last test here holds to that.

The walk is driven by the registry: a format gets this coverage by being registered. For each
one a tiny model is quantized by a method that writes it; the references are independent of
the format's own code: the weights the run left in the model (float maths in the method), the
model's logits, and the storage sizes of the tensors written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import run_quantize
from safetensors.torch import load_file
from tiny import GROUP, make_char_tokenizer, make_tiny_llama

from latticequant.checkpoint import load_quantized
from latticequant.formats import RotatedFormat, format_names, formats_storing, get_format
from latticequant.methods import get_method, list_methods
from latticequant.pipeline.layout import describe_model, linear_weight
from latticequant.pipeline.target import TargetConfig


def _writer(fmt) -> tuple[str, str, TargetConfig]:
    """A method that writes ``fmt``, the checkpoint format to ask for and the target."""
    inner = fmt.inner if isinstance(fmt, RotatedFormat) else fmt
    target = TargetConfig(rotate="hadamard") if isinstance(fmt, RotatedFormat) else TargetConfig()
    for name in list_methods():
        if inner.name in get_method(name).formats:
            return name, inner.name, target
    raise AssertionError(f"no registered method writes format {fmt.name}")


def _config(method: str):
    cls = get_method(method).config_cls
    fields = cls.__dataclass_fields__
    changes = {"group_size": GROUP} if "group_size" in fields else {}
    return cls(**changes)


FOLDER_FORMATS = tuple(n for n in format_names() if get_format(n).container == "folder")
FILE_FORMATS = {"gguf": "tests/pipeline/test_gguf_file.py"}


def test_every_single_file_format_has_its_own_walk():
    others = {n for n in format_names() if n not in FOLDER_FORMATS}
    assert others == set(FILE_FORMATS)
    root = Path(__file__).resolve().parents[2]
    assert all((root / path).is_file() for path in FILE_FORMATS.values())


@pytest.fixture(scope="module")
def walked(tmp_path_factory, calib_ids_module):
    """One quantized checkpoint per registered format, with the model the run left."""
    out = {}
    for name in FOLDER_FORMATS:
        fmt = get_format(name)
        method, checkpoint_format, target = _writer(fmt)
        model = make_tiny_llama()
        folder = tmp_path_factory.mktemp(name.replace("+", "-"))
        run_quantize(
            model,
            make_char_tokenizer(),
            calib_ids_module,
            method,
            _config(method),
            folder / "q",
            checkpoint_format=checkpoint_format,
            target=target,
        )
        out[name] = (model, folder / "q")
    return out


@pytest.fixture(scope="module")
def calib_ids_module():
    from tiny import id_stream

    from latticequant.pipeline.data import calibration_windows

    return calibration_windows(id_stream(), nsamples=4, seqlen=32, seed=0)


@pytest.mark.parametrize("name", FOLDER_FORMATS)
def test_every_format_round_trips_through_a_checkpoint(walked, name):
    fmt = get_format(name)
    model, folder = walked[name]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == fmt.quant_method
    modules = qc["latticequant"]["modules"]
    assert set(modules) == set(describe_model(model).linear_names())
    tensors = load_file(str(folder / "model.safetensors"))
    for module_name, entry in modules.items():
        assert entry["format"] == name
        stored = {k: tensors[f"{module_name}.{k}"] for k in entry["keys"]}
        # the tensors decide the kind: this format owns them, and the file tells v1 from v2
        assert fmt in formats_storing(set(stored))
        # dequantize: the weight the run fed forward, as the method computed it
        W = linear_weight(model.get_submodule(module_name)).detach()
        meta = fmt.module_meta(entry, qc, module_name)
        torch.testing.assert_close(fmt.dequantize(stored, meta, torch.float32), W)
        # effective bits: every stored byte counted
        n_bits = sum(t.numel() * t.element_size() * 8 for t in stored.values())
        assert fmt.effective_bits(stored, W.numel()) == pytest.approx(n_bits / W.numel())
        # the module runs the layer as the float weight does
        module = fmt.module(stored, {**meta, "cache_weight": False})
        x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(module(x), x @ W.T, rtol=1e-4, atol=1e-4)
    # the whole checkpoint loads and runs as the model the run left in memory
    loaded = load_quantized(folder)
    ids = torch.arange(4, 40).view(2, 18)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FOLDER_FORMATS)
def test_every_format_unpacks_the_codes_it_packed(walked, name):
    """``unpack`` gives back integer codes and their grid; the weight they make, by hand in
    float64, is the one the format dequantizes (outliers and rotations aside)."""
    fmt = get_format(name)
    model, folder = walked[name]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(folder / "model.safetensors"))
    inner = fmt.inner if isinstance(fmt, RotatedFormat) else fmt
    for entry_name, entry in qc["latticequant"]["modules"].items():
        stored = {k: tensors[f"{entry_name}.{k}"] for k in entry["keys"]}
        meta = inner.module_meta(entry, qc, entry_name)
        parts = inner.unpack(stored, meta)
        shape = (entry["out_features"], entry["in_features"])
        if isinstance(parts, tuple):  # a grid: codes, scales, zeros, g_idx
            codes, scales, zeros, g_idx = parts
            assert codes.shape == shape and not codes.is_floating_point()
            assert 0 <= int(codes.min()) and int(codes.max()) < 1 << entry["bits"]
            s64, z64 = scales.double()[:, g_idx], zeros.double()[:, g_idx]
            by_hand = s64 * (codes.double() - z64)
        else:  # one scale per matrix and unbounded codes
            assert parts.shape == shape and not parts.is_floating_point()
            by_hand = float(stored["hptq_scale"][0]) * parts.double()
        dense = inner.dequantize(stored, meta, torch.float64)
        if "outlier_val" in stored:  # SSQR: the outliers' positions hold the zero point's code
            keep = torch.zeros_like(dense, dtype=torch.bool)
            rowptr = stored["outlier_rowptr"].long()
            rows = torch.repeat_interleave(torch.arange(shape[0]), rowptr[1:] - rowptr[:-1])
            keep[rows, stored["outlier_col"].long()] = True
            dense = torch.where(keep, torch.zeros_like(dense), dense)
        torch.testing.assert_close(by_hand, dense, rtol=0, atol=1e-12)
