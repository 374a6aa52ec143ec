"""QuantLinear / SSQRLinear on the torch path: forward equals x @ W_file^T + b in float64."""

from __future__ import annotations

import pytest
import torch
from cases import BITS, make_result

from latticequant.formats import (
    FormatError,
    dequantize_gptq,
    dequantize_ssqr,
    pack_gptq,
    pack_ssqr,
)
from latticequant.formats.gptq import QuantLinear, uniform_group_size
from latticequant.formats.ssqr import SSQRLinear


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_forward_matches_file_weight_float64(bits, act_order, checkpoint_format):
    d_out, d_in = 64, 128
    r = make_result(d_out, d_in, bits, group_size=32, act_order=act_order, seed=bits)
    t = pack_gptq(r, checkpoint_format=checkpoint_format)
    bias = _x(d_out, seed=1)
    m = QuantLinear.from_tensors(t, bits, checkpoint_format, bias=bias, backend="torch")
    assert (m.perm.numel() > 0) == act_order
    assert bool((m.g_idx[1:] >= m.g_idx[:-1]).all())  # groups contiguous after load
    W = dequantize_gptq(t, bits, checkpoint_format, dtype=torch.float64)
    x = _x(2, 5, d_in)
    y = m(x)
    assert y.dtype == torch.float64 and y.shape == (2, 5, d_out)
    assert torch.allclose(y, x @ W.T + bias, rtol=1e-12, atol=1e-12)
    assert torch.equal(m.dequantize_weight(torch.float64), W)


def test_cached_weight_gives_the_same_output_and_is_dropped_on_moves():
    r = make_result(32, 64, 4, group_size=32, act_order=True)
    t = pack_gptq(r)
    plain = QuantLinear(t, 4, backend="torch", cache_weight=False)
    cached = QuantLinear(t, 4, backend="torch", cache_weight=True)
    x = _x(3, 64).float()
    y = plain(x)  # packed codes: the same products, summed in another order
    assert torch.allclose(cached(x), y, rtol=1e-6, atol=1e-6)
    assert cached._cached is not None and plain.cache_bytes == 0
    first = cached(x)
    cached.to(torch.device("cpu"))
    assert cached._cached is None
    assert torch.equal(cached(x), first)


def test_low_precision_inputs_come_back_in_their_dtype():
    r = make_result(32, 64, 4, group_size=32)
    t = pack_gptq(r)
    m = QuantLinear(t, 4, backend="torch")
    W = dequantize_gptq(t, 4, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = _x(4, 64).to(dtype)
        y = m(x)
        assert y.dtype == dtype
        ref = (x.float() @ W.T).to(dtype)
        assert torch.allclose(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_wrong_input_width_and_bias_shape_raise():
    t = pack_gptq(make_result(32, 64, 4))
    m = QuantLinear(t, 4)
    with pytest.raises(ValueError, match="64"):
        m(torch.zeros(2, 65))
    with pytest.raises(FormatError, match="bias"):
        QuantLinear(t, 4, bias=torch.zeros(31))
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(t, 4, backend="cuda")


def test_uniform_group_size_detection():
    k = torch.arange(100)
    assert uniform_group_size(k // 32, 4) == 32
    assert uniform_group_size(torch.zeros(100, dtype=torch.long), 1) == 128
    uneven = torch.cat([torch.zeros(10), torch.ones(30), torch.full((60,), 2)]).long()
    assert uniform_group_size(uneven, 3) == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05])
@pytest.mark.parametrize("cache_weight", [False, True])
def test_ssqr_forward_is_dense_plus_outliers(bits, rate, cache_weight):
    d_out, d_in = 64, 96
    r = make_result(d_out, d_in, bits, group_size=32, act_order=True, sym=True, seed=bits)
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(d_out, d_in, generator=g) < rate
    values = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 4
    t = pack_ssqr(r, mask, values)
    bias = _x(d_out, seed=2)
    m = SSQRLinear.from_tensors(t, bits, bias=bias, backend="torch", cache_weight=cache_weight)
    assert m.n_outliers == int(mask.sum())
    W = dequantize_ssqr(t, bits, dtype=torch.float64)
    x = _x(7, d_in)
    assert torch.allclose(m(x), x @ W.T + bias, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m.dequantize_weight(torch.float64), W, rtol=0, atol=1e-15)


def test_dtype_casts_keep_the_stored_grid():
    t = pack_gptq(make_result(32, 64, 4, group_size=32))
    m = QuantLinear(t, 4, bias=torch.ones(32), backend="torch")
    W = m.dequantize_weight(torch.float64)
    m.to(torch.bfloat16)
    assert m.scales.dtype == torch.float16 and m.bias.dtype == torch.bfloat16
    assert torch.equal(m.dequantize_weight(torch.float64), W)
    x = _x(2, 64).to(torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", BITS)
def test_to_gptq_tensors_gives_the_checkpoint_back(bits):
    r = make_result(64, 128, bits, group_size=32, act_order=True, seed=bits)
    t = pack_gptq(r, checkpoint_format="gptq")
    m = QuantLinear(t, bits)
    for key, value in m.to_gptq_tensors().items():
        assert torch.equal(value, t[key]), key
    v2 = m.to_gptq_tensors("gptq_v2")
    assert torch.equal(v2["qzeros"], pack_gptq(r, checkpoint_format="gptq_v2")["qzeros"])


def test_ssqr_outlier_values_keep_their_precision_under_casts():
    r = make_result(32, 64, 4, group_size=32, sym=True)
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[1, 3] = True
    m = SSQRLinear(pack_ssqr(r, mask, torch.full((32, 64), 1.001)), 4, backend="torch")
    W = m.dequantize_weight(torch.float64)
    m.to(torch.bfloat16)
    assert m.outlier_val.dtype == torch.float16
    assert torch.equal(m.dequantize_weight(torch.float64), W)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_packed_path_equals_the_file_weight_over_several_tiles(bits, act_order, group_size):
    """No dense copy kept: tiles of 512 input rows (1088 = 512 + 512 + 64) dequantized per
    call give x @ W_file^T, and nothing but the packed tensors stays resident."""
    d_out, d_in = 64, 1088
    r = make_result(d_out, d_in, bits, group_size=group_size, act_order=act_order, seed=bits)
    t = pack_gptq(r)
    m = QuantLinear.from_tensors(t, bits, backend="torch", cache_weight=False)
    W = dequantize_gptq(t, bits, dtype=torch.float64)
    x = _x(3, d_in, seed=4)
    assert torch.allclose(m(x), x @ W.T, rtol=1e-12, atol=1e-12)
    assert m.last_kernel == "torch-packed" and m.cache_bytes == 0
    y32 = m(x.float())
    assert torch.allclose(y32.double(), x.float().double() @ W.T, rtol=1e-4, atol=1e-4)
