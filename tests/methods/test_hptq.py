"""HPTQ / HRTN: exact decode, the bits search, unreachable targets, the bound, the module."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

import latticequant as lq
from latticequant import formats
from latticequant.methods import get_method, hptq


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one thread avoids thread-pool waits on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(d_out=48, d_in=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    W[:, :4] *= 6  # a few heavy columns
    A = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.2 + torch.eye(
        d_in, dtype=torch.float64
    )
    X = torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64) @ A
    H = X.T @ X / X.shape[0]
    return W.float(), H.float()


def _stored_bits_by_hand(tensors) -> int:
    return (
        8 * tensors["hptq_stream"].numel()
        + 8 * tensors["hptq_table"].numel()
        + 16  # float16 scale
        + 2 * 32  # int32 shape
        + 32  # int32 rows per chunk
        + 32 * tensors["hptq_offsets"].numel()  # one int32 offset per chunk
    )


@pytest.mark.parametrize("rounding", ["gptq", "rtn"])
@pytest.mark.parametrize("target", [2.125, 3.125, 4.125])
def test_search_lands_within_tolerance_and_decodes_exactly(rounding, target):
    W, H = _problem(seed=int(target))
    cfg = hptq.HPTQConfig(target_bits=target, rounding=rounding, tol=0.01)
    r = hptq.hptq_quantize(W, H, cfg)
    tensors = hptq.hptq_tensors(r)
    bits = _stored_bits_by_hand(tensors) / W.numel()
    assert bits == r.bits_per_weight
    assert target - 0.01 <= bits <= target
    # the stream decodes back to the codes exactly, and the weight to Q bit for bit
    assert torch.equal(formats.decode_hptq(tensors), r.codes)
    assert torch.equal(formats.dequantize_hptq(tensors), r.Q)
    assert r.Q.dtype == W.dtype
    # one float16 scale for the whole matrix
    assert torch.equal(r.Q, torch.tensor(r.scale).half().float() * r.codes.float())


def test_hrtn_codes_are_round_to_nearest_and_hptq_beats_them():
    W, H = _problem(seed=4)
    rtn = hptq.hptq_quantize(W, H, hptq.HRTNConfig(target_bits=3.125))
    assert torch.equal(rtn.codes, torch.round(W / rtn.scale).long())
    gptq = hptq.hptq_quantize(W, H, hptq.HPTQConfig(target_bits=3.125))
    assert float(gptq.loss.sum()) < float(rtn.loss.sum())


@pytest.mark.parametrize("seed", range(3))
def test_babai_bound_holds_for_unclipped_codes(seed):
    W, H = _problem(seed=20 + seed)
    r = hptq.hptq_quantize(W, H, hptq.HPTQConfig(target_bits=2.125, order="min-pivot"))
    assert r.clipped == 0
    assert bool((r.loss <= r.bound).all())
    # the bound is s^2/4 tr(D) per row, D from the damped H in the processing order
    Hd = H.double()
    Hd = Hd + r.damp * torch.diagonal(Hd).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    D = lq.ldl_diagonal(Hd, r.order.flip(0))
    bound = 0.25 * r.scale**2 * float(D.sum())  # D: float64, by column
    assert torch.allclose(
        r.bound.double(), torch.full((W.shape[0],), bound, dtype=torch.float64), rtol=1e-5
    )
    # codes leave any small grid: nothing was clipped to make them fit
    assert int(r.codes.abs().max()) >= 2


def test_unreachable_targets_name_the_closest_reachable():
    W, H = _problem(d_out=32, d_in=64, seed=1)
    n = W.numel()
    with pytest.raises(hptq.UnreachableTargetError) as info:
        hptq.hptq_quantize(W, H, hptq.HRTNConfig(target_bits=0.9))
    # by hand: every code 0 -> a one-symbol table (1-bit code): n bits of stream, and a sparse
    # table of 6 header bytes + 1 byte of lengths + 1 varint byte; then the scale and shape,
    # the rows per chunk and one 32-bit offset per row (chunks of one row)
    index = 32 + 32 * W.shape[0]
    closest = (n + 8 * 8 + 16 + 64 + index) / n
    assert info.value.closest == pytest.approx(closest, abs=1e-12)
    assert f"{closest:.4f}" in str(info.value) and "closest reachable" in str(info.value)
    with pytest.raises(hptq.UnreachableTargetError, match="closest reachable"):
        hptq.hptq_quantize(W, H, hptq.HPTQConfig(target_bits=0.9))
    # two magnitudes only: no scale gives more than two symbols, so 3 bits is out of reach
    W2 = torch.where(torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1, 1)
    W2 = W2.float() * 0.01
    with pytest.raises(hptq.UnreachableTargetError) as info:
        hptq.hptq_quantize(W2, H, hptq.HRTNConfig(target_bits=3.0))
    m = re.search(r"closest reachable is ([0-9.]+)", str(info.value))
    assert m and 1.0 + index / n <= float(m.group(1)) < 1.1 + index / n


def test_huffman_linear_module_and_format_registration():
    W, H = _problem(d_out=24, d_in=64, seed=6)
    layer = get_method("hptq").quantize(W, H, hptq.HPTQConfig(target_bits=3.125))
    bias = torch.randn(24)
    module = formats.get_format("hptq").module(layer.tensors, {"in_features": 64}, bias=bias)
    assert isinstance(module, formats.HuffmanLinear)
    x = torch.randn(5, 64)
    torch.testing.assert_close(module(x), F.linear(x, layer.Q, bias), rtol=1e-6, atol=1e-6)
    state = module.state_dict()
    assert set(state) == set(formats.HPTQ_KEYS) | set(formats.HPTQ_CHUNK_KEYS) | {"bias"}
    rebuilt = formats.HuffmanLinear.from_tensors({k: v for k, v in state.items() if k != "bias"})
    assert torch.equal(rebuilt.dequantize_weight(), layer.Q)
    with pytest.raises(ValueError, match="in_features"):
        formats.get_format("hptq").module(layer.tensors, {"in_features": 65})


def test_registry_and_layer_stats():
    W, H = _problem(d_out=16, d_in=64, seed=8)
    for name, cfg_cls in (("hptq", hptq.HPTQConfig), ("hrtn", hptq.HRTNConfig)):
        method = get_method(name)
        assert method.config_cls is cfg_cls and method.formats == ("hptq",)
        layer = method.quantize(W, H, cfg_cls(target_bits=4.125))
        for key in ("loss", "bound", "clipped", "outliers", "bits_per_weight", "scale_factor"):
            assert key in layer.stats
        assert layer.stats["bits_per_weight"] == _stored_bits_by_hand(layer.tensors) / W.numel()
        assert layer.stats["clipped"] == 0 and layer.stats["outliers"] == 0
        # entropy <= stream bits per weight (Huffman is within one bit of it)
        assert layer.stats["entropy_bits"] <= layer.stats["stream_bits_per_weight"] + 1e-9
    with pytest.raises(ValueError, match="hrtn"):
        get_method("hrtn").quantize(W, H, hptq.HPTQConfig())


def test_bad_config_and_tensors():
    with pytest.raises(ValueError, match="target_bits"):
        hptq.HPTQConfig(target_bits=0)
    with pytest.raises(ValueError, match="rounding"):
        hptq.HPTQConfig(rounding="floor")
    with pytest.raises(ValueError, match="rtn"):
        hptq.HRTNConfig(rounding="gptq")
    with pytest.raises(ValueError, match="tol"):
        hptq.HPTQConfig(target_bits=2, tol=3)
    W, H = _problem(d_out=8, d_in=32)
    with pytest.raises(ValueError, match="NaN"):
        hptq.hptq_quantize(W * float("nan"), H, hptq.HPTQConfig())
    with pytest.raises(ValueError, match="d_in"):
        hptq.hptq_quantize(W, H[:4, :4], hptq.HPTQConfig())
    r = hptq.hptq_quantize(W, H, hptq.HPTQConfig(target_bits=4.125, tol=0.5))
    tensors = hptq.hptq_tensors(r)
    with pytest.raises(ValueError, match="hptq_table"):
        formats.decode_hptq({k: v for k, v in tensors.items() if k != "hptq_table"})
    with pytest.raises(ValueError, match="hptq_scale"):
        formats.decode_hptq({**tensors, "hptq_scale": tensors["hptq_scale"].float()})
    with pytest.raises(ValueError, match="offsets are corrupt"):
        formats.decode_hptq({**tensors, "hptq_stream": tensors["hptq_stream"][:2]})
    assert math.isfinite(r.scale) and r.scale > 0


@pytest.mark.parametrize("method", ["hptq", "hrtn"])
def test_checkpoint_round_trip_through_the_pipeline(tmp_path, calib_ids, method):
    from runs import run_quantize
    from tiny import make_char_tokenizer, make_tiny_llama

    from latticequant.checkpoint import load_quantized

    model = make_tiny_llama()
    cfg = get_method(method).config_cls(target_bits=3.125, tol=0.05)
    out = tmp_path / "ckpt"
    stats = run_quantize(model, make_char_tokenizer(), calib_ids, method, cfg, out, progress=False)
    assert all(3.075 <= s["bits_per_weight"] <= 3.125 for s in stats)
    assert all(s["clipped"] == 0 and s["loss"] <= s["bound"] for s in stats if method == "hptq")
    loaded = load_quantized(out)
    layer = loaded.model.layers[0].mlp.down_proj
    assert isinstance(layer, formats.HuffmanLinear)
    assert torch.equal(layer.dequantize_weight(), model.model.layers[0].mlp.down_proj.weight)
    ref = model(calib_ids[:2]).logits
    assert torch.allclose(loaded(calib_ids[:2]).logits, ref, atol=1e-5, rtol=1e-5)


def test_fresh_process_loads_an_hptq_checkpoint(tmp_path, calib_ids):
    import os
    import subprocess
    import sys

    from runs import run_quantize
    from tiny import make_char_tokenizer, make_tiny_llama

    out = tmp_path / "ckpt"
    cfg = hptq.HPTQConfig(target_bits=3.125, tol=0.05)
    tok = make_char_tokenizer()
    run_quantize(make_tiny_llama(), tok, calib_ids, "hptq", cfg, out, progress=False)
    code = (
        "from latticequant.checkpoint import load_quantized; "
        f"m = load_quantized({str(out)!r}); "
        "print(type(m.model.layers[0].mlp.down_proj).__name__)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "HuffmanLinear"
